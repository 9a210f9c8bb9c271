"""Samplers: filtered distributions against a float64 NumPy reference, seeding, empirical frequencies, penalty."""

import math

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

from afm_mlx.errors import AFMError
from afm_mlx.sampling import (
    RandomKeys,
    SamplingParams,
    apply_repetition_penalty,
    filtered_probs,
    recent_token_windows,
    sample,
    sample_token,
)

V = 48


# ---- float64 reference, written from the definitions


def _softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def reference_probs(logits, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0):
    """One row: tempered, then top-k, top-p and min-p on the renormalised distribution (float64)."""
    logits = np.asarray(logits, np.float64)
    if temperature <= 1e-5:
        return np.eye(len(logits))[np.argmax(logits)]
    x = logits / temperature
    if 0 < top_k < len(x):
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    if top_p < 1.0:
        p = _softmax(x)
        descending = np.sort(p)[::-1]
        mass_before = np.cumsum(descending) - descending
        smallest_kept = descending[mass_before < top_p].min()
        x = np.where(p < smallest_kept, -np.inf, x)
    if min_p > 0.0:
        p = _softmax(x)
        x = np.where(p < min_p * p.max(), -np.inf, x)
    return _softmax(x)


def _logits(shape, seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _assert_top_p_well_posed(logits, temperature, top_k, top_p):
    # The reference (float64) and MLX (float32) only agree when no cumulative mass sits right at top_p.
    for row in logits.reshape(-1, logits.shape[-1]):
        p = reference_probs(row, temperature, top_k)
        cumulative = np.cumsum(np.sort(p)[::-1])
        assert np.min(np.abs(cumulative - top_p)) > 1e-4


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.85),
    dict(temperature=0.7, top_k=10, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=20, top_p=0.95, min_p=0.02),
    dict(temperature=0.0),
    dict(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_filtered_probs_match_numpy_reference_batched(settings):
    logits = _logits((2, 5, V))  # leading dims: e.g. batch x verified positions
    if settings.get("top_p", 1.0) < 1.0:
        _assert_top_p_well_posed(logits, settings["temperature"], settings.get("top_k", 0), settings["top_p"])
    probs = np.array(filtered_probs(mx.array(logits), SamplingParams(**settings)))
    assert probs.dtype == np.float32 and probs.shape == logits.shape
    expected = np.stack([reference_probs(row, **settings) for row in logits.reshape(-1, V)]).reshape(logits.shape)
    np.testing.assert_allclose(probs, expected, atol=2e-7, rtol=1e-5)
    np.testing.assert_array_equal(probs == 0, expected == 0)  # filtered tokens are exactly impossible


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_logits_give_float32_probs(dtype):
    logits = mx.array(_logits((3, V))).astype(dtype)
    settings = dict(temperature=0.7, top_k=10, min_p=0.05)
    probs = np.array(filtered_probs(logits, SamplingParams(**settings)))
    assert probs.dtype == np.float32
    rounded = np.array(logits.astype(mx.float32))  # the reference sees the same rounded logits
    expected = np.stack([reference_probs(row, **settings) for row in rounded])
    np.testing.assert_allclose(probs, expected, atol=2e-7, rtol=1e-5)


def test_filters_actually_filter():
    logits = mx.array(_logits((V,)))
    def kept(**settings):
        return int((np.array(filtered_probs(logits, SamplingParams(**settings))) > 0).sum())
    assert kept(temperature=1.0) == V
    assert kept(temperature=1.0, top_k=7) == 7
    assert kept(temperature=1.0, top_k=V + 5) == V  # top_k beyond the vocabulary is off
    assert 1 < kept(temperature=1.0, top_p=0.5) < kept(temperature=1.0, top_p=0.9) < V
    assert kept(temperature=0.5, top_p=0.9) < kept(temperature=2.0, top_p=0.9)  # top-p sees the tempered mass
    assert 1 < kept(temperature=1.0, min_p=0.2) < kept(temperature=1.0, min_p=0.01) < V


def test_greedy_is_a_one_hot_of_the_first_argmax():
    logits = mx.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 4.9]])
    for temperature in (0.0, 1e-6):
        params = SamplingParams(temperature=temperature)
        token, probs = sample_token(logits, params)
        assert token.tolist() == [1, 0]
        assert np.array(probs).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
        assert sample(probs, RandomKeys(3).next()).tolist() == [1, 0]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_context_size=0), "repetition_context_size"),
        (dict(seed=-1), "seed"),
        (dict(seed="7"), "seed"),
    ],
)
def test_invalid_params_are_refused(settings, message):
    with pytest.raises(AFMError, match=message):
        SamplingParams(**settings)


# ---- seeds and keys


def _draw_sequence(seed, n=40):
    params = SamplingParams(temperature=1.0, seed=seed)
    keys = RandomKeys(params.seed)
    logits = mx.array(_logits((V,), seed=5, scale=0.5))
    return [sample_token(logits, params, keys.next())[0].item() for _ in range(n)]


def test_same_seed_same_tokens_whatever_the_global_state():
    mx.random.seed(1)
    first = _draw_sequence(42)
    mx.random.seed(2)
    mx.random.normal((3,))  # advance the global generator: must not matter
    assert _draw_sequence(42) == first
    assert _draw_sequence(43) != first
    assert len(set(first)) > 5  # it really samples


def test_an_unseeded_stream_can_be_replayed_from_its_seed():
    keys = RandomKeys()
    assert 0 <= keys.seed < 2**63
    replay = RandomKeys(keys.seed)
    assert np.array_equal(np.array(keys.split(3)), np.array(replay.split(3)))
    assert not np.array_equal(np.array(keys.next()), np.array(replay.split(1)[0][::-1]))


