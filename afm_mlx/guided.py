"""Guided generation: JSON schemas, regexes, Lark grammars and tool calls, as token masks from llguidance.

What Swift's `@Generable` and the toolkit's `response_format` training ask of the model, enforced while decoding:
at every position only the tokens that keep the output inside the grammar may be drawn, so the answer always
parses. The grammar engine is llguidance (the Rust core behind llama.cpp's, vLLM's and SGLang's structured
output); this module bridges it to the AFM tokenizer and keeps one matcher in step with the emitted tokens.

    guide = make_guide(tokenizer, schema={"type": "object", ...})      # or response_format=, regex=, grammar=,
                                                                       # tools= with tool_choice=
    constraint = guide.constraint(vocab_size)                          # one matcher, for one generation
    allowed = constraint.allowed()         # bool [1, V]: the tokens that may come next
    constraint.consume([token])            # after a token is emitted (or drafted)
    constraint.rollback(n)                 # forget the last n (rejected drafts)
    guide.parse(text, tokens)              # -> the JSON value, a pydantic instance, or tool calls

The bridge, per token id: SentencePiece's `▁` is a space, `<n>` is "\\n", a byte-fallback piece `<0xAB>` is
that byte; control pieces, `<turn_start>`, `<turn_end>`, `<executable_start>` and `<executable_end>` are special
tokens (never text: the tool-call block opens and closes with the single special token, as the template writes
it). The answer ends with `<turn_end>` (llguidance's end token); EOS is allowed wherever `<turn_end>` is.
The text of a guided answer is exactly the bytes the grammar accepted (`GuidedDetokenizer`).

JSON is compiled without free whitespace, with the separators of the template's `tojson` (", " and ": "): the
shape the toolkit renders JSON in, and no room for a weak model to loop on spaces.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import llguidance
import numpy as np

from .errors import AFMError
from .tokenizer import EXECUTABLE_END, EXECUTABLE_START, TURN_END, TURN_START

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_BLOCK_OPEN = " ```function\n"  # after <executable_start>, as the template renders a call
TOOL_BLOCK_CLOSE = "```"  # before <executable_end>
_SPECIAL_PIECES = (TURN_START, TURN_END, EXECUTABLE_START, EXECUTABLE_END)


# ---- the tokenizer bridge


class TokenTable:
    """The AFM tokenizer as llguidance sees it: each id's bytes, the special ids, and the LLTokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.special = _special_ids(tokenizer)
        self.token_bytes = [_token_bytes(tokenizer, i, i in self.special) for i in range(self.vocab_size)]
        self.end_id, self.eos_id = tokenizer.turn_end_id, tokenizer.eos_id
        self.executable_start_id = tokenizer.sp.piece_to_id(EXECUTABLE_START)
        self.byte_ids = {b: i for i, b in enumerate(tokenizer._pieces.byte) if b is not None}
        self.llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(self)))


class _Wrapper:
    """What llguidance.TokenizerWrapper reads: bytes per id, the end token, and a bytes -> ids function."""

    def __init__(self, table: TokenTable):
        self.eos_token_id, self.bos_token_id = table.end_id, None
        self.tokens, self.special_token_ids = table.token_bytes, sorted(table.special)
        self._table = table

    def __call__(self, data: bytes | str) -> list[int]:
        return lossless_tokenize(self._table, data.encode("utf-8") if isinstance(data, str) else data)


def lossless_tokenize(table: TokenTable, data: bytes) -> list[int]:
    """Ids whose bytes are exactly `data`: SentencePiece's own ids when they are, else one byte piece per byte.

    llguidance tokenizes the text a grammar forces and trusts the ids to spell it; SentencePiece normalises
    whitespace (a lone " " encodes to nothing), and a mask computed from such ids allows tokens that the matcher
    then refuses (the space of JSON's ": " was lost). Text forced by a grammar follows other tokens, so it is
    encoded without the dummy-prefix space.
    """
    text = data.decode("utf-8", errors="replace")
    ids = table.tokenizer.encode(text, dummy_prefix=False)
    if b"".join(table.token_bytes[i] for i in ids) == data:
        return ids
    if len(table.byte_ids) < 256:
        raise AFMError("the tokenizer has no byte-fallback pieces: guided generation cannot spell every byte")
    return [table.byte_ids[b] for b in data]


def _special_ids(tokenizer) -> frozenset[int]:
    pieces = tokenizer._pieces
    ids = {i for i in range(tokenizer.vocab_size) if pieces.control[i] or pieces.unknown[i]}
    for piece in _SPECIAL_PIECES:
        idx = tokenizer.sp.piece_to_id(piece)
        if tokenizer.sp.id_to_piece(idx) == piece:
            ids.add(idx)
    return frozenset(ids)


