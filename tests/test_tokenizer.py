"""Tokenizer: V6 chat template (golden strings), prompt ids, `\\n` <-> `<n>`, streaming detokenization."""

import json
import random
import shutil

import pytest
import sentencepiece as spm
from tokenizer_fixture import EOS_ID, PAD_ID, build_tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401

from afm_mlx.errors import AFMError
from afm_mlx.tokenizer import (
    DEFAULT_SYSTEM_MESSAGE,
    load_tokenizer,
    render_chat_template,
    write_tokenizer_config,
)

SYS = "<turn_start> system<n>A conversation between a user and a helpful assistant.<turn_end>"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME_TOOL = {"type": "function", "function": {"name": "time", "description": "heure à Paris"}}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


# ---- chat template: golden strings


def test_default_system_message_and_generation_prompt():
    text = render_chat_template([{"role": "user", "content": "Hi"}])
    assert DEFAULT_SYSTEM_MESSAGE == "A conversation between a user and a helpful assistant."
    assert text == SYS + "<turn_start> user<n>Hi<turn_end><turn_start> assistant<n>"


def test_explicit_system_message_and_multi_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Two\nlines"},
    ]
    assert render_chat_template(messages) == (
        "<turn_start> system<n>Be brief.<turn_end><turn_start> user<n>Hi<turn_end>"
        "<turn_start> assistant<n>Hello!<turn_end><turn_start> user<n>Two\nlines<turn_end>"
        "<turn_start> assistant<n>"
    )
    # system= stands in for the default when the messages carry none
    assert render_chat_template(messages[1:2], system="Be brief.") == (
        "<turn_start> system<n>Be brief.<turn_end><turn_start> user<n>Hi<turn_end><turn_start> assistant<n>"
    )


def test_no_generation_prompt_after_assistant_or_when_disabled():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    expected = SYS + "<turn_start> user<n>Hi<turn_end><turn_start> assistant<n>Yo<turn_end>"
    assert render_chat_template(messages) == expected
    assert render_chat_template(messages[:1], add_generation_prompt=False) == (
        SYS + "<turn_start> user<n>Hi<turn_end>"
    )


def test_tools_are_json_lines_in_the_system_turn():
    text = render_chat_template([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL, TIME_TOOL])
    assert text == (
        "<turn_start> system<n>A conversation between a user and a helpful assistant."
        '<n>system tools: {"type": "function", "function": {"name": "get_weather", "parameters": '
        '{"type": "object"}}}'
        '<n>{"type": "function", "function": {"name": "time", "description": "heure à Paris"}}<turn_end>'
        "<turn_start> user<n>Weather?<turn_end><turn_start> assistant<n>"
    )


def test_tool_calls_and_tool_results():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Nîmes"}'}}
            ],
        },
        {"role": "tool", "content": {"temp": 21}},
        {"role": "function", "content": [TIME_TOOL]},
    ]
    assert render_chat_template(messages) == (
        SYS + "<turn_start> user<n>Weather?<turn_end>"
        "<turn_start> assistant<n><executable_start> ```function\n"
        '[{"name": "get_weather", "arguments": {"city": "Nîmes"}}]```<executable_end><turn_end>'
        '<turn_start> tool<n>{"temp": 21}<turn_end>'
        '<turn_start> tool<n>new tools: {"type": "function", "function": {"name": "time", '
        '"description": "heure à Paris"}}<turn_end>'
        "<turn_start> assistant<n>"
    )


def test_response_format_is_appended_to_the_last_message():
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "city", "description": "A city", "schema": {"type": "string"}},
    }
    text = render_chat_template([{"role": "user", "content": "Name a city"}], response_format=response_format)
    assert text == (
        SYS + "<turn_start> user<n>Name a city\n\nresponse format in json.\nname: city\ndescription: A city\n"
        'schema: {"type": "string"}<turn_end><turn_start> assistant<n>'
    )
    inline = [{"role": "user", "content": "Name a city", "response_format": response_format}]
    assert render_chat_template(inline) == text


@pytest.mark.parametrize(
    "messages, kwargs, message",
    [
        ([], {}, "non-empty"),
        ("hello", {}, "non-empty"),
        ([{"content": "no role"}], {}, "role"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], {}, "first message"),
        ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], {"system": "c"}, "only one"),
        ([{"role": "user", "content": "a"}], {"system": " padded"}, "space"),
        ([{"role": "user", "content": "a"}], {"system": 5}, "must be a string"),
        ([{"role": "user", "content": 3}], {}, "string"),
        ([{"role": "user", "content": "a"}], {"response_format": {"type": "text"}}, "json_schema"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], {}, "function name"),
    ],
)
def test_template_rejects_bad_messages(messages, kwargs, message):
    with pytest.raises(AFMError, match=message):
        render_chat_template(messages, **kwargs)


