"""AFM tokenizer: SentencePiece with `\\n` <-> `<n>`, the V6 chat template, prompt ids and streaming detokenization.

Facts from the toolkit (docs/format.md section 5):
- text is encoded after replacing every `\\n` with the user-defined piece `<n>`; decoding maps `<n>` back to `\\n`
  (also when a model spells `<n>` out of ordinary pieces, as tamm's whole-text find-and-replace does);
- a prompt is `[eos] + encode(text)[1:]`: the first token (SentencePiece's dummy-prefix `▁` in front of
  `<turn_start>`) is dropped and EOS is prepended -- every sequence starts with EOS, there is no BOS;
- generation stops on EOS or `<turn_end>` (`Tokenizer.stop_ids`).

API (everything a generator needs):

    tok = load_tokenizer(model_dir)              # dir with tokenizer.model (+ optional tokenizer_config.json)
    tok.vocab_size                               # pieces in tokenizer.model (compare base/draft with this)
    tok.eos_id, tok.pad_id, tok.turn_start_id, tok.turn_end_id, tok.newline_id, tok.stop_ids
    tok.apply_chat_template(messages, add_generation_prompt=True, tools=None, response_format=None) -> str
    tok.encode_prompt("Hi", system=None, raw=False) -> [eos, ...]   # also accepts a list of messages
    tok.encode(text) -> ids                      # plain SentencePiece ids, dummy prefix included
    tok.decode(ids) -> str                       # SentencePiece decode, then `<n>` -> `\\n`
    det = tok.detokenizer(); piece = det.add(token_id) ... rest = det.finalize()
                                                 # concatenated pieces == tok.decode(all ids)

Raw mode (`encode_prompt(text, raw=True)`) renders no template and encodes the text as if it followed a special
token (no dummy-prefix space), then prepends EOS like every toolkit sequence. A raw text that spells out the
template therefore gets exactly the ids of the templated path.

`tokenizer_config.json` (written by our converter, optional) holds the special ids
`{"eos_id", "pad_id", "turn_start_id", "turn_end_id", "newline_id"}`; `special_token_ids(sp)` computes them and
`write_tokenizer_config(out_dir, sp)` writes the file. When present, every id in it must agree with tokenizer.model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import sentencepiece as spm

from .errors import AFMError
from .jsonfile import read_json

DEFAULT_SYSTEM_MESSAGE = "A conversation between a user and a helpful assistant."
TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"

TURN_START = "<turn_start>"
TURN_END = "<turn_end>"
NEWLINE = "<n>"
EXECUTABLE_START = "<executable_start>"
EXECUTABLE_END = "<executable_end>"
_SPACE = "\u2581"  # SentencePiece's whitespace symbol `▁`
_REPLACEMENT = "\ufffd"


# ---- special ids and tokenizer_config.json


@dataclass(frozen=True)
class SpecialTokens:
    eos_id: int
    pad_id: int
    turn_start_id: int
    turn_end_id: int
    newline_id: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


_PIECE_OF = {"turn_start_id": TURN_START, "turn_end_id": TURN_END, "newline_id": NEWLINE}


def special_token_ids(sp: spm.SentencePieceProcessor) -> SpecialTokens:
    """Read the special ids from the SentencePiece model itself; AFMError when a piece is missing."""
    ids = {"eos_id": sp.eos_id(), "pad_id": sp.pad_id()}
    if ids["eos_id"] < 0:
        raise AFMError("tokenizer.model defines no EOS piece: not an AFM tokenizer")
    for key, piece in _PIECE_OF.items():
        idx = sp.piece_to_id(piece)
        if idx == sp.unk_id() or sp.id_to_piece(idx) != piece:
            raise AFMError(f"tokenizer.model has no {piece} piece: not an AFM tokenizer")
        ids[key] = idx
    return SpecialTokens(**ids)


def write_tokenizer_config(out_dir: str | os.PathLike, sp: spm.SentencePieceProcessor,
                           eot_id: int | None = None) -> Path:
    """Write tokenizer_config.json (the special ids of `sp`, and the toolkit's `eot_id` when its tokenizer
    configuration sets one) into out_dir; returns its path."""
    path = Path(out_dir) / CONFIG_FILE
    payload = {**special_token_ids(sp).as_dict(), "vocab_size": sp.get_piece_size()}
    if eot_id is not None:
        payload["eot_id"] = eot_id
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _check_config(path: Path, found: SpecialTokens, vocab_size: int) -> int | None:
    """Every special id in the file must agree with tokenizer.model; returns the toolkit's eot_id, if set."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise AFMError(f"{path} must hold a JSON object of special token ids")
    expected = {**found.as_dict(), "vocab_size": vocab_size}
    for key, value in config.items():
        if key in expected and value != expected[key]:
            raise AFMError(
                f"{path} says {key}={value!r:.40} but tokenizer.model has {expected[key]}: "
                "the two files come from different tokenizers"
            )
    eot = config.get("eot_id")
    if eot is not None and (type(eot) is not int or not 0 <= eot < vocab_size):
        raise AFMError(f"{path}: eot_id must be a token id below {vocab_size}, got {repr(eot)[:40]}")
    return eot


