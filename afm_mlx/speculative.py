"""Speculative decoding with the draft model: propose k tokens, verify them in one base forward, roll back.

One round, built lazily and evaluated with a single host sync:

    draft:  pending -> d_1 ~ q_1, d_1 -> d_2 ~ q_2, ..., d_{k-1} -> d_k ~ q_k   (k draft steps, no sync)
    base:   [y, d_1, ..., d_k] -> p_1 ... p_{k+1}                            (one forward, num_logits=k+1)
    accept: d_i while u_i * q_i(d_i) < p_i(d_i), i.e. with probability min(1, p_i(d_i) / q_i(d_i));
            at the first rejection i draw from normalise(max(p_i - q_i, 0)); if all k pass, a bonus from p_{k+1}.

p and q are the *filtered* distributions (temperature, top-k, top-p, min-p, repetition penalty) from
`sampling.filtered_probs`, so the emitted tokens follow the base's filtered distribution exactly (Leviathan et al.
2023, Chen et al. 2023), and a token is accepted with probability sum(min(p, q)) -- mlx-lm's exact-match rule
(sample t ~ p, accept iff t == d) only reaches sum(p * q). Greedy decoding is the special case where p and q are
one-hots: accept while d_i == argmax p_i, correct with argmax p_i, so the output is plain greedy decoding's.

Rollback: the base consumed y, d_1..d_k; the draft consumed the pending tokens and d_1..d_{k-1} (never its last
proposal). Both are trimmed to the accepted sequence, so the next round's draft input is [c] after a rejection
and [d_k, bonus] after a full acceptance. `KVCache.trim` only moves the offset: rollback is free and exact (the
KV-reuse layers read the last regular cache, which is trimmed with the others).

The round functions take a batch dimension B: generation runs B = 1, the distribution test runs one round on
thousands of independent rows at once.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from .cache import KVCache
from .errors import AFMError
from .model import Model
from .sampling import (RandomKeys, SamplingParams, apply_repetition_penalty, filtered_probs, mask_logits,
                       next_token, penalty_windows, recent_window, sample)


# ---- one round: propose, verify, accept


def propose(draft: Model, cache: list[KVCache], pending: mx.array, k: int, params: SamplingParams,
            keys: mx.array, recent: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """k draft tokens [B, k] int32 and the filtered distributions they were drawn from [B, k, V] (lazy).

    pending [B, L]: the tokens the draft has not consumed yet (the last one is the newest token y).
    recent [B, C]: the repetition-penalty window ending with y (None: no penalty).
    """
    tokens, dists, x = [], [], pending
    for i in range(k):
        token, q, recent = next_token(draft(x, cache, num_logits=1)[:, -1], params, keys[i], recent)
        mx.async_eval(token if params.greedy else (token, q))  # the device starts while the next step is built
        tokens.append(token)
        dists.append(q)
        x = token[:, None]
    return mx.stack(tokens, axis=1), mx.stack(dists, axis=1)


def propose_guided(draft: Model, cache: list[KVCache], pending: mx.array, k: int, params: SamplingParams,
                   keys: mx.array, constraint, recent: mx.array | None = None):
    """propose() under a grammar: each draft token is drawn from the draft's *masked* distribution and read on
    the host to advance the matcher (one sync per draft step; the next draft forward is queued first, so the next
    mask is computed while it runs).

    Returns (drafts [B, k], q [B, k, V], allowed [B, k+1, V]): the masks of the k + 1 positions the base
    verifies -- the k the draft was masked with and the one after d_k. The constraint ends holding d_1..d_k.
    """
    tokens, dists, masks = [], [], []
    logits = draft(pending, cache, num_logits=1)[:, -1]
    for i in range(k):
        masks.append(mx.array(constraint.allowed()))  # host work, while the draft forward runs
        token, q, recent = next_token(mask_logits(logits, masks[-1]), params, keys[i], recent)
        mx.async_eval(token if params.greedy else (token, q))  # read below without waiting for the next forward
        if i + 1 < k:
            logits = draft(token[:, None], cache, num_logits=1)[:, -1]
            mx.async_eval(logits)
        constraint.consume(np.array(token))
        tokens.append(token)
        dists.append(q)
    masks.append(mx.array(constraint.allowed()))
    return mx.stack(tokens, axis=1), mx.stack(dists, axis=1), mx.stack(masks, axis=1)


def verify(model: Model, cache: list[KVCache], last: mx.array, drafts: mx.array, q: mx.array,
           params: SamplingParams, keys: mx.array, recent: mx.array | None = None,
           allowed: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Score [last, drafts] in one base forward and apply the acceptance rule (lazy).

    last [B, 1]: the newest token y; drafts [B, k]; q [B, k, V]; keys [2, 2] (uniforms, corrections).
    allowed [B, k+1, V]: a grammar's masks for the k + 1 scored positions (None: unguided); p is then the masked
    base distribution, as q is the masked draft's, so the output follows the masked base exactly.
    Returns (num_accepted [B] int32, tokens [B, k+1]): a row emits tokens[:num_accepted + 1].
    """
    logits = model(mx.concatenate([last, drafts], axis=1), cache, num_logits=drafts.shape[1] + 1)
    return accept(logits, drafts, q, params, keys, recent, allowed)