# ---- prompt ids


def test_prompt_ids_drop_the_dummy_prefix_and_start_with_eos(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    encoded = tok.encode(text)
    assert tok.id_to_piece(encoded[0]) == "\u2581"  # the token the toolkit strips is the dummy prefix
    assert encoded[1] == tok.turn_start_id
    assert tok.encode_prompt("Hi") == [tok.eos_id] + encoded[1:]


def test_prompt_ids_golden_on_the_fixture_model(tok):
    # Pinned from the fixture tokenizer (sentencepiece 0.2 BPE on tokenizer_fixture._CORPUS); the structure check
    # below shows why they are right: specials are single ids and the text between them is encoded without
    # a dummy prefix.
    golden = [1, 3, 270, 345, 330, 331, 307, 5, 382, 289, 269, 292, 330, 275, 291, 288, 309, 315, 283, 264, 326,
              296, 267, 280, 264, 326, 265, 338, 348, 347, 336, 338, 298, 330, 268, 331, 325, 343, 4, 3, 326, 296,
              267, 5, 384, 333, 4, 3, 298, 330, 268, 331, 325, 5]  # fmt: skip
    ids = tok.encode_prompt("Hi")
    assert ids == golden

    def plain(text):
        return tok.encode(text, dummy_prefix=False)

    S, E, N = tok.turn_start_id, tok.turn_end_id, tok.newline_id
    assert ids == (
        [EOS_ID, S] + plain(" system") + [N] + plain(DEFAULT_SYSTEM_MESSAGE) + [E]
        + [S] + plain(" user") + [N] + plain("Hi") + [E]
        + [S] + plain(" assistant") + [N]
    )  # fmt: skip
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "Hi"}]).replace("<n>", "\n")


def test_raw_mode_has_no_template_and_matches_a_spelled_out_template(tok):
    messages = [{"role": "user", "content": "Tell me\nmore"}]
    assert tok.encode_prompt(tok.apply_chat_template(messages), raw=True) == tok.encode_prompt(messages)
    ids = tok.encode_prompt("Hello world", raw=True)
    assert ids[0] == tok.eos_id and tok.turn_start_id not in ids
    assert tok.decode(ids) == "Hello world"
    assert ids[1:] == tok.encode("Hello world", dummy_prefix=False)
    assert tok.encode("Hello world")[0] != ids[1]  # with the dummy prefix it would begin with `▁H...`


def test_conversation_ids_are_the_concatenation_of_turn_ids(tok):
    # What a chat loop that keeps its KV cache across turns relies on: specials split the text, so the ids of
    # the whole conversation = first prompt + reply (+ <turn_end>) + the next turns encoded without dummy prefix.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    messages.append({"role": "user", "content": "More?\nPlease"})
    first = tok.encode_prompt(messages[:1])
    reply = tok.encode("Hello!", dummy_prefix=False) + [tok.turn_end_id]
    rest = tok.encode("<turn_start> user\nMore?\nPlease<turn_end><turn_start> assistant\n", dummy_prefix=False)
    assert tok.encode_prompt(messages) == first + reply + rest


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("", {}, "empty"),
        ("   ", {}, "empty"),
        ("", {"raw": True}, "empty"),
        ([{"role": "user", "content": "a"}], {"raw": True}, "one string"),
        ("a", {"raw": True, "system": "s"}, "no template"),
    ],
)
def test_encode_prompt_rejects_bad_input(tok, prompt, kwargs, message):
    with pytest.raises(AFMError, match=message):
        tok.encode_prompt(prompt, **kwargs)


# ---- special ids, round trips


def test_special_ids_come_from_the_model(tok):
    sp = tok.sp
    assert (tok.eos_id, tok.pad_id) == (EOS_ID, PAD_ID) == (sp.eos_id(), sp.pad_id())
    for name, piece in [("turn_start_id", "<turn_start>"), ("turn_end_id", "<turn_end>"), ("newline_id", "<n>")]:
        assert sp.id_to_piece(getattr(tok, name)) == piece
    assert tok.stop_ids == {EOS_ID, sp.piece_to_id("<turn_end>")}
    assert tok.vocab_size == sp.get_piece_size() == 400


