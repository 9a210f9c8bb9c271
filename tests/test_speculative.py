"""Speculative decoding: greedy equals plain greedy, sampled output follows the base's filtered distribution
(chi-square over 20,000 rows of one batched round), acceptance beats the exact-match rule, exact cache rollback."""

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chi2, chisquare

from afm_mlx.errors import AFMError
from afm_mlx.generation import PromptCache, plain_decode, resolve_draft, speculative_decode
from afm_mlx.sampling import RandomKeys, SamplingParams, filtered_probs
from afm_mlx.speculative import (
    DraftLength,
    SpeculativeDecoder,
    accept_sampled,
    best_draft_length,
    expected_tokens,
    propose,
    verify,
)
from afm_mlx.stats import SpeculativeStats
from generation_fixtures import base_model, draft_model, fresh_cache, noisy_copy

PROMPT = [1, 17, 200, 5, 99, 42, 7, 128]
NUM_TOKENS = 40


@pytest.fixture(scope="module")
def base():
    return base_model()


@pytest.fixture(scope="module")
def greedy_tokens(base):
    return plain(base, SamplingParams())


@pytest.fixture(scope="module")
def drafts(base):
    return {"self": base, "noisy": noisy_copy(base), "random": draft_model()}


def plain(model, params, n=NUM_TOKENS, prompt=PROMPT):
    cache = PromptCache(model)
    cache.prefill(prompt)
    return list(plain_decode(model, cache.base, list(prompt), params, RandomKeys(params.seed), n))


def speculative(model, draft, params, k, n=NUM_TOKENS, prompt=PROMPT, adaptive=False):
    cache = PromptCache(model, draft)
    cache.prefill(prompt)
    stats = SpeculativeStats(k)
    decoder = SpeculativeDecoder(model, draft, cache.base, cache.draft, params, RandomKeys(params.seed),
                                 DraftLength(k, adaptive), stats)
    tokens = list(speculative_decode(decoder, list(prompt), n, frozenset()))[:n]
    return tokens, stats, decoder


# ---- greedy: token-identical to plain greedy


@pytest.mark.parametrize("k", range(1, 7))
@pytest.mark.parametrize("which", ["self", "noisy", "random"])
def test_greedy_speculative_equals_plain_greedy(base, drafts, greedy_tokens, which, k):
    assert len(set(greedy_tokens)) > 10  # the text varies, so agreement is not trivial
    tokens, stats, _ = speculative(base, drafts[which], SamplingParams(), k)
    assert tokens == greedy_tokens
    if which == "self":
        assert stats.accepted == stats.proposed  # the base as its own draft: every proposal accepted
    elif which == "random":
        assert stats.acceptance_rate < 0.2  # many rejections
    else:
        assert 0 < stats.accepted < stats.proposed


def test_greedy_with_repetition_penalty_equals_plain(base, drafts, greedy_tokens):
    params = SamplingParams(repetition_penalty=1.5, repetition_context_size=20)
    expected = plain(base, params)
    assert expected != greedy_tokens  # the penalty matters here
    for which in ("self", "noisy"):
        assert speculative(base, drafts[which], params, 3)[0] == expected


def test_adaptive_draft_length_changes_k_and_keeps_greedy_output(base, drafts, greedy_tokens):
    tokens, stats, decoder = speculative(base, drafts["random"], SamplingParams(), 6, adaptive=True)
    assert tokens == greedy_tokens
    assert decoder.draft_length.k < 6  # a hopeless draft is cut short
    assert len(stats.proposed_by_position) == 6 and stats.proposed_by_position[-1] < stats.rounds


def test_best_draft_length_follows_leviathan():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert best_draft_length(0.95, 0.02, 8) == 8
    assert best_draft_length(0.1, 0.3, 8) == 1
    ks = [best_draft_length(a, 0.05, 10) for a in (0.3, 0.6, 0.8, 0.9)]
    assert ks == sorted(ks) and ks[0] < ks[-1]


