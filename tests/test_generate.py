"""Plain generation and the Python API: prefill/decode against a naive loop, stop tokens and strings, context
limit, seeds, streaming, statistics, prompt-cache reuse and chat sessions (tiny fp32 models, tiny tokenizer)."""

import mlx.core as mx
import pytest

import afm_mlx
from afm_mlx.errors import AFMError
from afm_mlx.generation import (
    ChatSession,
    PromptCache,
    StopStrings,
    generate,
    stream_generate,
    user_turn_ids,
)
from afm_mlx.model import Model
from afm_mlx.sampling import apply_repetition_penalty
from afm_mlx.tokenizer import load_tokenizer
from generation_fixtures import base_model, noisy_copy
from tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (session fixture)

PROMPT = "Hello, how are you today?"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok):
    return base_model(vocab_size=tok.vocab_size, seed=4)


@pytest.fixture(scope="module")
def draft(model):
    return noisy_copy(model)


def naive_greedy(model, ids, n, penalty=1.0, window=20):
    """Reference: a full forward over the whole sequence for every token, no cache, no pipelining."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        if penalty != 1.0:
            logits = apply_repetition_penalty(logits, mx.array(ids[-window:]), penalty)
        out.append(mx.argmax(logits).item())
        ids.append(out[-1])
    return out


class StopOn:
    """The tokenizer with other stop ids (a random model never says EOS on cue)."""

    def __init__(self, tokenizer, stop_ids):
        self._tokenizer, self.stop_ids = tokenizer, frozenset(stop_ids)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def no_stop(tok):
    return StopOn(tok, [])


# ---- plain decoding against the naive loop


@pytest.mark.parametrize("chunk", [3, 512])
def test_chunked_prefill_and_pipelined_decode_equal_naive_greedy(model, tok, chunk):
    ids = tok.encode_prompt(PROMPT)
    result = generate(model, no_stop(tok), PROMPT, max_tokens=24, draft_model=False, prefill_chunk_size=chunk)
    assert result.tokens == naive_greedy(model, ids, 24)
    assert result.finish_reason == "length" and result.stats.generated_tokens == 24


def test_repetition_penalty_equals_naive(model, tok):
    ids = tok.encode_prompt(PROMPT)
    result = generate(model, no_stop(tok), PROMPT, max_tokens=30, draft_model=False, repetition_penalty=1.5)
    expected = naive_greedy(model, ids, 30, penalty=1.5)
    assert result.tokens == expected
    assert expected != naive_greedy(model, ids, 30)


def test_no_vocabulary_wide_logits_for_prompt_positions(model, draft, tok, monkeypatch):
    rows = []
    original = Model.__call__

    def spy(self, tokens, cache=None, num_logits=None):
        logits = original(self, tokens, cache, num_logits)
        rows.append(logits.shape[1])
        return logits

    monkeypatch.setattr(Model, "__call__", spy)
    generate(model, tok, PROMPT * 8, max_tokens=5, draft_model=False, prefill_chunk_size=16)
    generate(model, tok, PROMPT * 8, max_tokens=5, draft_model=draft, num_draft_tokens=3)
    assert len(tok.encode_prompt(PROMPT * 8)) > 64 and max(rows) <= 4  # never more than k + 1 rows


# ---- stop conditions, context limit


@pytest.mark.parametrize("use_draft", [False, True])
def test_stop_token_ends_generation(model, draft, tok, use_draft):
    reference = generate(model, no_stop(tok), PROMPT, max_tokens=20, draft_model=False)
    stop_id = reference.tokens[7]
    first = reference.tokens.index(stop_id)
    result = generate(model, StopOn(tok, [stop_id]), PROMPT, max_tokens=20,
                      draft_model=draft if use_draft else False)
    assert result.tokens == reference.tokens[: first + 1]  # the stop token is the last one
    assert result.finish_reason == "stop"
    assert result.text == tok.decode(reference.tokens[:first])


@pytest.mark.parametrize("use_draft", [False, True])
def test_stop_string_cuts_the_text(model, draft, tok, use_draft):
    reference = generate(model, no_stop(tok), PROMPT, max_tokens=30, draft_model=False).text
    stop = reference[12:15]
    result = generate(model, no_stop(tok), PROMPT, max_tokens=30, stop=[stop, "never appears"],
                      draft_model=draft if use_draft else False)
    assert result.text == reference[: reference.index(stop)]
    assert result.finish_reason == "stop"


def test_stop_strings_hold_back_partial_matches():
    stops = StopStrings(["</end>", "xyz"])
    assert stops.feed("abc<") == "abc"  # `<` may start `</end>`
    assert stops.feed("/e") == ""
    assert stops.feed("x") == "</ex"[:-1] and stops.pending == "x"
    assert stops.feed("yz tail") == "" and stops.stopped
    other = StopStrings("</end>")
    assert other.feed("a</en") == "a" and other.flush() == "</en"
    assert StopStrings(None).feed("anything<") == "anything<"


def test_context_limit(model, tok):
    ids = tok.encode_prompt(PROMPT)
    with pytest.raises(AFMError, match="context limit of 10 tokens"):
        generate(model, tok, PROMPT, max_context=10)
    with pytest.raises(AFMError, match="context limit"):
        generate(model, tok, PROMPT, max_context=len(ids))
    result = generate(model, no_stop(tok), PROMPT, max_tokens=50, max_context=len(ids) + 6, draft_model=False)
    assert len(result.tokens) == 6 and result.finish_reason == "context"
    raised = generate(model, no_stop(tok), PROMPT, max_tokens=50, max_context=8192, draft_model=False)
    assert raised.finish_reason == "length" and len(raised.tokens) == 50


# ---- sampling: seeds, speculative runs


@pytest.mark.parametrize("use_draft", [False, True])
def test_same_seed_same_text(model, draft, tok, use_draft):
    options = dict(max_tokens=20, temperature=1.0, top_k=50, draft_model=draft if use_draft else False)
    a = generate(model, no_stop(tok), PROMPT, seed=7, **options)
    b = generate(model, no_stop(tok), PROMPT, seed=7, **options)
    c = generate(model, no_stop(tok), PROMPT, seed=8, **options)
    assert a.tokens == b.tokens and a.text == b.text and a.tokens != c.tokens
    assert a.stats.seed == 7
    replay = generate(model, no_stop(tok), PROMPT, seed=generate(model, tok, PROMPT, **options).stats.seed,
                      **options)
    assert len(replay.tokens) > 0  # a fresh seed is reported and can be passed back


def test_greedy_speculative_text_equals_plain(model, draft, tok):
    plain = generate(model, no_stop(tok), PROMPT, max_tokens=30, draft_model=False)
    spec = generate(model, no_stop(tok), PROMPT, max_tokens=30, draft_model=draft, num_draft_tokens=3)
    assert spec.tokens == plain.tokens and spec.text == plain.text


@pytest.mark.parametrize("budget", [dict(max_tokens=2), dict(max_context=2)])
def test_draft_length_is_capped_by_the_token_budget(model, draft, tok, budget):
    # -k 32 -n 2: drafting 32 tokens to keep 2 only costs time (-k 5000 took 132 s for 3 tokens)
    if "max_context" in budget:
        budget = dict(max_context=len(tok.encode_prompt(PROMPT)) + 2)
    spec = generate(model, no_stop(tok), PROMPT, draft_model=draft, num_draft_tokens=32, **budget).stats.speculative
    assert spec.rounds >= 1 and spec.proposed == 2 * spec.rounds


# ---- streaming and statistics


def test_stream_pieces_add_up_and_end_with_stats(model, draft, tok):
    responses = list(stream_generate(model, no_stop(tok), PROMPT, max_tokens=25, draft_model=draft))
    text = "".join(r.text for r in responses)
    tokens = [t for r in responses for t in r.tokens]
    assert text == tok.decode(tokens) and len(tokens) == 25
    assert all(r.stats is None for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == "length" and last.stats.generated_tokens == 25


def test_statistics(model, draft, tok):
    stats = generate(model, no_stop(tok), PROMPT, max_tokens=30, draft_model=draft, num_draft_tokens=3).stats
    assert stats.prompt_tokens == len(tok.encode_prompt(PROMPT)) and stats.cached_prompt_tokens == 0
    assert stats.generated_tokens == 30
    assert 0 < stats.prefill_s < stats.ttft_s and stats.decode_s > 0
    assert stats.prefill_tps > 0 and stats.decode_tps > 0 and stats.peak_memory_bytes > 0
    spec = stats.speculative
    assert spec.proposed == 3 * spec.rounds and 0 < spec.accepted < spec.proposed
    assert spec.emitted == spec.accepted + spec.rounds >= 30
    assert sum(spec.accepted_by_position) == spec.accepted
    rates = spec.acceptance_by_position
    assert rates == sorted(rates, reverse=True)  # slot i+1 is accepted only after slot i
    assert spec.tokens_per_step == spec.emitted / spec.rounds > 1
    assert spec.draft_s > 0 and spec.verify_s > 0
    assert abs(spec.draft_s + spec.verify_s - stats.decode_s) < 1e-9
    assert "acceptance by draft position" in stats.summary()
    assert generate(model, tok, PROMPT, max_tokens=3, draft_model=False).stats.speculative is None


# ---- prompt cache reuse and chat


@pytest.mark.parametrize("use_draft", [False, True])
def test_prompt_cache_reuses_the_common_prefix(model, draft, tok, use_draft):
    options = dict(max_tokens=12, draft_model=draft if use_draft else False)
    cache = PromptCache(model)
    first = generate(model, no_stop(tok), PROMPT, prompt_cache=cache, **options)
    more = tok.encode(" more", dummy_prefix=False)
    follow_up = tok.encode_prompt(PROMPT) + first.tokens + more
    second = generate(model, no_stop(tok), follow_up, prompt_cache=cache, **options)
    fresh = generate(model, no_stop(tok), follow_up, **options)
    assert second.tokens == fresh.tokens
    # Prefilled again: only the new ids and the last generated token (handed out, never fed to the model).
    assert second.stats.cached_prompt_tokens >= len(follow_up) - len(more) - 1
    edited = follow_up[:5] + [follow_up[5] + 1] + follow_up[6:]
    third = generate(model, no_stop(tok), edited, prompt_cache=cache, **options)
    assert third.stats.cached_prompt_tokens == 5 and third.tokens == generate(model, no_stop(tok), edited,
                                                                              **options).tokens


def test_user_turn_ids_continue_the_template(tok):
    reply = "I am fine.\nThanks!"
    first = tok.encode_prompt("Hi there")
    continued = first + tok.encode(reply, dummy_prefix=False) + [tok.turn_end_id] + user_turn_ids(tok, "And you?")
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "And you?"}]
    assert continued == tok.encode_prompt(messages)


@pytest.mark.parametrize("use_draft", [False, True])
def test_chat_prefills_only_the_new_turn(model, draft, tok, use_draft):
    session = ChatSession(model, tok, draft_model=draft if use_draft else False, max_tokens=8)
    list(session.send("Hello!"))
    history = list(session.history)
    responses = list(session.send("Tell me more.\nPlease."))
    stats = responses[-1].stats
    new_turn = user_turn_ids(tok, "Tell me more.\nPlease.")
    assert stats.prompt_tokens == len(history) + len(new_turn)
    # The reply ended at max_tokens: its last token was never fed, and the closing <turn_end> is new.
    assert stats.cached_prompt_tokens >= len(history) - 2
    expected = generate(model, tok, history + new_turn, max_tokens=8, draft_model=False)
    assert [t for r in responses for t in r.tokens] == expected.tokens
    assert session.history[: len(history)] == history and session.history[-1] == tok.turn_end_id
    session.reset()
    assert session.history == []


# ---- API details and bad input


def test_prompt_forms_and_default_draft(model, draft, tok):
    as_text = generate(model, tok, PROMPT, max_tokens=6, system="Be brief.", draft_model=False)
    as_messages = generate(model, tok, [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": PROMPT}], max_tokens=6, draft_model=False)
    as_ids = generate(model, tok, tok.encode_prompt(PROMPT, system="Be brief."), max_tokens=6, draft_model=False)
    assert as_text.tokens == as_messages.tokens == as_ids.tokens
    assert generate(model, tok, "raw text", raw=True, max_tokens=3).stats.prompt_tokens == 1 + len(
        tok.encode("raw text", dummy_prefix=False))
    model.draft = draft
    try:
        assert generate(model, tok, PROMPT, max_tokens=4).stats.speculative is not None
        assert generate(model, tok, PROMPT, max_tokens=4, draft_model=False).stats.speculative is None
    finally:
        del model.draft
    assert afm_mlx.stream_generate is stream_generate
    for _ in range(2):  # the function, also after the submodule afm_mlx.generation is imported (by this file)
        assert afm_mlx.generate(model, tok, PROMPT, max_tokens=3).tokens == generate(model, tok, PROMPT,
                                                                                     max_tokens=3).tokens


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(num_draft_tokens=0), "num_draft_tokens"),
    (dict(num_draft_tokens=33), "at most 32"),
    (dict(stop=[3]), "stop strings"),
])
def test_bad_options_are_refused(model, draft, tok, options, message):
    with pytest.raises(AFMError, match=message):
        generate(model, tok, PROMPT, draft_model=draft, **options)


def test_bad_prompts_are_refused(model, tok):
    for prompt in ("", "   ", [tok.vocab_size + 5]):
        with pytest.raises(AFMError):
            generate(model, tok, prompt)


def test_tokenizer_larger_than_the_model_is_refused(tok):
    small = base_model(vocab_size=tok.vocab_size - 10, seed=4)
    with pytest.raises(AFMError, match="do not belong together"):
        generate(small, tok, PROMPT)
