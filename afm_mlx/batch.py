"""Continuous batching: many sequences decoded in one forward per step, joining and leaving between steps.

    results = afm_mlx.batch_generate(model, tokenizer, ["Hi", "Tell me about the sea."], max_tokens=64)
    batch = BatchGenerator(model, tokenizer, max_batch=32)       # the scheduler under it (and under the server)
    uid = batch.submit(BatchRequest(ids, SamplingParams(temperature=0.7, seed=1), max_tokens=64, adapter="mail"))
    while batch.busy:
        for uid, response in batch.step(): ...                    # GenerationResponse pieces, as stream_generate's

Each row has its own position, sampling parameters, key stream, stop strings, token budget and adapter. Joining
rows (up to prefill_batch per step) are prefilled together, one forward per group of similar length, each after
its cached prompt prefix where one matches, then join the batch: `BatchKVCache` holds every row's K/V in one buffer
[B, KV, S_alloc, D] with a length per row, RoPE takes the per-row positions, and attention masks each row's slots
past its own length. Leaving rows are dropped from the buffer between steps (one gather). Decoding is pipelined as
in `plain_decode`: step n + 1 is queued before step n's tokens are read, so a row that just finished costs one
wasted row-step.

At temperature 0 a row's tokens equal the same request run alone (`tests/test_batch.py`), and at T > 0 with a
seed too: each row draws from its own key stream exactly as `plain_decode` does.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx

from .adapters import list_adapters, using_row_adapters
from .batch_speculative import BatchDrafter, speculative_round
from .cache import KVCache
from .errors import AFMError
from .generation import (DEFAULT_MAX_CONTEXT, PREFILL_CHUNK_SIZE, GenerationResponse, GenerationResult, Prompt,
                         GUIDED_OPTIONS, StopStrings, _check_positive_int, _token_budget,
                         interpret_guided, prompt_ids, resolve_draft)
from .guided import Guide, make_guide
from .model import Model
from .prefix_cache import PrefixCache
from .sampling import RandomKeys, SamplingParams, mask_logits, next_token, recent_window
from .speculative import DraftLength
from .stats import GenerationStats, SpeculativeStats


# joining rows prefill together while padding adds at most this fraction: on a CPU a padded position costs as much as
# a real one, on a GPU extra rows in one forward are nearly free
PREFILL_PADDING = 0.125

# ---- the batched cache


class BatchKVCache:
    """One regular layer's K/V for a batch: keys/values [B, KV, S_alloc, D], row b valid up to lengths[b].

    The model's layers use it as a KVCache: `offset` (int32 [B], each row's next position) drives RoPE, `append`
    writes each row's new K/V at its own offset, and a history whose length is an array makes `kv.attend` mask
    per row. Rows are added from per-sequence KVCaches and removed by index between steps.
    """

    step = 32

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.lengths: list[int] = []
        self.offset = _offsets(())

    def append(self, keys: mx.array, values: mx.array) -> None:
        """keys/values [B, KV, L, D] at positions lengths[b] .. lengths[b] + L - 1 of each row."""
        new = keys.shape[2]
        self._reserve(max(self.lengths) + new)
        index = mx.broadcast_to((self.offset[:, None] + mx.arange(new))[:, None, :, None], keys.shape)
        self.keys = mx.put_along_axis(self.keys, index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, index, values, axis=2)
        self._set_lengths([n + new for n in self.lengths])

    def add_rows(self, caches: list[KVCache], like: mx.array) -> None:
        """Append rows holding these single-sequence caches (B = 1 each; `like`: a [1, KV, 1, D] K/V template)."""
        lengths = self.lengths + [c.offset for c in caches]
        size = _round_up(max(lengths) + 1, self.step)
        parts = [] if self.keys is None else [(_pad(self.keys, size), _pad(self.values, size))]
        for c in caches:
            k, v = c.state or (like[:, :, :0], like[:, :, :0])
            parts.append((_pad(k, size), _pad(v, size)))
        self.keys = mx.concatenate([k for k, _ in parts], axis=0)
        self.values = mx.concatenate([v for _, v in parts], axis=0)
        self._set_lengths(lengths)

    def extend(self, other: "BatchKVCache") -> None:
        """Append the rows of another batch cache (after this one's)."""
        if other.keys is None:
            return
        if self.keys is not None:
            size = max(self.keys.shape[2], other.keys.shape[2])
            keys = mx.concatenate([_pad(self.keys, size), _pad(other.keys, size)])
            values = mx.concatenate([_pad(self.values, size), _pad(other.values, size)])
        else:
            keys, values = other.keys, other.values
        self.keys, self.values = keys, values
        self._set_lengths(self.lengths + other.lengths)

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        return () if self.keys is None else (self.keys, self.values)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); the buffer shrinks to what the longest kept row needs."""
        lengths = [self.lengths[r] for r in rows]
        if not rows:
            self.__init__()
            return
        size = min(self.keys.shape[2], _round_up(max(lengths) + 1, self.step))
        index = mx.array(rows, dtype=mx.int32)
        self.keys, self.values = self.keys[index, :, :size], self.values[index, :, :size]
        self._set_lengths(lengths)

    def trim_rows(self, counts: list[int]) -> None:
        """Forget the last counts[b] positions of each row (per-row speculative rollback; slots stay, masked)."""
        self._set_lengths([n - min(max(c, 0), n) for n, c in zip(self.lengths, counts)])

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _reserve(self, needed: int) -> None:
        if needed > self.keys.shape[2]:
            size = _round_up(needed, self.step)
            self.keys, self.values = _pad(self.keys, size), _pad(self.values, size)

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.offset = _offsets(tuple(lengths))


_last_offsets: tuple = ((), mx.array([], dtype=mx.int32))


def _offsets(lengths: tuple[int, ...]) -> mx.array:
    """The int32 [B] array of these lengths, one object for every layer of a step."""
    global _last_offsets
    if _last_offsets[0] != lengths:
        _last_offsets = (lengths, mx.array(lengths, dtype=mx.int32))
    return _last_offsets[1]


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


def _pad(x: mx.array, size: int) -> mx.array:
    """x [B, KV, S, D] zero-padded (or cut) to S = size."""
    if x.shape[2] >= size:
        return x[:, :, :size]
    return mx.pad(x, [(0, 0), (0, 0), (0, size - x.shape[2]), (0, 0)])


def kv_template(model: Model) -> mx.array:
    """A [1, KV, 1, D] array of the dtype the model caches (int8 codes under kv-quant, else its float dtype)."""
    attn = model.model.layers[0].self_attn
    args = model.args
    proj = attn.qkv_proj.linear if hasattr(attn.qkv_proj, "linear") else attn.qkv_proj
    dtype = mx.int8 if attn.kv_quant else (proj["scales"] if "scales" in proj else proj["weight"]).dtype
    return mx.zeros((1, args.num_kv_heads, 1, args.head_dim), dtype=dtype)


# ---- requests and rows


@dataclass
class BatchRequest:
    """One sequence to generate: prompt ids and how to decode them (options as for stream_generate)."""

    ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: Sequence[str] | str | None = None
    adapter: str | None = None
    max_context: int = DEFAULT_MAX_CONTEXT
    top_logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's and the n best
    guide: Guide | None = None  # afm_mlx.guided: every token drawn inside its grammar (the ids already render it)
    num_draft_tokens: int = 0  # k > 0: speculative rounds with the batch's draft (afm_mlx.batch_speculative)


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log-softmax of the raw logits (before temperature and filters), as OpenAI reports them
    top: list[tuple[int, float]]  # the best ids and their logprobs, best first


@dataclass
class BatchResponse(GenerationResponse):
    """A GenerationResponse with the logprobs of its tokens (empty unless the request asked)."""

    logprobs: list[TokenLogprob] = field(default_factory=list)


class Row:
    """A sequence in the batch: its history, key stream, penalty window and the text it has produced."""

    def __init__(self, uid: int, request: BatchRequest, tokenizer, limit: int, limit_reason: str):
        self.uid, self.request, self.params = uid, request, request.params
        self.keys = RandomKeys(request.params.seed)
        self.history = list(request.ids)
        self.recent = recent_window(self.history, self.params)
        self.constraint = request.guide.constraint(tokenizer.vocab_size) if request.guide is not None else None
        self.stops, self.stop_ids = StopStrings(request.stop), tokenizer.stop_ids
        self.detokenizer = self.constraint.detokenizer() if self.constraint is not None else tokenizer.detokenizer()
        self.text: list[str] = []  # a guided row's text, to say what it means at the end
        self.limit, self.limit_reason = limit, limit_reason
        self.k = min(request.num_draft_tokens, limit)  # proposals past the budget would be thrown away
        self.stats = GenerationStats(prompt_tokens=len(request.ids), seed=self.keys.seed)
        if self.k:
            self.stats.speculative = SpeculativeStats(self.k)
        self.start = time.perf_counter()
        self.finished = False

    @property
    def simple(self) -> bool:
        """Greedy without a penalty or a grammar: its token is the batch argmax's, no per-row work."""
        return self.params.greedy and self.recent is None and self.constraint is None

    def sample(self, logits: mx.array) -> mx.array:
        """This row's next token [1] from its logits [1, V], as plain_decode (or guided_decode) draws it: the same
        keys in the same order, the grammar's mask first."""
        if self.constraint is not None:
            logits = mask_logits(logits, self.allowed(logits.shape[-1]))
        token, _, self.recent = next_token(logits, self.params, None if self.params.greedy else self.keys.next(),
                                           self.recent)
        return token

    def allowed(self, width: int) -> mx.array:
        """The grammar's mask of the next token, [1, width] (bool)."""
        return mx.array(self.constraint.allowed()[:, :width])

    def feed(self, token: int, logprob: TokenLogprob | None = None) -> list[BatchResponse]:
        """Take one generated token; the pieces of text it makes final (the last one closes the row)."""
        if self.constraint is not None:
            self.constraint.consume([token])
        self.history.append(token)
        stats = self.stats
        stats.generated_tokens += 1
        if stats.generated_tokens == 1:
            stats.ttft_s = time.perf_counter() - self.start
        if token in self.stop_ids:
            return [self._piece("", [token], logprob)] + self._close("stop", final_text=False)
        out = [self._piece(self.stops.feed(self.detokenizer.add(token)), [token], logprob)]
        if self.stops.stopped:
            return out + self._close("stop", final_text=False)
        if stats.generated_tokens >= self.limit:
            return out + self._close(self.limit_reason)
        return out

    def cancel(self) -> list[BatchResponse]:
        return self._close("cancelled", final_text=False)

    def _piece(self, text: str, tokens: list[int], logprob: TokenLogprob | None) -> BatchResponse:
        self.text.append(text)
        return BatchResponse(text, tokens, logprobs=[logprob] if logprob is not None else [])

    def _close(self, reason: str, final_text: bool = True) -> list[BatchResponse]:
        self.finished = True
        stats = self.stats
        stats.finish_reason = reason
        stats.decode_s = time.perf_counter() - self.start - stats.prefill_s
        tail = ""
        if final_text:
            tail = self.stops.feed(self.detokenizer.finalize())
            tail += "" if self.stops.stopped else self.stops.flush()
            stats.finish_reason = "stop" if self.stops.stopped else reason
        self.text.append(tail)
        guided = None
        if self.constraint is not None:
            generated = self.history[len(self.request.ids):]
            guided = interpret_guided(self.request.guide, "".join(self.text), generated, stats)
        return [BatchResponse(tail, [], stats.finish_reason, stats, guided)]


