"""Guided speculative sampling follows the *masked* base distribution exactly: chi-square over 20,000 rows of
one batched round, with a hand-made grammar whose mask at a position depends on the token before it (so the
draft's and the base's masks at positions 2.. come from the drafted tokens, as with a real grammar)."""

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chi2, chisquare

from afm_mlx.sampling import RandomKeys, SamplingParams, filtered_probs, mask_logits
from afm_mlx.speculative import propose_guided, verify
from generation_fixtures import base_model, draft_model, fresh_cache

V = 24
ROWS = 20_000
PROMPT = [1, 17, 5, 9]
FIRST_ALLOWED = np.arange(V) % 4 != 1  # the mask of the first position: 18 of 24 tokens


class ModThree:
    """After token t only tokens u with (u + t) % 3 != 0 may follow; one state per row (vectorised)."""

    def __init__(self, rows: int):
        self.history = np.zeros((rows, 0), dtype=np.int64)

    def allowed(self) -> np.ndarray:
        if self.history.shape[1] == 0:
            return np.broadcast_to(FIRST_ALLOWED, (self.history.shape[0], V)).copy()
        return allowed_after(self.history[:, -1])

    def consume(self, tokens) -> None:
        self.history = np.concatenate([self.history, np.asarray(tokens).reshape(-1, 1)], axis=1)


def allowed_after(tokens: np.ndarray) -> np.ndarray:
    return (np.arange(V)[None, :] + np.asarray(tokens)[:, None]) % 3 != 0


@pytest.fixture(scope="module")
def small():
    base = base_model(vocab_size=V, seed=11, scale=10.0, hidden_dim=16, num_heads=2, num_kv_heads=1,
                      num_layers=3, num_kv_reuse_layers=1)
    return base, draft_model(vocab_size=V, seed=12, scale=10.0, hidden_dim=16)


def _guided_round(base, draft, params, k):
    constraint = ModThree(ROWS)
    last = mx.full((ROWS, 1), PROMPT[-1], dtype=mx.int32)
    base_cache, draft_cache = _rows(fresh_cache(base, PROMPT[:-1])), _rows(fresh_cache(draft, PROMPT[:-1]))
    keys = RandomKeys(params.seed).split(k + 2)
    drafts, q, allowed = propose_guided(draft, draft_cache, last, k, params, keys[:k], constraint)
    num_accepted, tokens = verify(base, base_cache, last, drafts, q, params, keys[k:], allowed=allowed)
    return np.array(drafts), np.array(num_accepted), np.array(tokens), constraint


def _rows(cache):
    for c in cache:
        c.state = tuple(mx.repeat(a, ROWS, axis=0) for a in c.state)
    return cache


def _masked_probs(model, prefix, allowed, params):
    logits = model(mx.array([prefix], dtype=mx.int32))[0, -1]
    return np.array(filtered_probs(mask_logits(logits, mx.array(allowed)), params), np.float64)


def _chi_square(counts, probs):
    support = probs > 0
    assert counts[~support].sum() == 0  # nothing outside the mask (and the filters)
    expected = probs[support] / probs[support].sum() * counts.sum()
    return chisquare(counts[support], expected).statistic, support.sum() - 1


@pytest.mark.parametrize("filters", [dict(temperature=1.0), dict(temperature=0.7, top_k=10)],
                         ids=["T=1", "T=0.7,top_k=10"])
def test_guided_speculative_sampling_follows_the_masked_base(small, filters):
    base, draft = small
    params = SamplingParams(seed=7, **filters)
    drafts, num_accepted, tokens, constraint = _guided_round(base, draft, params, k=2)

    # The draft proposed inside the grammar, and the matcher holds exactly the k drafted tokens.
    assert FIRST_ALLOWED[drafts[:, 0]].all() and allowed_after(drafts[:, 0])[np.arange(ROWS), drafts[:, 1]].all()
    assert (constraint.history == drafts).all()

    # First emitted token: the masked base distribution p_1 (not the unmasked one).
    p1 = _masked_probs(base, PROMPT, FIRST_ALLOWED, params)
    stat, dof = _chi_square(np.bincount(tokens[:, 0], minlength=V), p1)
    assert chi2.sf(stat, dof) > 1e-3

    # Second token where d_1 = a was accepted: p(. | prompt, a) under the mask that follows a.
    total_stat, total_dof = 0.0, 0
    for a in np.unique(tokens[num_accepted >= 1, 0]):
        rows = (num_accepted >= 1) & (tokens[:, 0] == a)
        if rows.sum() < 500:
            continue
        p2 = _masked_probs(base, PROMPT + [int(a)], allowed_after(np.array([a]))[0], params)
        stat, dof = _chi_square(np.bincount(tokens[rows, 1], minlength=V), p2)
        total_stat, total_dof = total_stat + stat, total_dof + dof
    assert total_dof > 0 and chi2.sf(total_stat, total_dof) > 1e-3


def test_the_test_has_power_against_an_unmasked_verifier(small):
    """Verifying without the masks (p unmasked) gives tokens outside the grammar: the check above would fail."""
    base, draft = small
    params = SamplingParams(seed=7, temperature=1.0)
    constraint = ModThree(ROWS)
    last = mx.full((ROWS, 1), PROMPT[-1], dtype=mx.int32)
    base_cache, draft_cache = _rows(fresh_cache(base, PROMPT[:-1])), _rows(fresh_cache(draft, PROMPT[:-1]))
    keys = RandomKeys(params.seed).split(4)
    drafts, q, _ = propose_guided(draft, draft_cache, last, 2, params, keys[:2], constraint)
    _, tokens = verify(base, base_cache, last, drafts, q, params, keys[2:])
    assert not FIRST_ALLOWED[np.array(tokens)[:, 0]].all()