@pytest.mark.parametrize(
    "text",
    [
        "one line",
        "two\nlines\n",
        "\n\nleading newlines and  double  spaces",
        "emoji 😀🎉 and CJK 東京 日本語 한국어",
        "café naïve über — “quotes”",
        "literal specials <turn_end> and <executable_start>```x```<executable_end>",
        " leading space",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # SentencePiece's decode drops one leading space: the `▁` it takes for a dummy prefix.
    assert tok.decode(tok.encode(text, dummy_prefix=False)) == (text[1:] if text[0] == " " else text)
    assert ids.count(tok.newline_id) == text.count("\n")  # every newline is one `<n>` piece
    assert ("<turn_end>" in text) == (tok.turn_end_id in ids)


def test_emoji_uses_byte_fallback(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("😀")]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_decode_hides_eos_and_pad_and_rejects_unknown_ids(tok):
    ids = tok.encode("Hi")
    assert tok.decode([tok.eos_id] + ids + [tok.pad_id]) == "Hi"
    with pytest.raises(AFMError, match="outside the tokenizer's vocabulary"):
        tok.decode([tok.vocab_size])


# ---- loading and tokenizer_config.json


def test_config_written_by_the_converter_is_checked(tmp_path, tiny_tokenizer_dir, tok):
    shutil.copy(tiny_tokenizer_dir / "tokenizer.model", tmp_path)
    path = write_tokenizer_config(tmp_path, tok.sp)
    saved = json.loads(path.read_text())
    assert saved == {**tok.special.as_dict(), "vocab_size": 400}
    assert load_tokenizer(tmp_path).special == tok.special
    path.write_text(json.dumps({**saved, "turn_end_id": 7}))
    with pytest.raises(AFMError, match="turn_end_id=7 but tokenizer.model has 4"):
        load_tokenizer(tmp_path)
    path.write_text("{not json")
    with pytest.raises(AFMError, match="invalid JSON"):
        load_tokenizer(tmp_path)


def test_load_accepts_the_model_file_and_refuses_bad_paths(tmp_path, tiny_tokenizer_dir):
    assert load_tokenizer(tiny_tokenizer_dir / "tokenizer.model").vocab_size == 400
    with pytest.raises(AFMError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AFMError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_without_afm_pieces_is_refused(tmp_path):
    model = tmp_path / "tokenizer.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["plain text without any special pieces at all"] * 20),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=30,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(AFMError, match="no <turn_start> piece"):
        load_tokenizer(model)


# ---- streaming detokenization


def _stream(tok, ids):
    det = tok.detokenizer()
    pieces = [det.add(i) for i in ids]
    pieces.append(det.finalize())
    assert det.text == "".join(pieces) and det.tokens == list(ids)
    return pieces


STREAM_TEXTS = [
    "Hello\nworld\n\n😀 東京 and 日本語!\n",
    "<turn_start> user<n>emoji 🎉🎉 at the end 🎉",
    "a<n>b < n > <n <<n>>",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_every_prefix_matches_decode_without_broken_characters(tok, text):
    ids = tok.encode(text)
    for end in range(len(ids) + 1):
        pieces = _stream(tok, ids[:end])
        assert "".join(pieces) == tok.decode(ids[:end])
        if "\ufffd" not in tok.decode(ids[:end]):  # a cut inside a character decodes to U+FFFD in full...
            assert not any("\ufffd" in p for p in pieces)
        assert not any("\ufffd" in p for p in pieces[:-1])  # ...but is never emitted before finalize()
    assert "".join(_stream(tok, ids)) == text.replace("<n>", "\n")  # a literal `<n>` is a newline to AFM


def test_streaming_holds_back_a_newline_spelled_out_of_pieces(tok):
    spelled = [tok.sp.piece_to_id(p) for p in ("<", "n", ">")]
    assert tok.sp.unk_id() not in spelled
    det = tok.detokenizer()
    assert [det.add(i) for i in spelled] == ["", "", "\n"]
    assert tok.decode(spelled) == "\n"


@pytest.mark.parametrize("remove_extra_whitespaces", [False, True])
def test_streaming_equals_sentencepiece_on_random_ids(tmp_path, remove_extra_whitespaces):
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path, remove_extra_whitespaces=remove_extra_whitespaces))
    space = tok.sp.piece_to_id("\u2581")
    rng = random.Random(0)

    def random_id():  # weighted towards the hard cases: bytes, controls, specials, lone spaces
        r = rng.random()
        if r < 0.3:
            return rng.choice([i for i in range(tok.vocab_size) if tok.sp.is_byte(i)])
        if r < 0.45:
            return rng.choice([0, 1, 2, 3, 4, 5, space])
        return rng.randrange(tok.vocab_size)

    for _ in range(3000):
        ids = [random_id() for _ in range(rng.randint(0, 10))]
        assert "".join(_stream(tok, ids)) == tok.sp.decode(ids).replace("<n>", "\n"), ids