# ---- empirical frequencies


def _pooled_chisquare(counts, probs, min_expected=5.0):
    """Chi-square p-value with bins of expected count < min_expected pooled into one."""
    expected = probs / probs.sum() * counts.sum()
    small = expected < min_expected
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return chisquare(observed[keep], expected[keep]).pvalue


@pytest.fixture(scope="module")
def filtered():
    logits = mx.array(_logits((V,), seed=7, scale=1.0))
    params = SamplingParams(temperature=0.8, top_k=16, top_p=0.95)
    return logits, np.array(filtered_probs(logits, params)).astype(np.float64)


def test_batched_draws_follow_the_filtered_distribution(filtered):
    logits, probs = filtered
    n = 40_000
    tokens = np.array(sample(mx.broadcast_to(mx.array(probs, mx.float32), (n, V)), RandomKeys(0).next()))
    counts = np.bincount(tokens, minlength=V)
    assert counts[probs == 0].sum() == 0  # never a filtered-out token
    assert _pooled_chisquare(counts, probs) > 1e-3
    # power check: the same draws are clearly not from the unfiltered distribution
    unfiltered = np.array(mx.softmax(logits / 0.8, precise=True)).astype(np.float64)
    assert _pooled_chisquare(counts, unfiltered) < 1e-6


def test_sample_token_draws_follow_the_filtered_distribution(filtered):
    """sample_token draws from the filtered logits (not log(probs)): the same distribution."""
    logits, probs = filtered
    n = 40_000
    params = SamplingParams(temperature=0.8, top_k=16, top_p=0.95)
    tokens, _ = sample_token(mx.broadcast_to(logits, (n, V)), params, RandomKeys(5).next())
    counts = np.bincount(np.array(tokens), minlength=V)
    assert counts[probs == 0].sum() == 0
    assert _pooled_chisquare(counts, probs) > 1e-3


def test_without_a_key_draws_come_from_the_global_generator():
    logits = mx.zeros((1, 1000))
    params = SamplingParams(temperature=1.0)
    draws = {sample_token(logits, params)[0].item() for _ in range(20)}
    assert len(draws) > 10  # not one frozen draw
    mx.random.seed(9)
    first = [sample_token(logits, params)[0].item() for _ in range(5)]
    mx.random.seed(9)
    assert [sample_token(logits, params)[0].item() for _ in range(5)] == first


def test_draws_with_successive_keys_follow_the_filtered_distribution(filtered):
    _, probs = filtered
    keys = RandomKeys(11).split(4_000)
    probs_mx = mx.array(probs, mx.float32)
    tokens = np.array(mx.stack([sample(probs_mx, keys[i]) for i in range(keys.shape[0])]))
    counts = np.bincount(tokens, minlength=V)
    assert counts[probs == 0].sum() == 0
    assert _pooled_chisquare(counts, probs) > 1e-3


def test_sampling_compiles_as_one_graph():
    # Nothing in the path syncs with the host: the whole step compiles.
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.01)
    step = mx.compile(lambda logits, key: sample_token(logits, params, key))
    logits = mx.array(_logits((6, V)))
    key = RandomKeys(2).next()
    token, probs = step(logits, key)
    token_eager, probs_eager = sample_token(logits, params, key)
    assert token.tolist() == token_eager.tolist()
    np.testing.assert_allclose(np.array(probs), np.array(probs_eager), atol=1e-7)


# ---- repetition penalty


def reference_penalty(logits, recent, penalty):
    out = np.array(logits, np.float64)
    for token in {t for t in recent if t >= 0}:
        out[token] = out[token] * penalty if out[token] < 0 else out[token] / penalty
    return out


def test_repetition_penalty_matches_reference_per_position():
    logits = _logits((3, V), seed=3)
    windows = np.array([[-1, -1, 4, 4], [4, 9, 0, 47], [1, 2, 3, 1]], np.int32)  # padding, repeats, both ends
    out = np.array(apply_repetition_penalty(mx.array(logits), mx.array(windows), 1.3))
    for row in range(3):
        np.testing.assert_allclose(out[row], reference_penalty(logits[row], windows[row], 1.3), rtol=1e-6)
    shared = np.array(apply_repetition_penalty(mx.array(logits), mx.array(windows[1]), 1.3))  # [C] for all rows
    for row in range(3):
        np.testing.assert_allclose(shared[row], reference_penalty(logits[row], windows[1], 1.3), rtol=1e-6)
    logits_mx = mx.array(logits)
    assert apply_repetition_penalty(logits_mx, mx.array(windows), 1.0) is logits_mx


@pytest.mark.parametrize("num_positions, context_size", [(1, 3), (3, 2), (4, 6), (5, 1)])
def test_recent_token_windows(num_positions, context_size):
    tokens = [10, 11, 12, 13, 14]
    windows = recent_token_windows(tokens, num_positions, context_size).tolist()
    for j, window in enumerate(windows):
        prefix = tokens[: len(tokens) - num_positions + 1 + j]
        expected = prefix[-context_size:]
        assert window == [-1] * (context_size - len(expected)) + expected
    with pytest.raises(AFMError):
        recent_token_windows(tokens, 6, 2)


def test_penalty_changes_what_is_sampled():
    logits = mx.array([[2.0, 1.9, -3.0]])
    penalised = apply_repetition_penalty(logits, recent_token_windows([0, 0], 1, 4), 1.5)
    token, _ = sample_token(penalised, SamplingParams())
    assert token.item() == 1 and math.isclose(penalised[0, 0].item(), 2.0 / 1.5, rel_tol=1e-6)
