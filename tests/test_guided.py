"""Guided generation (afm_mlx.guided): the tokenizer bridge, grammar errors, valid output with and without the
draft, greedy guided speculative == greedy guided plain, tool calls, incomplete answers, streaming."""

import json

import jsonschema
import numpy as np
import pytest

import afm_mlx
from afm_mlx.errors import AFMError
from afm_mlx.generation import generate, stream_generate
from afm_mlx.guided import lossless_tokenize, make_guide, token_table

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "married": {"type": "boolean"}},
          "required": ["name", "age", "married"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Bath", "London", "Derbyshire"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "GMT"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def demo():
    return afm_mlx.load()


# ---- the tokenizer bridge


def test_token_bytes_follow_the_afm_conventions(demo):
    _, tok = demo
    table = token_table(tok)
    assert table.token_bytes[tok.newline_id] == b"\n"
    assert {tok.eos_id, tok.turn_end_id, tok.turn_start_id, table.executable_start_id} <= table.special
    byte_a = tok.sp.piece_to_id("<0x41>")
    assert table.token_bytes[byte_a] == b"A" and byte_a not in table.special
    word = next(i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).startswith("\u2581") and
                len(tok.sp.id_to_piece(i)) > 2)
    assert table.token_bytes[word] == b" " + tok.sp.id_to_piece(word)[1:].encode()
    assert token_table(tok) is table  # built once per tokenizer


@pytest.mark.parametrize("text", [" ", ": ", '{"a": 1}', "two  spaces", "line\nbreak", "caf\u00e9 \u2603"])
def test_forced_text_tokenizes_to_exactly_its_bytes(demo, text):
    # SentencePiece alone drops a lone space; llguidance's masks then disagree with its matcher (": " in JSON).
    table = token_table(demo[1])
    ids = lossless_tokenize(table, text.encode())
    assert b"".join(table.token_bytes[i] for i in ids) == text.encode()


# ---- bad constraints: one line naming the problem


@pytest.mark.parametrize("options, message", [
    ({"schema": {"type": "strin"}}, "invalid JSON schema: Invalid type: strin"),
    ({"schema": {"type": "object", "properties": {"a": {"type": "string"}},
                 "dependencies": {"a": ["b"]}}}, "Unimplemented keys"),
    ({"regex": "("}, "invalid regex"),
    ({"regex": "[^\\s\\S]"}, "the regex cannot match anything"),
    ({"grammar": "start: foo"}, 'unknown name: "foo"'),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "a tool has no name"),
    ({"tools": [WEATHER], "tool_choice": {"function": {"name": "nope"}}}, "'nope', which is not among the tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "auto"}, "tool_choice and parallel_tool_calls need tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls must be true or false"),
    ({"regex": "a", "schema": PERSON}, "pass only one of"),
    ({"response_format": {"type": "json_object"}}, "response_format must be"),
    ({"schema": 3}, "schema must be a JSON schema"),
])
def test_bad_constraints_are_one_line_errors(demo, options, message):
    with pytest.raises(AFMError, match=None) as err:
        make_guide(demo[1], **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_generate_refuses_a_bad_schema_before_decoding(demo):
    model, tok = demo
    with pytest.raises(AFMError, match="Invalid type"):
        generate(model, tok, "Hi", schema={"type": "strin"}, max_tokens=4)


# ---- valid output


@pytest.mark.parametrize("draft", [False, None], ids=["plain", "speculative"])
def test_sampled_json_answers_validate(demo, draft):
    model, tok = demo
    finished = 0
    for seed in range(4):
        result = generate(model, tok, "Describe Mr. Darcy.", schema=PERSON, max_tokens=60, temperature=1.0,
                          seed=seed, draft_model=draft)
        if result.finish_reason == "stop":
            jsonschema.validate(result.parsed, PERSON)
            assert result.parsed == json.loads(result.text)
            finished += 1
        else:
            assert result.parsed is None and "incomplete" in result.incomplete
    assert finished >= 2  # maxLength 20 makes the answers short: most finish


def test_pydantic_class_gives_an_instance(demo):
    import pydantic

    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false
        name: str = pydantic.Field(max_length=12)
        age: int = pydantic.Field(ge=0, le=99)

    model, tok = demo
    result = generate(model, tok, "Who is Emma?", schema=Person, max_tokens=40, temperature=0.8, seed=1)
    assert result.finish_reason == "stop"
    assert isinstance(result.parsed, Person) and 0 <= result.parsed.age <= 99


def test_schema_is_rendered_into_the_prompt_as_the_toolkit_does(demo):
    model, tok = demo
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    rendered = tok.encode_prompt("Who?", response_format=response_format)
    guide = make_guide(tok, response_format=response_format)
    from afm_mlx.generation import prompt_ids
    assert prompt_ids(tok, "Who?", guide=guide) == rendered
    assert prompt_ids(tok, "Who?", guide=make_guide(tok, regex="a+")) == tok.encode_prompt("Who?")


def test_regex_and_lark_constrain_the_text(demo):
    model, tok = demo
    date = generate(model, tok, "When?", regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}", temperature=1.0, seed=2,
                    max_tokens=20)
    assert date.finish_reason == "stop" and len(date.text) == 10 and date.text[4] == "-"
    lark = 'start: "Yes" | "No" | "Perhaps, " NAME\nNAME: /[A-Z][a-z]+/'
    answers = {generate(model, tok, "Will she marry him?", grammar=lark, temperature=1.0, seed=s,
                        max_tokens=12).text for s in range(4)}
    assert all(a in ("Yes", "No") or (a.startswith("Perhaps, ") and a[9:].isalpha()) for a in answers)