# ---- loading


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """Load a Tokenizer from a model directory (holding tokenizer.model) or a .model file."""
    path = Path(path)
    model_file = path / TOKENIZER_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise AFMError(f"no {TOKENIZER_FILE} found at {model_file}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(model_file))
    except (OSError, RuntimeError) as err:
        raise AFMError(f"{model_file} is not a SentencePiece model ({str(err).splitlines()[0]})") from None
    tokenizer = Tokenizer(sp)
    config = model_file.parent / CONFIG_FILE
    if config.is_file():
        tokenizer.eot_id = _check_config(config, tokenizer.special, tokenizer.vocab_size)
    return tokenizer


# ---- the V6 chat template


def _tojson(value: Any) -> str:
    # tamm's Jinja `tojson` filter: json.dumps with ensure_ascii=False and default separators.
    return json.dumps(value, ensure_ascii=False)


def _tool_calls_to_json(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    calls = []
    for call in tool_calls:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or "name" not in function:
            raise AFMError(f"a tool call needs a function name, got {call!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string; keep it verbatim if not JSON
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append({"name": function["name"], "arguments": arguments})
    return _tojson(calls)


def _response_format_text(response_format: Mapping[str, Any]) -> str:
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        raise AFMError(f"response_format must be {{'type': 'json_schema', ...}}, got {response_format!r}")
    schema = response_format.get("json_schema")
    if not isinstance(schema, Mapping) or "schema" not in schema:
        raise AFMError("response_format['json_schema'] must hold a 'schema'")
    pieces = ["\n\nresponse format in json.\n"]
    pieces += [f"{key}: {schema.get(key)}\n" for key in ("name", "description")]
    pieces.append(f"schema: {_tojson(schema['schema'])}")
    return "".join(pieces)


def _normalize_message(message: Any) -> dict[str, str]:
    """One message -> {'role', 'content'} with tool calls, tool results and response format folded in."""
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise AFMError(f"each message must be a dict with a string 'role', got {message!r}")
    role, content = message["role"], message.get("content")
    if role in ("tool", "function"):
        role = "tool"
        if isinstance(content, Mapping):  # a tool result
            content = _tojson(content)
        elif isinstance(content, list):  # tools added mid-conversation
            content = "new tools: " + "\n".join(_tojson(tool) for tool in content)
    content = "" if content is None else content
    if not isinstance(content, str):
        raise AFMError(f"message content must be a string, got {type(content).__name__} in a {role!r} message")
    if message.get("tool_calls") is not None:  # tamm tests `is not None`: `tool_calls: []` renders an empty block
        content += f"<executable_start> ```function\n{_tool_calls_to_json(message['tool_calls'])}```<executable_end>"
    if message.get("response_format") is not None:
        content += _response_format_text(message["response_format"])
    return {"role": role, "content": content}


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise AFMError("a system message may only be the first message")
    if roles[0] == "system":
        if system is not None:
            raise AFMError("got both a system= argument and a system message; pass only one")
        return messages
    system = DEFAULT_SYSTEM_MESSAGE if system is None else system
    if not isinstance(system, str):
        raise AFMError(f"the system message must be a string, got {type(system).__name__}")
    if system != system.strip(" "):
        raise AFMError("the system message must not start or end with a space")
    return [{"role": "system", "content": system}] + messages


def render_chat_template(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Any] | None = None,
    response_format: Mapping[str, Any] | None = None,
    system: str | None = None,
) -> str:
    """Render the toolkit's V6 template (AFMChatTemplateV6Preprocessor) as text, `\\n` not yet replaced.

    `<turn_start> system<n>{system}[<n>system tools: {tool json}<n>...]<turn_end>` then
    `<turn_start> {role}<n>{content}<turn_end>` per message, then `<turn_start> assistant<n>` when
    add_generation_prompt and the last message is not the assistant's. A missing system message becomes `system`
    or DEFAULT_SYSTEM_MESSAGE. `response_format` ({'type': 'json_schema', 'json_schema': {name, description,
    schema}}) is appended to the last message's content, as the toolkit does for a message carrying one.
    """
    if isinstance(messages, (str, bytes)) or not messages:
        raise AFMError("messages must be a non-empty list of {'role', 'content'} dicts")
    messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    if response_format is not None:
        messages[-1] = {**messages[-1], "response_format": response_format}
    turns = _with_system([_normalize_message(m) for m in messages], system)
    first = f"{TURN_START} {turns[0]['role']}{NEWLINE}{turns[0]['content']}"
    if tools:
        first += f"{NEWLINE}system tools: " + NEWLINE.join(_tojson(tool) for tool in tools)
    parts = [first + TURN_END]
    parts += [f"{TURN_START} {m['role']}{NEWLINE}{m['content']}{TURN_END}" for m in turns[1:]]
    if add_generation_prompt and turns[-1]["role"] != "assistant":
        parts.append(f"{TURN_START} assistant{NEWLINE}")
    return "".join(parts)


# ---- the tokenizer


def _check_utf8(text: str) -> None:
    """Python hands over undecodable command-line or stdin bytes as lone surrogates (surrogateescape);
    SentencePiece cannot take them, so they are refused here with the position, as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise AFMError(f"the text is not valid UTF-8 (undecodable byte or lone surrogate at character "
                       f"{err.start})") from None


class Tokenizer:
    """SentencePiece tokenizer with the AFM conventions (see the module docstring)."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp
        self.special = special_token_ids(sp)
        self.eot_id: int | None = None  # set by load_tokenizer from tokenizer_config.json
        self._pieces = _PieceTable(sp)
        self._continuation_prefix = sp.encode(TURN_END)  # [dummy `▁`..., <turn_end>], see encode()

    # special ids
    vocab_size = property(lambda self: self.sp.get_piece_size())
    eos_id = property(lambda self: self.special.eos_id)
    pad_id = property(lambda self: self.special.pad_id)
    turn_start_id = property(lambda self: self.special.turn_start_id)
    turn_end_id = property(lambda self: self.special.turn_end_id)
    newline_id = property(lambda self: self.special.newline_id)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation ends on either of these: EOS and `<turn_end>` (and the toolkit's eot_id, the toolkit's
        generate.py's second stop id, when its tokenizer configuration names one)."""
        extra = () if self.eot_id is None else (self.eot_id,)
        return frozenset((self.eos_id, self.turn_end_id, *extra))

    def encode(self, text: str, *, dummy_prefix: bool = True) -> list[int]:
        """SentencePiece ids of text after `\\n` -> `<n>`.

        dummy_prefix=True is SentencePiece's (and tamm's) own behaviour: a `▁` is added in front of the text.
        dummy_prefix=False encodes the text as it would be tokenized right after a special piece, by encoding
        `<turn_end>` + text and cutting the ids of `<turn_end>` off again.
        """
        if not isinstance(text, str):
            raise AFMError(f"text to encode must be a str, got {type(text).__name__}")
        _check_utf8(text)
        text = text.replace("\n", NEWLINE)
        if dummy_prefix:
            return self.sp.encode(text)
        ids = self.sp.encode(TURN_END + text)
        prefix = self._continuation_prefix
        assert ids[: len(prefix)] == prefix, "a user-defined piece always splits the text"
        return ids[len(prefix) :]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: SentencePiece decode (EOS/PAD vanish, `<turn_end>` stays literal), then `<n>` -> `\\n`."""
        ids = self._checked(ids)
        return self.sp.decode(ids).replace(NEWLINE, "\n")

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(self._checked([token_id])[0])

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        system: str | None = None,
    ) -> str:
        """The V6 chat template as text; see render_chat_template."""
        return render_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            response_format=response_format,
            system=system,
        )

    def encode_prompt(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        *,
        system: str | None = None,
        raw: bool = False,
        tools: Sequence[Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Prompt ids for generation, always starting with EOS.

        prompt: a user message (str) or a list of messages. Templated: `[eos] + encode(template)[1:]`, exactly
        the toolkit's strip-first-token + prepend-EOS. raw=True: prompt must be a str, no template;
        `[eos] + encode(prompt, dummy_prefix=False)`.
        """
        if raw:
            if not isinstance(prompt, str):
                raise AFMError("raw mode takes the prompt as one string, not a list of messages")
            if system is not None or tools or response_format is not None:
                raise AFMError("raw mode renders no template: system, tools and response_format do not apply")
            if not prompt:
                raise AFMError("the prompt is empty")
            return [self.eos_id] + self.encode(prompt, dummy_prefix=False)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise AFMError("the prompt is empty")
            prompt = [{"role": "user", "content": prompt}]
        text = self.apply_chat_template(prompt, tools=tools, response_format=response_format, system=system)
        return [self.eos_id] + self.encode(text)[1:]

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AFMError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {self.vocab_size}")
        return ids


# ---- streaming detokenization


class _PieceTable:
    """Per-id decoding facts, plus the two decoder switches of this model, probed from sp.decode itself.

    SentencePiece drops the leading `▁` of the first visible piece when the model adds a dummy prefix or
    removes extra whitespace; with remove_extra_whitespaces it keeps dropping while the text is still empty.
    """

    def __init__(self, sp: spm.SentencePieceProcessor):
        ids = list(range(sp.get_piece_size()))
        self.surface = sp.id_to_piece(ids)
        self.control = sp.is_control(ids)
        self.unknown = sp.is_unknown(ids)
        self.byte = [int(piece[3:5], 16) if is_byte else None for piece, is_byte in zip(self.surface, sp.is_byte(ids))]
        self.unk_surface = sp.decode([sp.unk_id()]) if sp.unk_id() >= 0 else ""
        plain = [i for i, unused in zip(ids, sp.is_unused(ids)) if not self._special(i) and not unused]
        self.strip_bos_space, self.strip_repeatedly = self._probe(sp, plain)

    def _special(self, i: int) -> bool:
        return self.control[i] or self.unknown[i] or self.byte[i] is not None

    def _probe(self, sp: spm.SentencePieceProcessor, plain: list[int]) -> tuple[bool, bool]:
        word = next((i for i in plain if len(self.surface[i]) > 1 and self.surface[i][0] == _SPACE), None)
        if word is None:
            return False, False
        strip = not sp.decode([word]).startswith(" ")
        lone_space = next((i for i in plain if self.surface[i] == _SPACE), None)
        if not strip or lone_space is None:
            return strip, False
        return strip, not sp.decode([lone_space, word]).startswith(" ")


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence a lead byte starts; 0 when it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _decode_char(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # overlong, surrogate, beyond U+10FFFF or a bad continuation byte
        return None


class StreamingDetokenizer:
    """Turns ids into text one at a time; the pieces it returns concatenate to Tokenizer.decode(ids).

    It holds back what could still change: the bytes of a byte-fallback character not yet complete, and a
    trailing `<` or `<n` that may become a newline. `add(id)` returns the newly final text (often ""),
    `finalize()` flushes the rest; `text` is everything returned so far, `tokens` every id added. Invalid byte
    sequences become U+FFFD per byte, as SentencePiece decodes them. Linear time in the number of ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pieces = tokenizer._pieces
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self._bytes = bytearray()  # the current run of byte-fallback pieces not yet decoded
        self._held = ""  # decoded text not yet handed out (a possible start of `<n>`)
        self._empty = True  # nothing decoded yet
        self._at_start = True  # SentencePiece's is_bos_ws: a leading `▁` may still be dropped
        self._bos_space_seen = False

    def add(self, token_id: int) -> str:
        """Consume one id; return the text that became final."""
        token_id = self._tokenizer._checked([token_id])[0]
        self.tokens.append(token_id)
        byte = self._pieces.byte[token_id]
        if byte is not None:
            self._bytes.append(byte)
            return self._release(self._decode_bytes(final=False))
        return self._release(self._decode_bytes(final=True) + self._piece_text(token_id))

    def finalize(self) -> str:
        """Flush everything held back (call once the last id was added)."""
        text = self._release(self._decode_bytes(final=True), final=True)
        return text

    def _piece_text(self, token_id: int) -> str:
        # SentencePiece's DecodeSentencePiece with its is_bos_ws bookkeeping.
        pieces = self._pieces
        if self._bos_space_seen or not self._empty:
            self._at_start = False
        self._bos_space_seen = False
        if pieces.control[token_id]:
            return ""
        if pieces.unknown[token_id]:
            return self._mark(pieces.unk_surface)
        piece = pieces.surface[token_id]
        if self._at_start and pieces.strip_bos_space and piece.startswith(_SPACE):
            piece = piece[1:]
            self._bos_space_seen = not pieces.strip_repeatedly
        return self._mark(piece.replace(_SPACE, " "))

    def _decode_bytes(self, final: bool) -> str:
        """Decode the complete characters of the byte run; at a run's end, each leftover byte is U+FFFD."""
        out, buf, i = [], self._bytes, 0
        while i < len(buf):
            n = _utf8_length(buf[i])
            if n and i + n > len(buf) and not final:
                break  # wait for the rest of the character
            char = _decode_char(bytes(buf[i : i + n])) if n and i + n <= len(buf) else None
            out.append(_REPLACEMENT if char is None else char)
            i += 1 if char is None else n
        del buf[:i]
        return self._mark("".join(out))

    def _mark(self, text: str) -> str:
        if text:
            self._empty = False
        return text

    def _release(self, text: str, final: bool = False) -> str:
        pending = self._held + text
        cut = len(pending)
        if not final:
            cut -= 2 if pending.endswith("<n") else 1 if pending.endswith("<") else 0
        self._held = pending[cut:]
        out = pending[:cut].replace(NEWLINE, "\n")
        self.text += out
        return out
