"""Samplers that return the distribution they draw from, for plain and speculative decoding.

Speculative rejection sampling needs the exact filtered, tempered distributions of the base (p) and the draft (q),
so sampling is split in two pure steps over logits `[..., V]` (any leading shape: one position, or the k+1
positions a verifier scores at once), both lazy, with no host sync:

    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.0, seed=0)   # AFMError if invalid
    keys = RandomKeys(params.seed)                  # explicit key stream: same seed -> same keys -> same text
    logits = apply_repetition_penalty(logits, recent_token_windows(tokens, 1, 20), 1.1)   # optional
    probs = filtered_probs(logits, params)          # float32 [..., V], sums to 1, zeros where filtered out
    token = sample(probs, keys.next())              # int32 [...], one independent draw per leading position
    token, probs = sample_token(logits, params, keys.next())   # both at once (greedy: argmax, key unused)

The filter order follows Hugging Face: temperature, then top-k, top-p and min-p on the tempered distribution.
Greedy (temperature <= 1e-5, the toolkit's threshold) gives a one-hot of the argmax (first index on ties), so a
verifier can treat greedy and sampling alike. Ties at a top-k / top-p boundary keep every tied token (the
filters are thresholds on values), which is deterministic and matches the NumPy reference in the tests.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Sequence

import mlx.core as mx
import numpy as np

from .errors import AFMError

GREEDY_TEMPERATURE = 1e-5  # the toolkit samples greedily at or below this temperature


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and penalty 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    seed: int | None = None

    def __post_init__(self):
        _check(
            _is_number(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        )
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
        )
        _check(
            _is_int(self.repetition_context_size) and self.repetition_context_size >= 1,
            f"repetition_context_size must be an integer >= 1, got {self.repetition_context_size}",
        )
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            f"seed must be an integer in [0, 2**63), got {self.seed}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AFMError(message)


# ---- filtered distributions


def filtered_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """The distribution a token is drawn from: float32 [..., V], exactly 0 outside the filters, rows sum to 1."""
    if params.greedy:
        return _one_hot_argmax(logits)
    return mx.softmax(filtered_logits(logits, params), axis=-1, precise=True)


def filtered_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Sampling params only: the tempered logits, float32 [..., V], -inf outside the filters (softmax of them is
    filtered_probs)."""
    return _compiled_filter(float(params.temperature), int(params.top_k), float(params.top_p), float(params.min_p))(
        logits
    )


@mx.compile
def _one_hot_argmax(logits: mx.array) -> mx.array:
    best = mx.argmax(logits, axis=-1, keepdims=True)
    return (mx.arange(logits.shape[-1]) == best).astype(mx.float32)


@lru_cache(maxsize=64)
def _compiled_filter(temperature: float, top_k: int, top_p: float, min_p: float):
    # Settings are compile-time constants: one compiled graph per setting (and input shape).
    return mx.compile(partial(_filter, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))


def _filter(logits: mx.array, *, temperature: float, top_k: int, top_p: float, min_p: float) -> mx.array:
    x = logits.astype(mx.float32) * (1.0 / temperature)
    if 0 < top_k < x.shape[-1]:
        kth_largest = mx.topk(x, top_k, axis=-1).min(axis=-1, keepdims=True)
        x = mx.where(x < kth_largest, -mx.inf, x)
    if top_p < 1.0:
        x = _top_p(x, top_p)
    if min_p > 0.0:
        # p >= min_p * p_max  <=>  x - max(x) >= log(min_p)
        x = mx.where(x - x.max(axis=-1, keepdims=True) < math.log(min_p), -mx.inf, x)
    return x


def _top_p(x: mx.array, top_p: float) -> mx.array:
    """Keep the most probable tokens until their mass reaches top_p (the one that crosses it included)."""
    probs = mx.softmax(x, axis=-1, precise=True)
    ascending = mx.sort(probs, axis=-1)
    mass_above = mx.cumsum(ascending, axis=-1, reverse=True, inclusive=False)
    num_dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)  # a prefix of the ascending order
    smallest_kept = mx.take_along_axis(ascending, num_dropped.astype(mx.int32), axis=-1)
    return mx.where(probs < smallest_kept, -mx.inf, x)


def mask_logits(logits: mx.array, allowed: mx.array | None) -> mx.array:
    """-inf outside `allowed` (bool, broadcastable to logits [..., V]; None: no mask). A guided answer's grammar
    mask goes on first, before the repetition penalty and every filter, so they act on the allowed tokens only."""
    return logits if allowed is None else mx.where(allowed, logits, -mx.inf)


# ---- drawing


def sample(probs: mx.array, key: mx.array | None = None) -> mx.array:
    """One token per leading position from probs [..., V] -> int32 [...]. key: from RandomKeys (None: global)."""
    return mx.random.categorical(mx.log(probs), axis=-1, key=key).astype(mx.int32)