@pytest.mark.parametrize("options", [{"schema": PERSON}, {"regex": r"(Mr|Mrs|Miss) [A-Z][a-z]+, [a-z ]+\."},
                                     {"tools": [WEATHER, TIME], "tool_choice": "required",
                                      "parallel_tool_calls": False}],
                         ids=["json", "regex", "tools"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_guided_speculative_equals_greedy_guided_plain(demo, options, k):
    model, tok = demo
    plain = generate(model, tok, "Tell me about Bath.", max_tokens=40, draft_model=False, **options)
    spec = generate(model, tok, "Tell me about Bath.", max_tokens=40, num_draft_tokens=k, **options)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.stats.speculative.rounds > 0


def test_incomplete_answer_says_so_and_closes_nothing(demo):
    model, tok = demo
    result = generate(model, tok, "Describe Mr. Darcy.", schema=PERSON, max_tokens=5)
    assert result.finish_reason == "length" and result.parsed is None
    assert result.incomplete == "the answer is incomplete: max_tokens ended it before the JSON was complete"
    assert not result.text.endswith("}")


def test_stream_generate_streams_guided_text(demo):
    model, tok = demo
    pieces = list(stream_generate(model, tok, "Who?", schema=PERSON, max_tokens=60, temperature=1.0, seed=3))
    whole = generate(model, tok, "Who?", schema=PERSON, max_tokens=60, temperature=1.0, seed=3)
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].guided is not None and pieces[-1].guided.parsed == whole.parsed


# ---- tool calls


@pytest.mark.parametrize("draft", [False, None], ids=["plain", "speculative"])
def test_required_tool_call_names_a_tool_and_validates(demo, draft):
    model, tok = demo
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(3):
        result = generate(model, tok, "What is the weather in Bath?", tools=[WEATHER, TIME], tool_choice="required",
                          parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=80, draft_model=draft)
        assert result.finish_reason == "stop" and len(result.tool_calls) == 1
        for call in result.tool_calls:
            jsonschema.validate(call["arguments"], tools[call["name"]])


def test_named_tool_choice_calls_that_tool(demo):
    model, tok = demo
    result = generate(model, tok, "Weather?", tools=[WEATHER, TIME], tool_choice={"function": {"name": "get_time"}},
                      temperature=1.0, seed=5, max_tokens=60, parallel_tool_calls=False)
    assert [c["name"] for c in result.tool_calls] == ["get_time"]


def test_tool_choice_none_emits_no_block(demo):
    model, tok = demo
    start = token_table(tok).executable_start_id
    for seed in range(3):
        result = generate(model, tok, "What is the weather in Bath?", tools=[WEATHER], tool_choice="none",
                          temperature=1.0, seed=seed, max_tokens=30)
        assert start not in result.tokens and result.tool_calls is None


def test_auto_tool_choice_mask_allows_text_and_the_block(demo):
    _, tok = demo
    table = token_table(tok)
    auto = make_guide(tok, tools=[WEATHER]).constraint(tok.vocab_size).allowed()[0]
    none = make_guide(tok, tools=[WEATHER], tool_choice="none").constraint(tok.vocab_size).allowed()[0]
    required = make_guide(tok, tools=[WEATHER], tool_choice="required").constraint(tok.vocab_size).allowed()[0]
    assert auto[table.executable_start_id] and not none[table.executable_start_id]
    assert np.flatnonzero(required).tolist() == [table.executable_start_id]
    assert auto.sum() == none.sum() + 1


def test_a_conversation_continues_with_the_tool_result(demo):
    model, tok = demo
    messages = [{"role": "user", "content": "What is the weather in Bath?"}]
    first = generate(model, tok, messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                     temperature=1.0, seed=1, max_tokens=80)
    reply = first.as_message()
    assert reply["tool_calls"] == first.tool_calls
    # The template renders the reply's block exactly as the model wrote it.
    rendered = tok.apply_chat_template(messages + [reply], tools=[WEATHER], add_generation_prompt=False)
    assert rendered.endswith(first.text + "<turn_end>")
    messages += [reply, {"role": "tool", "content": {"temperature": 21, "sky": "clear"}}]
    second = generate(model, tok, messages, tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert second.stats.prompt_tokens > first.stats.prompt_tokens and second.tool_calls is None


def test_bench_guided_measures_speed_mask_and_acceptance(demo):
    from afm_mlx.bench.guided import bench_guided
    from afm_mlx.bench.suite import BenchConfig

    model, tok = demo
    config = BenchConfig([8], 8, 12, [2], [0.0], trials=1, warmup=0)
    result = bench_guided(model, model.draft, tok, config, lambda _: None)
    assert set(result) >= {"plain", "speculative", "mask"} and result["k"] == 2
    assert result["plain"]["guided_tps"] > 0 and result["plain"]["ratio"] > 0
    assert 0 <= result["speculative"]["guided_acceptance"] <= 1 and result["plain"]["guided_acceptance"] is None
    assert result["mask"]["masks"] == result["plain"]["guided_tokens"] and 0 < result["mask"]["seconds_per_mask"]


def test_matcher_stays_in_step_with_every_speculative_round(demo):
    """After every round the matcher holds exactly the emitted tokens: drafts it took are rolled back to the
    accepted prefix and the correction (or bonus) is added."""
    from afm_mlx.generation import PromptCache
    from afm_mlx.sampling import RandomKeys, SamplingParams
    from afm_mlx.speculative import DraftLength, SpeculativeDecoder
    from afm_mlx.stats import SpeculativeStats

    model, tok = demo
    constraint = make_guide(tok, schema=PERSON).constraint(model.args.vocab_size)
    prompt = tok.encode_prompt("Who is Emma?")
    cache = PromptCache(model, model.draft)
    cache.prefill(prompt)
    params = SamplingParams(temperature=1.0, seed=4)
    decoder = SpeculativeDecoder(model, model.draft, cache.base, cache.draft, params, RandomKeys(4), DraftLength(4),
                                 SpeculativeStats(4), constraint)
    history, rejected = list(prompt), 0
    while len(history) - len(prompt) < 40 and history[-1] not in tok.stop_ids:
        emitted = decoder.finish(decoder.start(history), history)
        history += emitted
        rejected += len(emitted) < 5
        assert constraint.consumed + constraint._ended == len(history) - len(prompt)
    assert rejected > 0  # some rounds rolled the matcher back