def _token_bytes(tokenizer, token_id: int, special: bool) -> bytes:
    pieces = tokenizer._pieces
    if special:
        return pieces.surface[token_id].encode("utf-8")
    if pieces.byte[token_id] is not None:
        return bytes([pieces.byte[token_id]])
    if token_id == tokenizer.newline_id:
        return b"\n"
    return pieces.surface[token_id].replace("\u2581", " ").encode("utf-8")


def token_table(tokenizer) -> TokenTable:
    """The tokenizer's TokenTable, built once (~0.1 s for 8k pieces) and kept on the tokenizer."""
    table = getattr(tokenizer, "_guided_table", None)
    if table is None:
        table = tokenizer._guided_table = TokenTable(tokenizer)
    return table


# ---- grammars


@dataclass
class Guide:
    """A compiled constraint and what it means: the llguidance grammar, how to parse the answer, and what the
    prompt should say (`response_format`, `tools`) so the model knows what is asked of it."""

    kind: str  # "json", "regex", "grammar", "tools"
    grammar: str
    table: TokenTable
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    model_class: Any = None  # a pydantic model class given as schema=

    def constraint(self, vocab_size: int) -> "GrammarConstraint":
        return GrammarConstraint(self, vocab_size)

    def parse(self, text: str, tokens: Sequence[int]):
        """The answer's meaning: JSON (or a pydantic instance), or the tool calls; the text for regex/grammar."""
        if self.kind == "json":
            value = _loads(text, "the answer")
            return self.model_class.model_validate(value) if self.model_class is not None else value
        if self.kind == "tools":
            return parse_tool_calls(self.table, tokens)
        return text


def make_guide(tokenizer, *, response_format: Mapping | None = None, schema: Any = None, regex: str | None = None,
               grammar: str | None = None, tools: Sequence | None = None, tool_choice: Any = None,
               parallel_tool_calls: bool = True) -> Guide | None:
    """The Guide for at most one of response_format / schema / regex / grammar / tools; None when none is given.
    parallel_tool_calls=False allows one call per reply (OpenAI's option of that name).

    AFMError (one line, naming the problem) for an invalid or unsupported schema, regex or grammar, a malformed
    tool, or a tool_choice without tools.
    """
    given = [name for name, value in (("response_format", response_format), ("schema", schema), ("regex", regex),
                                      ("grammar", grammar), ("tools", tools)) if value is not None]
    if len(given) > 1:
        raise AFMError(f"pass only one of {', '.join(given)}: one constraint per answer")
    if (tool_choice is not None or parallel_tool_calls is not True) and tools is None:
        raise AFMError("tool_choice and parallel_tool_calls need tools")
    if not isinstance(parallel_tool_calls, bool):
        raise AFMError(f"parallel_tool_calls must be true or false, got {_short(parallel_tool_calls)}")
    if not given:
        return None
    table = token_table(tokenizer)
    if schema is not None or response_format is not None:
        guide = _json_guide(table, response_format, schema)
    elif regex is not None:
        guide = Guide("regex", _regex_grammar(regex), table)
    elif grammar is not None:
        guide = Guide("grammar", _lark_grammar(grammar), table)
    else:
        guide = _tools_guide(table, tools, tool_choice, parallel_tool_calls)
    _validate(guide)
    return guide


def _json_guide(table: TokenTable, response_format: Mapping | None, schema: Any) -> Guide:
    model_class = None
    if schema is not None:
        schema, model_class, name = _schema_of(schema)
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    schema = response_format_schema(response_format)
    grammar = _compile(lambda: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                             overrides=JSON_OPTIONS), "JSON schema")
    return Guide("json", grammar, table, response_format=dict(response_format), model_class=model_class)


def response_format_schema(response_format: Any) -> dict:
    """The JSON schema inside an OpenAI / toolkit response_format {'type': 'json_schema', 'json_schema': {...}}."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        raise AFMError(f"response_format must be {{'type': 'json_schema', 'json_schema': {{...}}}}, "
                       f"got {_short(response_format)}")
    inner = response_format.get("json_schema")
    if not isinstance(inner, Mapping) or not isinstance(inner.get("schema"), (Mapping, bool)):
        raise AFMError("response_format['json_schema'] must hold a 'schema' (a JSON schema object)")
    if not isinstance(inner.get("name", ""), str):
        raise AFMError("response_format['json_schema']['name'] must be a string")
    return inner["schema"]


def _schema_of(schema: Any) -> tuple[Any, Any, str]:
    """(JSON schema, pydantic class or None, name) from a schema dict or a pydantic model class."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema(), schema, schema.__name__
    if isinstance(schema, (Mapping, bool)):
        name = schema.get("title", "response") if isinstance(schema, Mapping) else "response"
        return schema, None, name if isinstance(name, str) else "response"
    raise AFMError(f"schema must be a JSON schema (a dict) or a pydantic model class, got {type(schema).__name__}")