# ---- caches after every round equal a fresh prefill


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_after_each_round_equal_fresh_prefill(base, drafts, temperature):
    draft = drafts["noisy"]
    params = SamplingParams(temperature=temperature, seed=5)
    cache = PromptCache(base, draft)
    cache.prefill(PROMPT)
    history = list(PROMPT)
    decoder = SpeculativeDecoder(base, draft, cache.base, cache.draft, params, RandomKeys(5), DraftLength(4),
                                 SpeculativeStats(4))
    accepted = set()
    for _ in range(12):
        emitted = decoder.finish(decoder.start(history), history)
        history += emitted
        accepted.add(len(emitted) - 1)
        assert cache.base[0].offset == len(history) - 1
        _assert_caches_equal(cache.base, fresh_cache(base, history[:-1]))
        draft_len = cache.draft[0].offset
        assert draft_len in (len(history) - 1, len(history) - 2)  # behind by d_k after a full acceptance
        _assert_caches_equal(cache.draft, fresh_cache(draft, history[:draft_len]))
    assert min(accepted) < 4 and 4 in accepted  # rounds with a rejection and rounds with a bonus token


def _assert_caches_equal(ours, fresh):
    for a, b in zip(ours, fresh):
        assert a.offset == b.offset
        (ka, va), (kb, vb) = a.state, b.state
        if ka.dtype == mx.int8:  # kv-quant codes: equal, up to a rare rounding tie flipped by summation order
            for x, y in ((ka, kb), (va, vb)):
                diff = np.abs(np.array(x, np.int32) - np.array(y, np.int32))
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        else:
            assert mx.allclose(ka, kb, atol=1e-5) and mx.allclose(va, vb, atol=1e-5)


# ---- sampling: the output follows the base's filtered distribution

V = 24
ROWS = 20_000
FILTERS = [
    dict(temperature=0.7, top_k=8),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, top_k=12, top_p=0.95, min_p=0.05),
]


SHORT_PROMPT = [1, 17, 5, 9]  # ids < V


@pytest.fixture(scope="module")
def small():
    """Base and draft over 24 tokens, small enough to run 20,000 rows at once; their next-token
    distributions overlap by about 0.6."""
    base = base_model(vocab_size=V, seed=11, scale=10.0, hidden_dim=16, num_heads=2, num_kv_heads=1,
                      num_layers=3, num_kv_reuse_layers=1)
    return base, draft_model(vocab_size=V, seed=12, scale=10.0, hidden_dim=16)


def _one_round(base, draft, params, k, rows=ROWS):
    """One speculative round on `rows` independent copies of the prompt: (num_accepted, tokens, q_1) as NumPy."""
    last = mx.full((rows, 1), SHORT_PROMPT[-1], dtype=mx.int32)
    base_cache = _broadcast(fresh_cache(base, SHORT_PROMPT[:-1]), rows)
    draft_cache = _broadcast(fresh_cache(draft, SHORT_PROMPT[:-1]), rows)
    keys = RandomKeys(params.seed).split(k + 2)
    drafts, q = propose(draft, draft_cache, last, k, params, keys[:k])
    num_accepted, tokens = verify(base, base_cache, last, drafts, q, params, keys[k:])
    return np.array(num_accepted), np.array(tokens), np.array(q[0, 0])


def _broadcast(cache, rows):
    """The caches of one sequence, repeated for `rows` independent rows."""
    for c in cache:
        c.state = tuple(mx.repeat(a, rows, axis=0) for a in c.state)
    return cache


def _next_token_probs(model, prefix, params):
    return np.array(filtered_probs(model(mx.array([prefix], dtype=mx.int32))[0, -1], params), np.float64)


