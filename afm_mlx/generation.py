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

from .adapters import active_adapter, list_adapters, load_adapter, set_active_adapter, using_adapter
from .cache import KVCache
from .errors import AFMError
from .model import Model
from .sampling import RandomKeys, SamplingParams, apply_repetition_penalty, sample_token
from .speculative import DraftLength, SpeculativeDecoder, rollback
from .stats import GenerationStats, SpeculativeStats

DEFAULT_MAX_CONTEXT = 4096
KEEP_ADAPTER = object()  # stream_generate's default: generate with whichever adapter is active
DEFAULT_TEMPERATURE = 0.0
DEFAULT_NUM_DRAFT_TOKENS = 4
PREFILL_CHUNK_SIZE = 512

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int]


@dataclass
class GenerationResponse:
    """One step of stream_generate: the new text and the tokens behind it; the last one also has the stats."""

    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # generated ids; a stop token that ended generation is the last one
    stats: GenerationStats

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason


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
    recent = _recent_window(history, params)

    def step(x: mx.array) -> mx.array:
        nonlocal recent
        logits = model(x, cache, num_logits=1)[:, -1]
        if recent is not None:
            logits = apply_repetition_penalty(logits, recent, params.repetition_penalty)
        token, _ = sample_token(logits, params, None if params.greedy else keys.next())
        if recent is not None:
            recent = mx.concatenate([recent[:, 1:], token[:, None]], axis=1)
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


def _recent_window(history: list[int], params: SamplingParams) -> mx.array | None:
    """The repetition-penalty window [1, C] ending with the newest token (-1 pads), or None without a penalty."""
    if params.repetition_penalty == 1.0:
        return None
    size = params.repetition_context_size
    return mx.array([[-1] * max(size - len(history), 0) + history[-size:]], dtype=mx.int32)


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
        ids = prompt_ids(tokenizer, prompt, system=system, raw=raw)
        limit, limit_reason = _token_budget(len(ids), max_tokens, max_context)
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
            tokens = plain_decode(model, cache.base, history, params, keys, limit)
        else:
            stats.speculative = SpeculativeStats(num_draft_tokens)
            decoder = SpeculativeDecoder(model, draft, cache.base, cache.draft, params, keys, draft_length,
                                         stats.speculative)
            tokens = speculative_decode(decoder, history, limit, tokenizer.stop_ids)
        try:
            yield from _responses(tokenizer, tokens, stops, stats, start, limit, limit_reason)
        finally:
            tokens.close()
            cache.sync(history)
        if draft is not None:
            stats.speculative.draft_s, stats.speculative.verify_s = decoder.timer.split(stats.decode_s)
        yield GenerationResponse("", [], stats.finish_reason, stats)


@contextmanager
def selected_adapter(model: Model, adapter) -> Iterator[None]:
    """`using_adapter(model, adapter)` unless adapter is KEEP_ADAPTER (then whichever is active stays)."""
    if adapter is KEEP_ADAPTER:
        yield
    else:
        with using_adapter(model, adapter):
            yield


def _responses(tokenizer, tokens: Iterator[int], stops: StopStrings, stats: GenerationStats, start: float,
               limit: int, limit_reason: str) -> Iterator[GenerationResponse]:
    """Detokenize the token stream and apply the stop conditions; fills the decode stats at the end."""
    detokenizer, stop_ids = tokenizer.detokenizer(), tokenizer.stop_ids
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


def generate(model: Model, tokenizer, prompt: Prompt, **options) -> GenerationResult:
    """Generate and return the whole text; options as for stream_generate."""
    pieces, tokens, stats = [], [], None
    for response in stream_generate(model, tokenizer, prompt, **options):
        pieces.append(response.text)
        tokens += response.tokens
        stats = response.stats or stats
    return GenerationResult("".join(pieces), tokens, stats)


