"""Speculative decoding inside the continuous batch: every row drafts, is verified and rolls back on its own.

One round for the whole batch (K = the largest k of the rows this round):

    draft:  each row's pending tokens (right-padded to the longest), then d_1 .. d_K, one batched draft step each
    base:   [y, d_1 .. d_K] for every row in one forward -> logits [B, K + 1, V]
    accept: row b applies speculative.accept to its own first k_b drafts, with its own sampling parameters,
            key stream and penalty window; a row with k_b = 0 draws from position 0 as a plain row does
    rollback: row b of the base cache keeps its history plus the n_b accepted drafts, the draft's row the same
            (one fewer after a full acceptance: d_K was never fed to it, it is pending next round)

A row's draws split its key stream exactly as SpeculativeDecoder does (k + 2 keys a round), and its tokens come
from its own slice of the batched logits, so a row equals its request run alone with `generate` and the same k
(greedy, and sampled with a seed: `tests/test_batch_speculative.py`). Rounds are synchronous: one host read each,
and with a guided row one per draft step too: its drafts are drawn under its grammar's masks (computed on the host
after each draft token is read), the base verifies with the masks of its k + 1 positions, and its matcher is
rolled back to the emitted tokens, as propose_guided / verify do for one sequence. Rows of a batch without a
speculating row run the pipelined plain step instead (afm_mlx.batch).
"""

from __future__ import annotations

import mlx.core as mx

from .model import Model
from .sampling import mask_logits, next_token, recent_window
from .speculative import accept


class BatchDrafter:
    """The draft model's side of the batch: one BatchKVCache per draft layer, rows in the base's order.

    Invariant between rounds: row b holds a prefix of that row's history[:-1] (plain steps do not feed it, so
    a row that decoded plainly catches up in the first draft step of its next round).
    """

    def __init__(self, draft: Model, cache_type, template: mx.array):
        self.model, self.cache_type, self.template = draft, cache_type, template
        self.cache = [cache_type() for _ in draft.model.layers]

    @property
    def lengths(self) -> list[int]:
        return self.cache[0].lengths

    def keep_rows(self, rows: list[int]) -> None:
        for c in self.cache:
            c.keep_rows(rows)

    def propose(self, rows, pending: list[list[int]], k: int, keys: list) -> tuple[mx.array, list]:
        """K = k draft tokens for every row [B, k] (lazy); per row, the distributions its first k_b were drawn
        from ([1, k_b, V], None for greedy rows and rows that do not speculate); per guided speculating row the
        masks of the k_b + 1 positions the base verifies ([1, k_b + 1, V]; its matcher then holds its k_b drafts),
        else None."""
        width = max(map(len, pending))
        x = mx.array([ids + [0] * (width - len(ids)) for ids in pending], dtype=mx.int32)
        logits = self.model(x, self.cache, num_logits=width)
        if width > 1:  # each row's newest real position; the padding's K/V are forgotten before the next step
            last = mx.array([len(ids) - 1 for ids in pending], dtype=mx.int32)
            logits = mx.take_along_axis(logits, last[:, None, None], axis=1)
            for c in self.cache:
                c.trim_rows([width - len(ids) for ids in pending])
        recents = [recent_window(row.history, row.params) if row.k else None for row in rows]
        guided = [b for b, row in enumerate(rows) if row.k and row.constraint is not None]
        tokens, dists, masks = [], [[] for _ in rows], [[] for _ in rows]
        for i in range(k):
            for b in guided:  # host work while the draft forward runs
                if i < rows[b].k:
                    masks[b].append(rows[b].allowed(logits.shape[-1]))
            token = self._draw(rows, logits[:, -1], i, keys, recents, dists, masks)
            tokens.append(token)
            if i + 1 < k:
                logits = self.model(token[:, None], self.cache, num_logits=1)
            if guided:  # the next masks need this token: read it (the next forward is already queued)
                drawn = token.tolist()
                for b in guided:
                    if i < rows[b].k:
                        rows[b].constraint.consume([drawn[b]])
        for b in guided:
            masks[b].append(rows[b].allowed(logits.shape[-1]))
        q = [mx.stack(d, axis=1) if d else None for d in dists]
        allowed = [mx.stack(m, axis=1) if m else None for m in masks]
        return mx.stack(tokens, axis=1), q, allowed

    @staticmethod
    def _draw(rows, logits: mx.array, i: int, keys: list, recents: list, dists: list, masks: list) -> mx.array:
        """Draft step i's token for every row: a speculating row draws as propose() (propose_guided) does for it
        alone (its key i, its penalty window, its grammar's mask); the others take the argmax, which nothing
        reads."""
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        parts = []
        for b, row in enumerate(rows):
            if i >= row.k or (row.params.greedy and recents[b] is None and row.constraint is None):
                parts.append(greedy[b:b + 1])
                continue
            key = None if row.params.greedy else keys[b][i]
            row_logits = logits[b:b + 1] if row.constraint is None else mask_logits(logits[b:b + 1], masks[b][i])
            token, q, recents[b] = next_token(row_logits, row.params, key, recents[b])
            parts.append(token)
            if not row.params.greedy:
                dists[b].append(q)
        token = mx.concatenate(parts)
        mx.async_eval(token)
        return token