# ---- the scheduler


class BatchGenerator:
    """Runs every admitted sequence one token per step in one batched forward (see the module docstring).

    Not thread-safe: one thread calls submit / cancel / step (afm_mlx.engine puts it behind a queue).
    """

    def __init__(self, model: Model, tokenizer, *, max_batch: int = 32, prefill_batch: int = 8,
                 prefill_chunk_size: int = PREFILL_CHUNK_SIZE, prefix_cache: PrefixCache | None = None,
                 draft: Model | None = None):
        _check_positive_int("max_batch", max_batch)
        _check_positive_int("prefill_batch", prefill_batch)
        self.model, self.tokenizer, self.max_batch, self.prefill_batch = model, tokenizer, max_batch, prefill_batch
        self.prefill_chunk_size, self.prefix_cache = prefill_chunk_size, prefix_cache
        self.cache = [BatchKVCache() for _ in model.model.layers]
        self.template = kv_template(model)
        # the draft for rows that ask for speculative rounds (BatchRequest.num_draft_tokens > 0)
        self.drafter = BatchDrafter(draft, BatchKVCache, kv_template(draft)) if draft is not None else None
        self.rows: list[Row] = []  # batch order: row b of the caches and of the in-flight tokens
        self.waiting: deque[Row] = deque()
        self.in_flight: tuple[mx.array, mx.array | None] | None = None  # (tokens [B], logprobs) of the last step
        self._uid = 0

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def check(self, request: BatchRequest) -> tuple[int, str]:
        """AFMError if the request cannot run (over the context, a bad id, an unknown adapter); else its token
        budget and the finish reason at it. Reads nothing the step changes: any thread may call it."""
        _check_positive_int("max_tokens", request.max_tokens)
        _check_positive_int("max_context", request.max_context)
        if not request.ids or not all(0 <= t < self.tokenizer.vocab_size for t in request.ids):
            raise AFMError("the prompt must be a non-empty list of ids inside the vocabulary")
        loaded = list_adapters(self.model)
        if request.adapter is not None and request.adapter not in loaded:
            raise AFMError(f"no adapter named {request.adapter!r} is loaded (loaded: {', '.join(loaded) or 'none'})")
        if request.num_draft_tokens:
            self._check_speculative(request)
        return _token_budget(len(request.ids), request.max_tokens, request.max_context)

    def _check_speculative(self, request: BatchRequest) -> None:
        DraftLength(request.num_draft_tokens)  # an integer in 1..MAX_DRAFT_TOKENS
        if self.drafter is None:
            raise AFMError("num_draft_tokens needs a draft model: this batch was made without one")

    def submit(self, request: BatchRequest) -> int:
        """Queue a request (checked first, see `check`); returns its id."""
        limit, reason = self.check(request)
        self._uid += 1
        self.waiting.append(Row(self._uid, request, self.tokenizer, limit, reason))
        return self._uid

    def cancel(self, uid: int) -> list[BatchResponse]:
        """Stop a request now: a waiting one never starts, a running one leaves the batch at the next step."""
        for row in [*self.waiting, *self.rows]:
            if row.uid == uid and not row.finished:
                if row in self.waiting:
                    self.waiting.remove(row)
                return row.cancel()
        return []

    def step(self) -> list[tuple[int, BatchResponse]]:
        """Drop finished rows, admit waiting ones, queue one decode step, hand out the previous step's tokens.

        With a guided row in the batch, the step's forward is queued first, then the previous tokens are read (each
        guided row's matcher takes its token), then the draws are queued under the grammars' masks: the masks are
        computed on the host while the device runs the forward.
        """
        self._drop_finished()
        joined = self._admit()
        previous, previous_rows = self.in_flight, list(self.rows[: len(self.rows) - len(joined)])
        if not self.rows:
            self.in_flight = None
            return self._read(previous, previous_rows) if previous is not None else []
        if self.drafter is not None and any(row.k for row in self.rows):
            events = self._read(previous, previous_rows) if previous is not None else []
            self.in_flight = None
            return events + self._speculative_round()
        logits = self._forward(joined)
        if any(row.constraint is not None for row in self.rows):
            mx.async_eval(logits)
            events = self._read(previous, previous_rows) if previous is not None else []
            self.in_flight = self._draw(logits)
            return events
        self.in_flight = self._draw(logits)
        return self._read(previous, previous_rows) if previous is not None else []

    def _drop_finished(self) -> None:
        keep = [b for b, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        for c in self.cache:
            c.keep_rows(keep)
        if self.drafter is not None:
            self.drafter.keep_rows(keep)
        if self.in_flight is not None and keep:
            index = mx.array(keep, dtype=mx.int32)
            tokens, logprobs = self.in_flight
            self.in_flight = tokens[index], None if logprobs is None else logprobs[index]
        self.in_flight = self.in_flight if keep else None
        self.rows = [self.rows[b] for b in keep]

    def _admit(self) -> list[Row]:
        """Prefill up to prefill_batch waiting rows (max_batch in all) and add them to the batch; returns them in
        their batch order (grouped by prompt length, see padding_groups)."""
        joined = []
        while (self.waiting and len(self.rows) + len(joined) < self.max_batch
               and len(joined) < self.prefill_batch):
            joined.append(self.waiting.popleft())
        joined = self._prefill(joined)
        self.rows += joined
        return joined

    def _prefill(self, rows: list[Row]) -> list[Row]:
        """Append the rows to the batch caches holding each prompt but its last id, as PromptCache.prefill leaves
        them: cached prefixes first, then the remaining ids, one forward per group of rows of similar length
        (padding_groups: padded positions cost as much as real ones). Returns the rows in their new batch order."""
        found = [self._lookup(row) for row in rows]
        news = [row.history[reused:-1] for row, (_, reused) in zip(rows, found)]
        order = []
        for group in padding_groups([len(ids) for ids in news]):
            self._prefill_group([rows[i] for i in group], [found[i] for i in group], [news[i] for i in group])
            order += group
        return [rows[i] for i in order]

    def _prefill_group(self, rows: list[Row], found: list[tuple[list[KVCache], int]], news: list[list[int]]) -> None:
        """One forward for the rows' remaining ids (prefill_into), then the same for the draft's rows of rows that
        speculate, which hold the whole prompt (but its last id). A plain row's draft row stays empty, a prefix of
        its history as BatchDrafter needs: it is fed only if the row ever shares a speculative round (it catches
        up then), so a batch without speculating rows never runs the draft."""
        with using_row_adapters(self.model, [row.request.adapter for row in rows]):
            batch = prefill_into(self.model, self.cache, [caches for caches, _ in found], news, self.template,
                                 self.prefill_chunk_size)
        if self.drafter is not None:
            empty = [[KVCache() for _ in self.drafter.cache] for _ in rows]
            prefill_into(self.drafter.model, self.drafter.cache, empty,
                         [row.history[:-1] if row.k else [] for row in rows], self.drafter.template,
                         self.prefill_chunk_size)
        for b, (row, (_, reused)) in enumerate(zip(rows, found)):
            if self.prefix_cache is not None:
                self.prefix_cache.store(row.history[:-1], row.request.adapter,
                                        [(c.keys[b:b + 1], c.values[b:b + 1]) for c in batch])
            row.stats.cached_prompt_tokens = reused
            row.stats.prefill_s = time.perf_counter() - row.start

    def _speculative_round(self) -> list[tuple[int, BatchResponse]]:
        """One speculative round for every row (afm_mlx.batch_speculative), its tokens handed out at once."""
        with using_row_adapters(self.model, [row.request.adapter for row in self.rows]):
            outcomes = speculative_round(self.model, self.cache, self.drafter, self.rows)
        events = []
        for row, (tokens, logprobs) in zip(self.rows, outcomes):
            for i, token in enumerate(tokens):
                if row.finished:
                    break
                lp = None if logprobs is None else _logprob(logprobs[i], token, row.request.top_logprobs)
                events += [(row.uid, piece) for piece in row.feed(token, lp)]
        return events

    def _lookup(self, row: Row) -> tuple[list[KVCache], int]:
        if self.prefix_cache is None:
            return self.model.make_cache(), 0
        return self.prefix_cache.lookup(row.history[:-1], row.request.adapter)

    def _forward(self, joined: list[Row]) -> mx.array:
        """One forward for every row (lazy): the next-token logits [B, V]."""
        if self.in_flight is None:  # no step in flight (the first, or after a speculative round): every row's
            joined = self.rows  # newest token is in its history, not yet fed
        inputs = [mx.array([row.history[-1] for row in joined], dtype=mx.int32)] if joined else []
        if self.in_flight is not None:
            inputs.insert(0, self.in_flight[0])
        x = mx.concatenate(inputs)[:, None] if len(inputs) > 1 else inputs[0][:, None]
        with using_row_adapters(self.model, [row.request.adapter for row in self.rows]):
            return self.model(x, self.cache, num_logits=1)[:, -1]

    def _draw(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """Queue every row's draw: tokens [B] (and, when a row asked, logprob rows [B, V])."""
        tokens = self._sample(logits)
        logprobs = None
        if any(row.request.top_logprobs is not None for row in self.rows):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.async_eval(tokens if logprobs is None else (tokens, logprobs))
        return tokens, logprobs

    def _sample(self, logits: mx.array) -> mx.array:
        """Each row's token: the argmax for greedy rows without a penalty (one op for all), else its own draw."""
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        if all(row.simple for row in self.rows):
            return greedy
        parts = [greedy[b:b + 1] if row.simple else row.sample(logits[b:b + 1]) for b, row in enumerate(self.rows)]
        return mx.concatenate(parts)

    def _read(self, step: tuple[mx.array, mx.array | None], rows: list[Row]) -> list[tuple[int, BatchResponse]]:
        tokens, logprobs = step
        events = []
        for b, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row.finished:
                continue
            lp = _logprob(logprobs[b], token, row.request.top_logprobs) if row.request.top_logprobs is not None \
                else None
            events += [(row.uid, piece) for piece in row.feed(token, lp)]
        return events


def padding_groups(lengths: list[int], waste: float = PREFILL_PADDING) -> list[list[int]]:
    """Indices of `lengths` in groups to prefill together, longest first: a group's padded area (its rows times
    its longest) stays within (1 + waste) times its real tokens, so rows of similar length share a forward and a
    short prompt never pays for a long one's width."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else []
        tokens = sum(lengths[j] for j in group) + lengths[i]
        if group and (len(group) + 1) * lengths[group[0]] <= (1 + waste) * tokens:
            group.append(i)
        else:
            groups.append([i])
    return groups


def prefill_into(model: Model, caches: list[BatchKVCache], starts: list[list[KVCache]], news: list[list[int]],
                 template: mx.array, chunk_size: int) -> list[BatchKVCache]:
    """Append rows to the batch caches: row b from the per-sequence caches starts[b] (a cached prefix, or empty)
    plus news[b], all in one forward (prefill_rows). Returns the new rows' own batch caches."""
    rows = [BatchKVCache() for _ in caches]
    for layer, c in enumerate(rows):
        c.add_rows([start[layer] for start in starts], template)
    prefill_rows(model, rows, news, chunk_size)
    for c, new in zip(caches, rows):
        c.extend(new)
    return rows


def prefill_rows(model: Model, caches: list[BatchKVCache], news: list[list[int]], chunk_size: int) -> None:
    """Append news[b] to row b of the caches in one forward, right-padded to the longest (causal: no valid position
    sees the padding, whose K/V are trimmed after)."""
    width = max(map(len, news))
    if width:
        tokens = mx.array([ids + [0] * (width - len(ids)) for ids in news], dtype=mx.int32)
        model.prefill(tokens, caches, chunk_size)
        for c in caches:
            c.trim_rows([width - len(ids) for ids in news])


def _logprob(row: mx.array, token: int, top: int) -> TokenLogprob:
    best = mx.argsort(-row)[:top] if top else mx.array([], dtype=mx.int32)
    values = row[best].tolist() if top else []
    return TokenLogprob(token, row[token].item(), list(zip(best.tolist(), values)))


# ---- the library call


def batch_generate(model: Model, tokenizer, prompts: Sequence[Prompt], *, max_batch: int = 32,
                   system: str | None = None, raw: bool = False, options: Sequence[dict] | None = None,
                   draft_model: Model | None | bool = None, **shared) -> list[GenerationResult]:
    """Generate for every prompt at once (continuous batching, at most max_batch rows per step).

    shared: options for every prompt (max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
    stop, adapter, max_context, top_logprobs, num_draft_tokens, and the guided schema / response_format / regex /
    grammar / tools / tool_choice); options: one dict per prompt overriding them. num_draft_tokens = k > 0 decodes
    that prompt in speculative rounds with draft_model (None: model.draft; False: none); the default 0 decodes
    plainly. Each result equals the prompt run alone with afm_mlx.generate (greedy; or sampled with a seed), with
    the same draft and k (num_draft_tokens 0: draft_model=False).
    """
    per_prompt = options if options is not None else [{}] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise AFMError(f"{len(prompts)} prompts but {len(per_prompt)} option dicts")
    batch = BatchGenerator(model, tokenizer, max_batch=max_batch, draft=resolve_draft(model, draft_model))
    order = [batch.submit(make_request(tokenizer, prompt, system=system, raw=raw, **{**shared, **extra}))
             for prompt, extra in zip(prompts, per_prompt)]
    pieces: dict[int, list[BatchResponse]] = {uid: [] for uid in order}
    while batch.busy:
        for uid, piece in batch.step():
            pieces[uid].append(piece)
    return [_result(pieces[uid]) for uid in order]


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_context_size", "seed")


def make_request(tokenizer, prompt: Prompt, *, system: str | None = None, raw: bool = False,
                 **options) -> BatchRequest:
    """A BatchRequest from a prompt (as stream_generate takes it) and stream_generate-style options, the guided
    ones (schema=, response_format=, regex=, grammar=, tools=, tool_choice=, ...) included."""
    unknown = set(options) - set(SAMPLING) - set(GUIDED_OPTIONS) - {"max_tokens", "stop", "adapter", "max_context",
                                                                     "top_logprobs", "num_draft_tokens"}
    if unknown:
        raise AFMError(f"unknown option(s): {', '.join(sorted(unknown))}")
    params = SamplingParams(**{k: options.pop(k) for k in SAMPLING if k in options})
    guide = make_guide(tokenizer, **{k: options.pop(k) for k in GUIDED_OPTIONS if k in options})
    return BatchRequest(prompt_ids(tokenizer, prompt, system=system, raw=raw, guide=guide), params, **options,
                        guide=guide)


def _result(pieces: list[BatchResponse]) -> GenerationResult:
    stats, guided = pieces[-1].stats, pieces[-1].guided
    return GenerationResult("".join(p.text for p in pieces), [t for p in pieces for t in p.tokens], stats, guided)
