"""Text generation: chunked prefill, pipelined plain decoding or speculative decoding with the draft, stop
conditions, a context limit, prompt-cache reuse across calls, and multi-turn chat.

    model, tokenizer = afm_mlx.load()                      # model.draft is used when present
    result = afm_mlx.generate(model, tokenizer, "Tell me about the sea.", max_tokens=64)
    result.text, result.tokens, result.stats               # stats: see afm_mlx.stats.GenerationStats
    for response in afm_mlx.stream_generate(model, tokenizer, "Hi", temperature=0.7, seed=1):
        print(response.text, end="", flush=True)           # the last response carries .stats and .finish_reason

Default temperature 0 (greedy): the same prompt gives the same text, which is what one wants when evaluating a
model or an adapter and comparing runs; it is also where speculative decoding gains most. The toolkit's own
generate.py samples at temperature 1.0 with top-k 50: pass those to get its behaviour.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import mlx.core as mx

from .adapters import active_adapter, using_adapter
from .cache import KVCache
from .errors import AFMError
from .guided import make_guide
from .model import Model
from .sampling import RandomKeys, SamplingParams, mask_logits, next_token, recent_window
from .speculative import DraftLength, SpeculativeDecoder, rollback
from .stats import GenerationStats, SpeculativeStats
from .tokenizer import EXECUTABLE_START

DEFAULT_MAX_CONTEXT = 4096
KEEP_ADAPTER = object()  # stream_generate's default: generate with whichever adapter is active
DEFAULT_TEMPERATURE = 0.0
DEFAULT_NUM_DRAFT_TOKENS = 4
PREFILL_CHUNK_SIZE = 512

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int]
GUIDED_OPTIONS = ("response_format", "schema", "regex", "grammar", "tools", "tool_choice", "parallel_tool_calls")


@dataclass
class GenerationResponse:
    """One step of stream_generate: the new text and the tokens behind it; the last one also has the stats."""

    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    guided: GuidedOutput | None = None  # the last response of a guided answer: what it means


@dataclass
class GuidedOutput:
    """What a guided answer means (see afm_mlx.guided): `parsed` is the JSON value (a pydantic instance when a
    model class was given; the text for regex= / grammar=), `tool_calls` the calls [{'name', 'arguments'}] of a
    tools= answer (None: it answered in text), `content` the text before any call. `incomplete` says why there is
    no parsed value when the token budget or the context ended the answer first (nothing is closed for it)."""

    parsed: Any = None
    tool_calls: list[dict] | None = None
    content: str | None = None
    incomplete: str | None = None


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # generated ids; a stop token that ended generation is the last one
    stats: GenerationStats
    guided: GuidedOutput | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason

    parsed = property(lambda self: self.guided.parsed if self.guided else None)
    tool_calls = property(lambda self: self.guided.tool_calls if self.guided else None)
    incomplete = property(lambda self: self.guided.incomplete if self.guided else None)

    def as_message(self) -> dict:
        """The reply as a chat message, to continue the conversation (tool results follow as role 'tool')."""
        if self.tool_calls is None:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.guided.content, "tool_calls": self.tool_calls}


# ---- the prompt cache


class PromptCache:
    """The base's (and the draft's) KV caches plus the ids they hold, reused by the longest common prefix.

    Invariant between calls: the base cache holds exactly `tokens`; the draft cache a prefix of them.
    Pass one to successive generate calls (a chat does) and only the new part of each prompt is prefilled.
    """

    def __init__(self, model: Model, draft: Model | None = None):
        self.model, self.base, self.tokens = model, model.make_cache(), []
        self.adapter: str | None = None  # the adapter active when the base K/V were computed
        self.draft_model: Model | None = None
        self.draft: list[KVCache] | None = None
        if draft is not None:
            self.attach_draft(draft)

    def attach_draft(self, draft: Model) -> None:
        if draft is not self.draft_model:
            self.draft_model, self.draft = draft, draft.make_cache()

    def prefill(self, ids: list[int], chunk_size: int = PREFILL_CHUNK_SIZE) -> int:
        """Make the caches hold ids[:-1] (the last id is fed by the first decode step); returns ids reused."""
        target = list(ids[:-1])
        adapter = active_adapter(self.model)
        reused = _common_prefix(self.tokens, target) if adapter == self.adapter else 0  # LoRA changes K/V
        self.adapter = adapter
        rollback(self.base, reused)
        _prefill(self.model, self.base, target[reused:], chunk_size)
        if self.draft is not None:
            have = min(self.draft[0].offset, reused)
            rollback(self.draft, have)
            _prefill(self.draft_model, self.draft, target[have:], chunk_size)
        self.tokens = target
        return reused

    def sync(self, history: list[int]) -> None:
        """After decoding `history`: drop any K/V beyond it (in-flight work, rejected drafts) and record it."""
        length = min(self.base[0].offset, len(history))
        rollback(self.base, length)
        if self.draft is not None:
            rollback(self.draft, length)
        self.tokens = list(history[:length])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefill(model: Model, cache: list[KVCache], ids: list[int], chunk_size: int) -> None:
    if ids:
        model.prefill(mx.array([ids], dtype=mx.int32), cache, chunk_size)


# ---- token streams (each yields generated ids; `history` is extended as they come)


def plain_decode(model: Model, cache: list[KVCache], history: list[int], params: SamplingParams,
                 keys: RandomKeys, limit: int) -> Iterator[int]:
    """Up to `limit` tokens after history (the cache holds history[:-1]), one forward each, pipelined:
    step n+1 is queued (mx.async_eval) before token n is read on the host and handed out.
    """
    recent = recent_window(history, params)

    def step(x: mx.array) -> mx.array:
        nonlocal recent
        logits = model(x, cache, num_logits=1)[:, -1]
        token, _, recent = next_token(logits, params, None if params.greedy else keys.next(), recent)
        return token

    y = step(mx.array([history[-1:]], dtype=mx.int32))
    mx.async_eval(y)
    for n in range(limit):
        if n + 1 < limit:
            next_y = step(y[:, None])
            mx.async_eval(next_y)
        token = y.item()
        history.append(token)
        yield token
        if n % 256 == 255:
            mx.clear_cache()
        y = next_y if n + 1 < limit else None


def guided_decode(model: Model, cache: list[KVCache], history: list[int], params: SamplingParams,
                  keys: RandomKeys, limit: int, constraint) -> Iterator[int]:
    """plain_decode under a grammar (afm_mlx.guided): token n+1 is drawn from the masked logits, and its mask
    needs token n, so the forward that scores position n+1 is queued first and the mask computed on the host
    while the device runs it; the matcher consumes each token before it is handed out.
    """
    recent = recent_window(history, params)
    logits = model(mx.array([history[-1:]], dtype=mx.int32), cache, num_logits=1)[:, -1]
    mx.async_eval(logits)
    for n in range(limit):
        allowed = mx.array(constraint.allowed())
        y, _, recent = next_token(mask_logits(logits, allowed), params, None if params.greedy else keys.next(),
                                  recent)
        mx.async_eval(y)  # y's own evaluation: reading it below must not wait for the forward queued next
        if n + 1 < limit:
            logits = model(y[:, None], cache, num_logits=1)[:, -1]
            mx.async_eval(logits)
        token = y.item()
        constraint.consume([token])
        history.append(token)
        yield token
        if n % 256 == 255:
            mx.clear_cache()


def speculative_decode(decoder: SpeculativeDecoder, history: list[int], limit: int,
                       stop_ids: frozenset[int]) -> Iterator[int]:
    """Up to `limit` tokens (a round may overshoot; the caller stops), one verify forward per round.

    The next round is queued before this round's tokens are handed out, unless they already end generation.
    """
    round_ = decoder.start(history)
    produced = 0
    while True:
        emitted = decoder.finish(round_, history)
        history.extend(emitted)
        produced += len(emitted)
        done = produced >= limit or not stop_ids.isdisjoint(emitted)
        if not done:
            round_ = decoder.start(history)
        yield from emitted
        if done:
            return


# ---- stop strings


class StopStrings:
    """Cuts the text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str] | str | None):
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        if any(not isinstance(s, str) for s in stops):
            raise AFMError(f"stop strings must be strings, got {stops!r}")
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is final now; sets `stopped` when a stop string appeared (the text ends before it)."""
        text, self.pending = self.pending + text, ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        keep = self._partial_tail(text)
        self.pending = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _partial_tail(self, text: str) -> int:
        longest = max((len(s) for s in self.stops), default=1) - 1
        for size in range(min(longest, len(text)), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stops):
                return size
        return 0


# ---- the public API


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_context_size: int = 20,
    seed: int | None = None,
    draft_model: Model | None | bool = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    adaptive_draft: bool = False,
    system: str | None = None,
    raw: bool = False,
    stop: Sequence[str] | str | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    prompt_cache: PromptCache | None = None,
    prefill_chunk_size: int = PREFILL_CHUNK_SIZE,
    adapter: str | None | object = KEEP_ADAPTER,
    response_format: Mapping[str, Any] | None = None,
    schema: Any = None,
    regex: str | None = None,
    grammar: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = True,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` and yield GenerationResponse pieces as the text becomes final (never a broken
    UTF-8 character, never part of a stop string); the last response has `finish_reason` and `stats`.

    prompt: a user message (str, rendered with the chat template and `system`), a list of chat messages, a raw
        string with raw=True, or a list of token ids (used as they are).
    temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off; seed makes sampling
        reproducible (None: a fresh seed, reported in stats.seed).
    draft_model: a draft for speculative decoding; None uses `model.draft` when the model has one, False none.
        num_draft_tokens is k (the maximum k with adaptive_draft). The output follows the same distribution as
        plain decoding (for greedy, the same tokens).
    stop: strings that end generation (the text stops before them); EOS and `<turn_end>` always stop.
    max_context: prompt + generated tokens; a prompt that fills it is refused, generation stops at it.
    prompt_cache: reuse K/V across calls (see PromptCache); only the new part of the prompt is prefilled.
    adapter: the name of a loaded adapter (afm_mlx.adapters.load_adapter) to generate with, None for the bare
        base; by default whichever is active. The previously active one is restored afterwards.
    Guided generation (afm_mlx.guided; at most one): response_format ({'type': 'json_schema', 'json_schema':
        {'name', 'schema'}}, rendered into the prompt as the toolkit does) or schema (a JSON schema dict or a
        pydantic model class, rendered the same way); regex; grammar (Lark); tools ([{'type': 'function',
        'function': {'name', 'description', 'parameters'}}], rendered into the system turn) with tool_choice
        ('auto' | 'required' | 'none' | {'function': {'name': ...}}; parallel_tool_calls=False: at most one call
        per reply). Every token is drawn from the masked
        distribution, with and without a draft; the last response's `guided` says what the answer means.
    """
    with selected_adapter(model, adapter):
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, repetition_context_size, seed)
        _check_positive_int("max_tokens", max_tokens)
        _check_positive_int("max_context", max_context)
        _check_positive_int("prefill_chunk_size", prefill_chunk_size)
        stops = StopStrings(stop)
        draft = resolve_draft(model, draft_model)
        draft_length = DraftLength(num_draft_tokens, adaptive_draft) if draft is not None else None
        if tokenizer.vocab_size > model.args.vocab_size:
            raise AFMError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{model.args.vocab_size}: they do not belong together")
        guide = make_guide(tokenizer, response_format=response_format, schema=schema, regex=regex, grammar=grammar,
                           tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
        ids = prompt_ids(tokenizer, prompt, system=system, raw=raw, guide=guide)
        limit, limit_reason = _token_budget(len(ids), max_tokens, max_context)
        constraint = guide.constraint(model.args.vocab_size) if guide is not None else None
        if draft is not None:  # proposals past the token budget would only be thrown away
            draft_length = DraftLength(min(num_draft_tokens, limit), adaptive_draft)

        start = time.perf_counter()
        mx.reset_peak_memory()
        cache = prompt_cache if prompt_cache is not None else PromptCache(model)
        if draft is not None:
            cache.attach_draft(draft)
        keys = RandomKeys(params.seed)
        stats = GenerationStats(prompt_tokens=len(ids), seed=keys.seed)
        stats.cached_prompt_tokens = cache.prefill(ids, prefill_chunk_size)
        stats.prefill_s = time.perf_counter() - start
        history = list(ids)
        if draft is None:
            tokens = (plain_decode(model, cache.base, history, params, keys, limit) if constraint is None else
                      guided_decode(model, cache.base, history, params, keys, limit, constraint))
        else:
            stats.speculative = SpeculativeStats(num_draft_tokens)
            decoder = SpeculativeDecoder(model, draft, cache.base, cache.draft, params, keys, draft_length,
                                         stats.speculative, constraint)
            tokens = speculative_decode(decoder, history, limit, tokenizer.stop_ids)
        detokenizer = constraint.detokenizer() if constraint is not None else tokenizer.detokenizer()
        text = []
        try:
            for response in _responses(tokenizer, detokenizer, tokens, stops, stats, start, limit, limit_reason):
                text.append(response.text)
                yield response
        finally:
            tokens.close()
            cache.sync(history)
        if draft is not None:
            stats.speculative.draft_s, stats.speculative.verify_s = decoder.timer.split(stats.decode_s)
        guided = interpret_guided(guide, "".join(text), history[len(ids):], stats) if guide is not None else None
        yield GenerationResponse("", [], stats.finish_reason, stats, guided)


@contextmanager
def selected_adapter(model: Model, adapter) -> Iterator[None]:
    """`using_adapter(model, adapter)` unless adapter is KEEP_ADAPTER (then whichever is active stays)."""
    if adapter is KEEP_ADAPTER:
        yield
    else:
        with using_adapter(model, adapter):
            yield


def _responses(tokenizer, detokenizer, tokens: Iterator[int], stops: StopStrings, stats: GenerationStats,
               start: float, limit: int, limit_reason: str) -> Iterator[GenerationResponse]:
    """Detokenize the token stream and apply the stop conditions; fills the decode stats at the end."""
    stop_ids = tokenizer.stop_ids
    finish, count = None, 0
    for token in tokens:
        count += 1
        if count == 1:
            stats.ttft_s = time.perf_counter() - start
        if token in stop_ids:
            finish = "stop"
            yield GenerationResponse("", [token])
            break
        text = stops.feed(detokenizer.add(token))
        yield GenerationResponse(text, [token])
        if stops.stopped:
            finish = "stop"
            break
        if count >= limit:
            finish = limit_reason
            break
    stats.decode_s = time.perf_counter() - start - stats.prefill_s
    stats.generated_tokens, stats.finish_reason = count, finish
    stats.peak_memory_bytes = mx.get_peak_memory()
    if not stops.stopped:
        tail = stops.feed(detokenizer.finalize())
        tail += "" if stops.stopped else stops.flush()
        if tail:
            yield GenerationResponse(tail, [])


def interpret_guided(guide, text: str, generated: list[int], stats: GenerationStats) -> GuidedOutput:
    """What a finished guided answer means; for one the budget cut short, why it has no meaning."""
    if stats.finish_reason != "stop" or (generated and generated[-1] not in guide.table.tokenizer.stop_ids):
        limit = "max_tokens" if stats.finish_reason == "length" else "max_context" if stats.finish_reason == "context" \
            else "a stop string"
        return GuidedOutput(incomplete=f"the answer is incomplete: {limit} ended it before the "
                                       f"{_GUIDED_WHAT[guide.kind]} was complete")
    if guide.kind != "tools":
        return GuidedOutput(parsed=guide.parse(text, generated))
    calls = guide.parse(text, generated)
    content = text if calls is None else text[: text.find(EXECUTABLE_START)]
    return GuidedOutput(tool_calls=calls, content=content)


_GUIDED_WHAT = {"json": "JSON", "regex": "regex match", "grammar": "grammar's sentence", "tools": "tool call"}


def generate(model: Model, tokenizer, prompt: Prompt, **options) -> GenerationResult:
    """Generate and return the whole text; options as for stream_generate. A guided answer's meaning is in
    result.parsed / result.tool_calls (None, with result.incomplete saying why, when the budget cut it short)."""
    pieces, tokens, stats, guided = [], [], None, None
    for response in stream_generate(model, tokenizer, prompt, **options):
        pieces.append(response.text)
        tokens += response.tokens
        stats = response.stats or stats
        guided = response.guided or guided
    return GenerationResult("".join(pieces), tokens, stats, guided)


def resolve_draft(model: Model, draft_model: Model | None | bool) -> Model | None:
    """The draft to use: the one given, `model.draft` for None, no draft for False. Checks the vocabulary."""
    from .loading import check_draft_compatible

    if draft_model is False:
        return None
    draft = getattr(model, "draft", None) if draft_model is None or draft_model is True else draft_model
    if draft is not None:
        check_draft_compatible(model, draft)
    return draft


def prompt_ids(tokenizer, prompt: Prompt, *, system: str | None = None, raw: bool = False,
               guide=None) -> list[int]:
    """Token ids of a prompt: a list of ints is taken as ids; anything else goes through the tokenizer.

    A guide's response_format and tools are rendered into a templated prompt, as the toolkit trains on them; a
    prompt given as ids or raw text is taken as it is (the constraint still applies).
    """
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        if system is not None or raw:
            raise AFMError("a prompt given as token ids takes no system message and no raw flag")
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise AFMError(f"prompt token id {bad[0]} is outside the vocabulary of {tokenizer.vocab_size}")
        return list(prompt)
    if raw or guide is None:
        return tokenizer.encode_prompt(prompt, system=system, raw=raw)
    return tokenizer.encode_prompt(prompt, system=system, tools=guide.tools, response_format=guide.response_format)


def _token_budget(prompt_tokens: int, max_tokens: int, max_context: int) -> tuple[int, str]:
    room = max_context - prompt_tokens
    if room < 1:
        raise AFMError(f"the prompt is {prompt_tokens} tokens, which leaves no room under the context limit of "
                       f"{max_context} tokens: shorten it or raise the limit (max_context / --max-context)")
    return (max_tokens, "length") if max_tokens <= room else (room, "context")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AFMError(f"{name} must be an integer >= 1, got {value!r}")


# ---- chat


def user_turn_ids(tokenizer, message: str, response_format: Mapping[str, Any] | None = None) -> list[int]:
    """Ids of `<turn_start> user<n>{message}<turn_end><turn_start> assistant<n>`, as they follow a `<turn_end>`
    (with a response_format rendered into the message as the template does)."""
    opening = tokenizer.apply_chat_template([{"role": "system", "content": ""}], add_generation_prompt=False)
    full = tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": message}],
                                         response_format=response_format)
    return tokenizer.encode(full[len(opening):], dummy_prefix=False)