def speculative_round(model: Model, cache: list, drafter: BatchDrafter, rows) -> list[tuple[list[int], mx.array | None]]:
    """One round for every row (see the module docstring); both caches rolled back. Returns each row's emitted
    tokens and, for rows that asked for logprobs, the log-softmax of the raw logits of the positions scored."""
    k = max(row.k for row in rows)
    pending = [row.history[length:] for row, length in zip(rows, drafter.lengths)]
    keys = [row.keys.split(row.k + 2) if row.k and not row.params.greedy else None for row in rows]
    drafts, q, allowed = drafter.propose(rows, pending, k, keys)
    last = mx.array([[row.history[-1]] for row in rows], dtype=mx.int32)
    logits = model(mx.concatenate([last, drafts], axis=1), cache, num_logits=k + 1)
    outcomes, logprobs = [], []
    for b, row in enumerate(rows):
        outcomes.append(_row_outcome(row, logits[b:b + 1], drafts[b:b + 1], q[b], keys[b], allowed[b]))
        logprobs.append(None if row.request.top_logprobs is None else
                        logits[b] - mx.logsumexp(logits[b], axis=-1, keepdims=True))
    mx.eval(outcomes, [lp for lp in logprobs if lp is not None])
    emitted = []
    for row, (num_accepted, tokens) in zip(rows, outcomes):
        n = num_accepted.item()
        emitted.append(tokens[0, : n + 1].tolist())
        if row.k:
            row.stats.speculative.record_round(row.k, n, n + 1)
        if row.k and row.constraint is not None:  # it holds the k_b drafts; Row.feed consumes what is emitted
            row.constraint.rollback(row.k)
    before = [len(row.history) for row in rows]
    for c in cache:  # the base consumed y, d_1 .. d_K: keep y and the accepted drafts
        c.trim_rows([k + 1 - len(e) for e in emitted])
    for c in drafter.cache:  # it consumed up to d_{K-1}: keep at most what the base keeps
        c.trim_rows([length - (n + len(e) - 1) for length, n, e in zip(c.lengths, before, emitted)])
    return list(zip(emitted, logprobs))


def _row_outcome(row, logits: mx.array, drafts: mx.array, q, keys, allowed) -> tuple[mx.array, mx.array]:
    """(num_accepted [1], tokens [1, k_b + 1]) of one row from its slice of the verify logits [1, K + 1, V]."""
    if not row.k:  # a plain row in a speculating batch: its token from position 0, drawn as a plain step draws it
        token = mx.argmax(logits[:, 0], axis=-1).astype(mx.int32) if row.simple else row.sample(logits[:, 0])
        return mx.zeros((1,), dtype=mx.int32), token[:, None]
    recent = recent_window(row.history, row.params)
    return accept(logits[:, : row.k + 1], drafts[:, : row.k], q, row.params, keys[row.k:] if keys is not None
                  else None, recent, allowed)