def sample_token(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """(token int32 [...], probs float32 [..., V]): the token and the filtered distribution it was drawn from."""
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32), _one_hot_argmax(logits)
    # Drawn from the filtered logits, not log(probs): the same distribution, and when only the token is used
    # (plain decoding) the softmax is never evaluated.
    x = filtered_logits(logits, params)
    token = _categorical(x, key) if key is not None else mx.random.categorical(x, axis=-1).astype(mx.int32)
    return token, mx.softmax(x, axis=-1, precise=True)


def next_token(logits: mx.array, params: SamplingParams, key: mx.array | None,
               recent: mx.array | None) -> tuple[mx.array, mx.array, mx.array | None]:
    """One step's draw from logits [B, V] with the repetition penalty over `recent` [B, C] (None: none):
    (token [B], its filtered distribution [B, V] (lazy, free when unused), the window moved past the token)."""
    if recent is not None:
        logits = apply_repetition_penalty(logits, recent, params.repetition_penalty)
    token, q = sample_token(logits, params, key)
    if recent is not None:
        recent = mx.concatenate([recent[:, 1:], token[:, None]], axis=1)
    return token, q, recent


@mx.compile
def _categorical(logits: mx.array, key: mx.array) -> mx.array:
    # Compiled, the Gumbel-max draw is one fused kernel plus the argmax: 243 -> 203 us per token on the CPU. Only
    # with an explicit key: a compiled draw from the global generator would freeze its state into the graph.
    return mx.random.categorical(logits, axis=-1, key=key).astype(mx.int32)


class RandomKeys:
    """An explicit PRNG key stream. Independent of mx.random's global state, so the same seed gives the same keys.

    seed None draws a fresh seed (kept in `.seed`, so a run can be replayed). `next()` -> one key;
    `split(n)` -> keys [n, 2] for n draws at once (e.g. a speculative round: k draft draws, k uniforms, ...).
    """

    def __init__(self, seed: int | None = None):
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._key = mx.random.key(self.seed)

    def next(self) -> mx.array:
        return self.split(1)[0]

    def split(self, n: int) -> mx.array:
        keys = mx.random.split(self._key, n + 1)
        self._key = keys[0]
        return keys[1:]


# ---- repetition penalty


def apply_repetition_penalty(logits: mx.array, recent_tokens: mx.array, penalty: float) -> mx.array:
    """CTRL's penalty: logits of recently seen tokens are divided by penalty when > 0, multiplied when < 0.

    logits [..., V]; recent_tokens int [..., C] with the same leading shape (or [C] for all positions), where
    entries < 0 are padding. A token seen several times is penalised once.
    """
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    recent = mx.broadcast_to(recent_tokens, logits.shape[:-1] + recent_tokens.shape[-1:])
    recent = mx.where(recent < 0, vocab, recent).astype(mx.int32)  # padding lands in a spare column
    seen = mx.zeros(recent.shape[:-1] + (vocab + 1,), dtype=mx.bool_)
    seen = mx.put_along_axis(seen, recent, mx.array(True), axis=-1)[..., :vocab]
    penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, penalised, logits)


def recent_window(history: Sequence[int], params: SamplingParams) -> mx.array | None:
    """The repetition-penalty window [1, C] ending with the newest token (-1 pads), or None without a penalty."""
    if params.repetition_penalty == 1.0:
        return None
    size = params.repetition_context_size
    return mx.array([[-1] * max(size - len(history), 0) + list(history[-size:])], dtype=mx.int32)


def penalty_windows(tokens: mx.array, num_positions: int, size: int) -> mx.array:
    """tokens [B, T] -> the last num_positions windows of `size` tokens [B, num_positions, size].

    Row j ends at tokens[:, T - num_positions + j]: the context of the position after that token.
    """
    T = tokens.shape[1]
    index = (T - num_positions + mx.arange(num_positions))[:, None] - (size - 1) + mx.arange(size)[None, :]
    return tokens[:, index]


def recent_token_windows(tokens: Sequence[int] | mx.array, num_positions: int, context_size: int) -> mx.array:
    """The penalty contexts of the last num_positions positions of tokens: int32 [num_positions, context_size].

    Row j holds the last context_size tokens of tokens[: len - num_positions + 1 + j], left-padded with -1. For
    plain decoding num_positions = 1; for verifying k drafted tokens, tokens ends with them and num_positions =
    k + 1 (row j scores the position after draft token j). penalty_windows over the tokens left-padded with -1.
    """
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
    n = tokens.shape[0]
    _check(num_positions <= n, f"need at least {num_positions} tokens, got {n}")
    padded = mx.concatenate([mx.full((context_size - 1,), -1, dtype=mx.int32), tokens.astype(mx.int32)])
    return penalty_windows(padded[None], num_positions, context_size)[0]