class ChatSession:
    """A multi-turn conversation that keeps its KV caches: each turn prefills only its own new tokens.

    The conversation is kept as ids (the reply exactly as generated, closed with `<turn_end>`), so the cache
    always holds a prefix of the next prompt. Options as for stream_generate (temperature, max_tokens, ...); a
    guided option (schema=, tools=, ...) applies to every reply, its response_format / tools rendered as
    stream_generate renders them.
    """

    def __init__(self, model: Model, tokenizer, *, system: str | None = None, draft_model=None, **options):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        draft = resolve_draft(model, draft_model)
        self.options = dict(options, draft_model=draft if draft is not None else False)
        guided = {name: options[name] for name in GUIDED_OPTIONS if name in options}
        self.guide = make_guide(tokenizer, **guided)
        self.cache = PromptCache(model, draft)
        self.history: list[int] = []

    def send(self, message: str) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message."""
        if not isinstance(message, str) or not message.strip():
            raise AFMError("the message is empty")
        response_format = self.guide.response_format if self.guide is not None else None
        if self.history:
            ids = self.history + user_turn_ids(self.tokenizer, message, response_format)
        else:
            ids = self.tokenizer.encode_prompt(message, system=self.system, response_format=response_format,
                                               tools=self.guide.tools if self.guide is not None else None)
        reply: list[int] | None = None  # None until generation started (a refused prompt changes nothing)
        try:
            for response in stream_generate(self.model, self.tokenizer, ids, prompt_cache=self.cache,
                                            **self.options):
                reply = [] if reply is None else reply
                reply += response.tokens
                yield response
        finally:
            if reply is not None:
                while reply and reply[-1] in self.tokenizer.stop_ids:
                    reply.pop()
                self.history = ids + reply + [self.tokenizer.turn_end_id]

    def reset(self) -> None:
        self.history = []