def _regex_grammar(regex: Any) -> str:
    if not isinstance(regex, str) or not regex:
        raise AFMError(f"regex must be a non-empty string, got {_short(regex)}")
    return _compile(lambda: llguidance.LLMatcher.grammar_from_regex(regex), "regex")


def _lark_grammar(grammar: Any) -> str:
    if not isinstance(grammar, str) or not grammar.strip():
        raise AFMError("grammar must be a non-empty Lark grammar (a string)")
    return _compile(lambda: llguidance.LLMatcher.grammar_from_lark(grammar), "Lark grammar")


def _compile(build, what: str) -> str:
    try:
        return build()
    except (ValueError, RuntimeError, TypeError) as err:
        raise AFMError(f"invalid {what}: {_one_line(err)}") from None


def _validate(guide: Guide) -> None:
    """Check the grammar against the tokenizer; AFMError with llguidance's reason when it cannot be used, and
    for a grammar that allows no token at all (a regex that matches nothing)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(guide.grammar, guide.table.llg)
    if is_error:
        raise AFMError(f"unsupported or invalid {_WHAT[guide.kind]}: {_one_line(messages[0])}")
    if not guide.constraint(guide.table.vocab_size).can_start():
        raise AFMError(f"the {_WHAT[guide.kind]} cannot match anything")


_WHAT = {"json": "JSON schema", "regex": "regex", "grammar": "Lark grammar", "tools": "tool parameters schema"}


# ---- tool calls


def _tools_guide(table: TokenTable, tools: Any, tool_choice: Any, parallel: bool) -> Guide:
    """`<executable_start> ```function\\n[{"name": ..., "arguments": {...}}]```<executable_end>` with the JSON
    constrained to the tools' parameter schemas; `auto` lets the model answer in text instead (or first)."""
    functions = [_function_of(tool) for tool in _tool_list(tools)]
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, Mapping):
        name = _chosen_name(choice)
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise AFMError(f"tool_choice names {name!r}, which is not among the tools")
        choice = "required"
    if choice not in ("auto", "required", "none"):
        raise AFMError(f"tool_choice must be 'auto', 'required', 'none' or {{'function': {{'name': ...}}}}, "
                       f"got {_short(choice)}")
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(f) for f in functions]},
             "x-guidance": JSON_OPTIONS, **({} if parallel else {"maxItems": 1})}
    block = f'<executable_start> {json.dumps(TOOL_BLOCK_OPEN)} %json {json.dumps(calls)} ' \
            f'{json.dumps(TOOL_BLOCK_CLOSE)} <executable_end>'
    body = {"auto": "TEXT | TEXT? block", "required": "block", "none": "TEXT"}[choice]
    lark = f"start: {body}\nblock: {block}\nTEXT: /(?s:.+)/\n"
    grammar = _compile(lambda: llguidance.LLMatcher.grammar_from_lark(lark), "tools")
    return Guide("tools", grammar, table, tools=list(tools), tool_choice=tool_choice)


def _tool_list(tools: Any) -> list:
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not tools:
        raise AFMError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    return list(tools)