def _chi_square(counts, probs):
    """(statistic, degrees of freedom) over the cells the filtered distribution keeps; none outside them."""
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] / probs[support].sum() * counts.sum()
    return chisquare(counts[support], expected).statistic, support.sum() - 1


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_speculative_sampling_follows_base_distribution(small, filters):
    base, draft = small
    params = SamplingParams(seed=123, **filters)
    num_accepted, tokens, q1 = _one_round(base, draft, params, k=2)
    p1 = _next_token_probs(base, SHORT_PROMPT, params)
    q1 = q1.astype(np.float64)

    # First emitted token (d_1 if accepted, else the residual draw): distributed as p_1.
    counts = np.bincount(tokens[:, 0], minlength=V)
    stat, dof = _chi_square(counts, p1)
    assert chi2.sf(stat, dof) > 1e-3
    # ...and the test has power: p_1 mixed 4:1 with the draft's q_1 (on p_1's support) is rejected by it.
    stat_mixed, _ = _chi_square(counts, np.where(p1 > 0, 0.8 * p1 + 0.2 * q1, 0.0))
    assert chi2.sf(stat_mixed, dof) < 1e-6

    # Second token, in rows that accepted d_1 = a: distributed as p(. | prompt, a) (a verify position > 0).
    total_stat, total_dof = 0.0, 0
    for a in np.unique(tokens[num_accepted >= 1, 0]):
        rows = (num_accepted >= 1) & (tokens[:, 0] == a)
        if rows.sum() < 500:
            continue
        p2 = _next_token_probs(base, SHORT_PROMPT + [int(a)], params)
        stat, dof = _chi_square(np.bincount(tokens[rows, 1], minlength=V), p2)
        total_stat, total_dof = total_stat + stat, total_dof + dof
    assert total_dof > 0 and chi2.sf(total_stat, total_dof) > 1e-3

    # Acceptance of d_1 is sum(min(p, q)), above mlx-lm's exact-match rule sum(p * q).
    overlap, exact_match = np.minimum(p1, q1).sum(), (p1 * q1).sum()
    rate = (num_accepted >= 1).mean()
    assert abs(rate - overlap) < 4 * np.sqrt(overlap * (1 - overlap) / ROWS)
    assert rate > exact_match + 0.1


def test_acceptance_rule_on_handmade_distributions():
    rows = 20_000
    p = mx.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])[None]  # two positions: slot 1 and the bonus
    q = mx.array([[0.1, 0.1, 0.1, 0.7]])[None]
    p, q = mx.broadcast_to(p, (rows, 2, 4)), mx.broadcast_to(q, (rows, 1, 4))
    keys = RandomKeys(7).split(3)
    drafts = mx.random.categorical(mx.log(q[:, 0]), key=keys[0]).astype(mx.int32)[:, None]
    uniforms = mx.random.uniform(shape=drafts.shape, key=keys[1])
    num_accepted, tokens = accept_sampled(p, q, drafts, uniforms, keys[2])
    num_accepted, tokens = np.array(num_accepted), np.array(tokens)
    counts = np.bincount(tokens[:, 0], minlength=4)
    assert counts[3] == 0  # p(3) = 0: a drafted 3 is always rejected, never emitted
    assert chi2.sf(chisquare(counts[:3], np.array([0.5, 0.3, 0.2]) * rows).statistic, 2) > 1e-3
    assert abs(num_accepted.mean() - 0.3) < 0.015  # sum(min(p, q)) = 0.1 + 0.1 + 0.1
    bonus = np.bincount(tokens[num_accepted == 1, 1], minlength=4)  # after an acceptance: a draw from p_2
    assert chi2.sf(chisquare(bonus, np.array([0.1, 0.2, 0.3, 0.4]) * bonus.sum()).statistic, 3) > 1e-3


def test_identical_distributions_accept_everything(small):
    base, _ = small
    params = SamplingParams(temperature=1.0, seed=3)
    num_accepted, _, _ = _one_round(base, base, params, k=3, rows=2000)
    assert (num_accepted == 3).all()


# ---- the draft must share the vocabulary


def test_draft_with_another_vocabulary_is_refused(base):
    with pytest.raises(AFMError, match="vocabulary"):
        resolve_draft(base, draft_model(vocab_size=128))