def resolve_draft(model: Model, draft_model: Model | None | bool) -> Model | None:
    """The draft to use: the one given, `model.draft` for None, no draft for False. Checks the vocabulary."""
    from .loading import check_draft_compatible

    if draft_model is False:
        return None
    draft = getattr(model, "draft", None) if draft_model is None or draft_model is True else draft_model
    if draft is not None:
        check_draft_compatible(model, draft)
    return draft


def prompt_ids(tokenizer, prompt: Prompt, *, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of a prompt: a list of ints is taken as ids; anything else goes through the tokenizer."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        if system is not None or raw:
            raise AFMError("a prompt given as token ids takes no system message and no raw flag")
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise AFMError(f"prompt token id {bad[0]} is outside the vocabulary of {tokenizer.vocab_size}")
        return list(prompt)
    return tokenizer.encode_prompt(prompt, system=system, raw=raw)


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


def user_turn_ids(tokenizer, message: str) -> list[int]:
    """Ids of `<turn_start> user<n>{message}<turn_end><turn_start> assistant<n>`, as they follow a `<turn_end>`."""
    opening = tokenizer.apply_chat_template([{"role": "system", "content": ""}], add_generation_prompt=False)
    full = tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": message}])
    return tokenizer.encode(full[len(opening):], dummy_prefix=False)


class ChatSession:
    """A multi-turn conversation that keeps its KV caches: each turn prefills only its own new tokens.

    The conversation is kept as ids (the reply exactly as generated, closed with `<turn_end>`), so the cache
    always holds a prefix of the next prompt. Options as for stream_generate (temperature, max_tokens, ...).
    """

    def __init__(self, model: Model, tokenizer, *, system: str | None = None, draft_model=None, **options):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        draft = resolve_draft(model, draft_model)
        self.options = dict(options, draft_model=draft if draft is not None else False)
        self.cache = PromptCache(model, draft)
        self.history: list[int] = []

    def send(self, message: str) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to one user message."""
        if not isinstance(message, str) or not message.strip():
            raise AFMError("the message is empty")
        if self.history:
            ids = self.history + user_turn_ids(self.tokenizer, message)
        else:
            ids = self.tokenizer.encode_prompt(message, system=self.system)
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


# ---- command-line front ends (afm-mlx generate / chat call these)


def load_for_generation(model_dir: str | None, draft_dir: str | None, no_draft: bool,
                        adapters: Sequence[str] = (), allow_signature_mismatch: bool = False):
    """(model, tokenizer) for the CLI: the embedded demo model by default, its `draft/` unless told otherwise.

    adapters: `PATH` or `NAME=PATH` specs, all loaded (base weights stay shared), the first one active.
    """
    from pathlib import Path

    from .loading import DEMO_MODEL_DIR, load

    root = Path(model_dir) if model_dir is not None else DEMO_MODEL_DIR
    if model_dir is None and not (root / "config.json").is_file():
        raise AFMError(f"the embedded demo model is not installed ({root} is missing): pass --model DIR "
                       "(a directory written by `afm-mlx convert`)")
    if no_draft and draft_dir is not None:
        raise AFMError("--draft and --no-draft exclude each other")
    if draft_dir is not None and not Path(draft_dir).is_dir():
        raise AFMError(f"draft directory not found: {draft_dir}")
    model, tokenizer = load(root, draft=False if no_draft else draft_dir)  # None: MODEL/draft when present
    names = [load_adapter(model, path, name, allow_signature_mismatch=allow_signature_mismatch)
             for name, path in map(parse_adapter_spec, adapters)]
    if names:
        set_active_adapter(model, names[0])
    return model, tokenizer


def parse_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a bare `PATH` -> (None, PATH): the name comes from the file name."""
    name, sep, path = spec.partition("=")
    if not sep:
        return None, spec
    if not name or not path:
        raise AFMError(f"--adapter {spec!r}: expected NAME=PATH or PATH")
    return name, path


def print_stream(responses: Iterator[GenerationResponse], out, err, show_stats: bool) -> GenerationStats:
    """Write the text to `out` as it comes (flushed), a final newline, and the stats to `err` if asked."""
    text_end, stats = "\n", None
    for response in responses:
        if response.text:
            out.write(response.text)
            out.flush()
            text_end = response.text[-1]
        stats = response.stats or stats
    if text_end != "\n":
        out.write("\n")
    out.flush()  # before the stats: on a terminal stdout and stderr interleave
    if show_stats and stats is not None:
        err.write(stats.summary() + "\n")
    return stats


def chat_loop(session: ChatSession, lines: Iterator[str], out, err, show_stats: bool, interactive: bool) -> None:
    """One user message per line; `/reset` forgets the conversation, `/adapter NAME|none` switches adapters
    (the conversation stays; its K/V are recomputed under the new adapter), `/exit` (or end of input) leaves.

    An AFMError in a turn (e.g. the conversation outgrew the context) is printed and the chat goes on.
    """
    prompt = lambda: err.write("> ") if interactive else None  # noqa: E731
    prompt()
    for line in lines:
        message = line.rstrip("\n")
        if message.strip() == "/exit":
            return
        if message.strip() == "/reset":
            session.reset()
        elif message.startswith("/adapter"):
            switch_adapter(session.model, message[len("/adapter"):].strip(), err)
        elif message.strip():
            try:
                print_stream(session.send(message), out, err, show_stats)
            except AFMError as e:
                err.write(f"error: {e}\n")
        prompt()


def switch_adapter(model: Model, name: str, err) -> None:
    """The chat's `/adapter NAME` (or `none`): a warm switch, the base weights stay where they are."""
    loaded = list_adapters(model)
    try:
        set_active_adapter(model, None if name in ("", "none") else name)
        err.write(f"adapter: {active_adapter(model) or 'none'} (loaded: {', '.join(loaded) or 'none'})\n")
    except AFMError as e:
        err.write(f"error: {e}\n")


def check_options(options: dict) -> None:
    """Validate generation options before a model is loaded (bad flags fail fast, with one line)."""
    sampling = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    SamplingParams(**{name: options[name] for name in sampling if name in options})
    for name in ("max_tokens", "max_context", "num_draft_tokens"):
        if name in options:
            _check_positive_int(name, options[name])


def read_prompt(prompt: str | None, stdin) -> str:
    """The PROMPT argument, or stdin when it is piped (one trailing newline dropped)."""
    if prompt is not None:
        return prompt
    if stdin.isatty():
        raise AFMError("no prompt: pass it as an argument or pipe it on stdin")
    text = stdin.read()
    return text[:-1] if text.endswith("\n") else text


def run_generate(prompt: str | None, *, model_dir, draft_dir, no_draft: bool, show_stats: bool, options: dict,
                 stdin, out, err, adapters: Sequence[str] = (), allow_signature_mismatch: bool = False) -> None:
    """`afm-mlx generate`: validate, load, stream the text to `out` and the stats to `err`."""
    check_options(options)
    prompt = read_prompt(prompt, stdin)
    if not prompt.strip():
        raise AFMError("the prompt is empty")
    model, tokenizer = load_for_generation(model_dir, draft_dir, no_draft, adapters, allow_signature_mismatch)
    print_stream(stream_generate(model, tokenizer, prompt, **options), out, err, show_stats)


def run_chat(*, model_dir, draft_dir, no_draft: bool, show_stats: bool, system: str | None, options: dict,
             stdin, out, err, adapters: Sequence[str] = (), allow_signature_mismatch: bool = False) -> None:
    """`afm-mlx chat`: a multi-turn conversation over stdin lines, replies streamed to `out`."""
    check_options(options)
    model, tokenizer = load_for_generation(model_dir, draft_dir, no_draft, adapters, allow_signature_mismatch)
    session = ChatSession(model, tokenizer, system=system, **options)
    interactive = stdin.isatty()
    if interactive:
        err.write("Chat with the model: one message per line; /reset starts over, /adapter NAME|none "
                  "switches adapters, /exit or Ctrl-D leaves.\n")
    chat_loop(session, iter(stdin.readline, ""), out, err, show_stats, interactive)