def _function_of(tool: Any) -> dict:
    """{'name', 'parameters'} of an OpenAI-style tool; AFMError naming what is missing."""
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping):
        raise AFMError(f"a tool must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                       f"got {_short(tool)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise AFMError(f"a tool has no name: {_short(tool)}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, (Mapping, bool)):
        raise AFMError(f"tool {name!r}: parameters must be a JSON schema object")
    return {"name": name, "parameters": parameters}


def _chosen_name(choice: Mapping) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise AFMError(f"tool_choice must name a function: {{'function': {{'name': ...}}}}, got {_short(choice)}")
    return name


def _call_schema(function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_tool_calls(table: TokenTable, tokens: Sequence[int]) -> list[dict] | None:
    """The calls of a reply's tool-call block as [{'name', 'arguments'}], or None when it has no block.

    Read from the token ids: the block is whatever follows the `<executable_start>` token (the grammar allows it
    only there), so text that merely spells the marker out is not taken for a call.
    """
    tokens = list(tokens)
    if table.executable_start_id not in tokens:
        return None
    after = tokens[tokens.index(table.executable_start_id) + 1:]
    text = b"".join(table.token_bytes[t] for t in after if t not in table.special).decode("utf-8", "replace")
    if not text.startswith(TOOL_BLOCK_OPEN) or not text.endswith(TOOL_BLOCK_CLOSE):
        raise AFMError("the tool-call block is incomplete (the token budget ran out inside it)")
    return _loads(text[len(TOOL_BLOCK_OPEN):-len(TOOL_BLOCK_CLOSE)], "the tool-call block")


def _loads(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AFMError(f"{what} is not complete JSON ({err.msg} at character {err.pos})") from None


# ---- the matcher, in step with the emitted tokens


class GrammarConstraint:
    """One llguidance matcher for one answer (batch of one row), advanced through every emitted or drafted token
    and rolled back with rejected drafts. Any token it refuses is a bug upstream: AFMError, never silence."""

    def __init__(self, guide: Guide, vocab_size: int):
        self.guide, self.table, self.vocab_size = guide, guide.table, vocab_size
        self.matcher = llguidance.LLMatcher(self.table.llg, guide.grammar, log_level=0)
        if self.matcher.is_error():
            raise AFMError(f"invalid {_WHAT[guide.kind]}: {_one_line(self.matcher.get_error())}")
        self._words = np.zeros((self.table.llg.vocab_size + 31) // 32, dtype=np.int32)
        self.consumed = 0  # tokens the matcher holds
        self._ended = 0  # stop tokens drafted after the answer ended (the matcher holds none of them)

    def can_start(self) -> bool:
        """Whether any answer at all is possible (llguidance finds out when it computes the first mask)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return not self.matcher.is_error()

    def allowed(self) -> np.ndarray:
        """bool [1, vocab_size]: the tokens that may come next."""
        out = np.zeros((1, self.vocab_size), dtype=bool)
        if self._ended or self.matcher.is_stopped():
            out[0, [self.table.end_id, self.table.eos_id]] = True
            return out
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self.matcher.is_error():
            raise AFMError(f"internal error: the grammar matcher failed ({_one_line(self.matcher.get_error())})")
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.table.vocab_size]
        out[0, : self.table.vocab_size] = bits.astype(bool)
        out[0, self.table.eos_id] |= out[0, self.table.end_id]
        return out

    def consume(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Advance through one token per row (here one row); AFMError if the grammar does not allow it."""
        for token in np.asarray(tokens).reshape(-1).tolist():
            if self._ended or self.matcher.is_stopped():
                self._check_stop(token)
                self._ended += 1
                continue
            token = self.table.end_id if token == self.table.eos_id else token
            if not self.matcher.consume_token(token):
                raise AFMError(f"internal error: the grammar matcher refused token {token} "
                               f"({_one_line(self.matcher.get_error())})")
            self.consumed += 1

    def rollback(self, counts: int | Sequence[int] | np.ndarray) -> None:
        """Forget the last n consumed tokens (per row; here one row)."""
        n = int(np.asarray(counts).reshape(-1)[0])
        ended = min(n, self._ended)
        self._ended -= ended
        if n - ended and not self.matcher.rollback(n - ended):
            raise AFMError(f"internal error: the grammar matcher cannot roll back {n - ended} tokens")
        self.consumed -= n - ended

    def _check_stop(self, token: int) -> None:
        if token not in (self.table.end_id, self.table.eos_id):
            raise AFMError(f"internal error: token {token} came after the guided answer ended")

    def detokenizer(self) -> "GuidedDetokenizer":
        return GuidedDetokenizer(self.table)


class GuidedDetokenizer:
    """Text of a guided answer: the bytes the grammar accepted, decoded as UTF-8 as they complete (the same
    add/finalize interface as the tokenizer's StreamingDetokenizer). The tool-call markers are written as the
    template writes them; the other special tokens (the end of the turn) add no text."""

    def __init__(self, table: TokenTable):
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._markers = {table.executable_start_id, table.tokenizer.sp.piece_to_id(EXECUTABLE_END)}

    def add(self, token_id: int) -> str:
        if token_id in self.table.special and token_id not in self._markers:
            return ""
        return self._utf8.decode(self.table.token_bytes[token_id])

    def finalize(self) -> str:
        return self._utf8.decode(b"", final=True)


# ---- small helpers


def _one_line(err: Any) -> str:
    """llguidance's message on one line: its first line, plus the `error: ...` line of a regex parse error."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    detail = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), "")
    return f"{lines[0]} {detail}".strip()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