def accept(logits: mx.array, drafts: mx.array, q: mx.array | None, params: SamplingParams, keys: mx.array,
           recent: mx.array | None = None, allowed: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """The acceptance rule on the base's logits [B, k+1, V] for [last, drafts] (see verify; q unused when
    greedy). The batch engine calls it on one row's slice of a batched verify forward."""
    k = drafts.shape[1]
    logits = mask_logits(logits, allowed)
    if recent is not None:
        windows = penalty_windows(mx.concatenate([recent, drafts], axis=1), k + 1, recent.shape[1])
        logits = apply_repetition_penalty(logits, windows, params.repetition_penalty)
    if params.greedy:
        return accept_greedy(logits, drafts)
    p = filtered_probs(logits, params)
    uniforms = mx.random.uniform(shape=drafts.shape, key=keys[0])
    return accept_sampled(p, q, drafts, uniforms, keys[1])


@mx.compile
def accept_greedy(logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    targets = mx.argmax(logits, axis=-1).astype(mx.int32)  # [B, k+1]
    matches = (drafts == targets[:, :-1]).astype(mx.int32)
    num_accepted = mx.cumprod(matches, axis=-1).sum(axis=-1)
    return num_accepted, _emitted(drafts, targets, num_accepted)


@mx.compile
def accept_sampled(p: mx.array, q: mx.array, drafts: mx.array, uniforms: mx.array,
                   key: mx.array) -> tuple[mx.array, mx.array]:
    """Speculative rejection sampling. p [B, k+1, V], q [B, k, V], drafts [B, k], uniforms [B, k] in [0, 1)."""
    p_draft = mx.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
    q_draft = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = (uniforms * q_draft < p_draft).astype(mx.int32)  # P = min(1, p/q); q(d) > 0 as d ~ q
    num_accepted = mx.cumprod(accepted, axis=-1).sum(axis=-1)
    q_padded = mx.concatenate([q, mx.zeros_like(p[:, -1:])], axis=1)  # the bonus row draws from p itself
    residual = mx.maximum(p - q_padded, 0.0)
    # A row with no residual mass has p == q, where rejection is impossible: any fallback is never used.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    corrections = sample(residual, key)
    return num_accepted, _emitted(drafts, corrections, num_accepted)


def _emitted(drafts: mx.array, corrections: mx.array, num_accepted: mx.array) -> mx.array:
    """[B, k+1]: drafts before num_accepted, the correction (or bonus) at num_accepted."""
    padded = mx.concatenate([drafts, corrections[:, -1:]], axis=1)
    at_first_rejection = mx.arange(padded.shape[1])[None, :] == num_accepted[:, None]
    return mx.where(at_first_rejection, corrections, padded)


# ---- draft length


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per round for i.i.d. acceptance alpha and k drafts: (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


MAX_DRAFT_TOKENS = 32


def best_draft_length(alpha: float, cost_ratio: float, k_max: int) -> int:
    """The k in [1, k_max] with the most tokens per unit time, E(k) / (k * c + 1) (Leviathan Thm 3.8).

    cost_ratio c = one draft step's time / one verify forward's time; the verify cost is taken as flat in k.
    """
    return max(range(1, k_max + 1), key=lambda k: expected_tokens(alpha, k) / (k * cost_ratio + 1.0))


class DraftLength:
    """k for the next round: fixed, or (adaptive) chosen from the running acceptance rate and measured costs.

    The per-token acceptance alpha is estimated as accepted / (accepted + rejections) with exponential forgetting,
    the maximum-likelihood estimate for rounds that stop at the first rejection.
    """

    def __init__(self, k: int, adaptive: bool = False, decay: float = 0.9):
        if not isinstance(k, int) or k < 1:
            raise AFMError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
        if k > MAX_DRAFT_TOKENS:  # each round drafts k tokens one by one: a huge k is a hang, not a speed-up
            raise AFMError(f"num_draft_tokens must be at most {MAX_DRAFT_TOKENS}, got {k} (acceptance falls "
                           "with every position: 2-8 is where speculation pays)")
        self.k_max, self.k, self.adaptive, self.decay = k, k, adaptive, decay
        self._accepted, self._rejected = 1.0, 0.5  # a mild prior towards drafting

    @property
    def alpha(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def update(self, num_proposed: int, num_accepted: int, cost_ratio: float | None) -> None:
        self._accepted = self.decay * self._accepted + num_accepted
        self._rejected = self.decay * self._rejected + (num_accepted < num_proposed)
        if self.adaptive:
            self.k = best_draft_length(min(self.alpha, 0.999), 0.1 if cost_ratio is None else cost_ratio, self.k_max)


class RoundTimer:
    """Splits round time between draft and verify on every `every`-th round, with one extra sync there.

    Other rounds keep one sync; `split(total)` spreads a total over draft/verify by the measured shares.
    """

    def __init__(self, every: int = 8):
        self.every, self.draft_s, self.verify_s = every, 0.0, 0.0
        self._draft_step_s = self._verify_step_s = None

    def is_timed(self, round_index: int) -> bool:
        return round_index % self.every == 1  # round 0 pays for compilation

    def record(self, draft_s: float, verify_s: float, k: int) -> None:
        self.draft_s += draft_s
        self.verify_s += verify_s
        self._draft_step_s, self._verify_step_s = draft_s / k, verify_s

    @property
    def cost_ratio(self) -> float | None:
        if not self._verify_step_s:
            return None
        return self._draft_step_s / self._verify_step_s

    def split(self, total_s: float) -> tuple[float | None, float | None]:
        """(draft, verify) seconds of total_s; None before any round was timed (fewer than two rounds)."""
        measured = self.draft_s + self.verify_s
        if measured <= 0:
            return None, None
        share = self.draft_s / measured
        return total_s * share, total_s * (1.0 - share)


# ---- the decoding loop (B = 1)


class SpeculativeDecoder:
    """Rounds over one sequence. Both caches stay consistent with `history` between rounds:
    the base holds history[:-1] (the newest token y is not consumed yet), the draft a prefix of that.
    """

    def __init__(self, model: Model, draft: Model, base_cache: list[KVCache], draft_cache: list[KVCache],
                 params: SamplingParams, keys: RandomKeys, draft_length: DraftLength, stats, constraint=None):
        self.model, self.draft, self.base_cache, self.draft_cache = model, draft, base_cache, draft_cache
        self.params, self.keys, self.draft_length, self.stats = params, keys, draft_length, stats
        self.constraint = constraint  # a guided answer's matcher (afm_mlx.guided), in step with `history`
        self.timer = RoundTimer()
        self.rounds = 0

    def start(self, history: list[int]):
        """Queue one round for the sequence `history` (lazy, async); `finish` syncs it."""
        k, timed = self.draft_length.k, self.timer.is_timed(self.rounds)
        # Greedy draws nothing; unused keys would only lengthen the lazy key chain.
        keys = [None] * (k + 2) if self.params.greedy else self.keys.split(k + 2)
        recent = recent_window(history, self.params)
        pending = mx.array([history[self.draft_cache[0].offset:]], dtype=mx.int32)
        t0 = time.perf_counter()
        allowed = None
        if self.constraint is None:
            drafts, q = propose(self.draft, self.draft_cache, pending, k, self.params, keys[:k], recent)
        else:
            drafts, q, allowed = propose_guided(self.draft, self.draft_cache, pending, k, self.params, keys[:k],
                                                self.constraint, recent)
        if timed:
            mx.eval(drafts, q)
            t1 = time.perf_counter()
        out = verify(self.model, self.base_cache, pending[:, -1:], drafts, q, self.params, keys[k:], recent, allowed)
        if timed:
            mx.eval(out)
            self.timer.record(t1 - t0, time.perf_counter() - t1, k)
        else:
            mx.async_eval(out)
        return out, k

    def finish(self, round_, history: list[int]) -> list[int]:
        """Sync a round, roll both caches back to the accepted tokens, return the emitted tokens."""
        (num_accepted, tokens), k = round_
        n = num_accepted.item()
        emitted = tokens[0, : n + 1].tolist()
        keep = len(history) + n  # the new history minus its newest token
        rollback(self.base_cache, keep)
        rollback(self.draft_cache, keep)
        if self.constraint is not None:  # it holds d_1..d_k: keep the accepted ones, then the correction / bonus
            self.constraint.rollback(k - n)
            self.constraint.consume(emitted[-1:])
        self.rounds += 1
        if self.rounds % 64 == 0:
            mx.clear_cache()
        self.stats.record_round(k, n, n + 1)
        self.draft_length.update(k, n, self.timer.cost_ratio)
        return emitted


def rollback(cache: list[KVCache], length: int) -> None:
    """Trim every cache to at most `length` positions."""
    for c in cache:
        c.trim(c.offset - length)
