"""kv_attention: the MLX reference (CPU path) and the Metal and CUDA kernels (run through the CPU emulator) against
a float64 NumPy oracle of causal GQA attention over int8 K/V codes."""

from __future__ import annotations

import warnings
import zlib

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.cache import KVCache
from afm_mlx.kernels import attention, attention_int8, dispatch, kv_attention, kv_attention_reference
from kernel_oracles import assert_close, attention_oracle, emulated, kernel_verdicts, random_codes

K_SCALE, V_SCALE = 0.011, 0.007


def make_inputs(case_id: str, b, h, kv, l, d, s_alloc, dtype=mx.float32):
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    q = mx.array(rng.normal(size=(b, h, l, d)).astype(np.float32)).astype(dtype)
    return q, random_codes(rng, (b, kv, s_alloc, d)), random_codes(rng, (b, kv, s_alloc, d))


@pytest.mark.parametrize(
    "b,h,kv,l,d,s_alloc,kv_len,causal",
    [(1, 16, 2, 1, 128, 64, 40, True), (2, 8, 4, 4, 32, 30, 30, True), (1, 4, 4, 8, 48, 20, 12, True),
     (1, 4, 1, 3, 64, 10, 9, False)],
)  # fmt: skip
def test_reference_matches_oracle(b, h, kv, l, d, s_alloc, kv_len, causal):
    q, kc, vc = make_inputs("ref", b, h, kv, l, d, s_alloc)
    scale = d**-0.5
    out = kv_attention(q, kc, vc, K_SCALE, V_SCALE, scale=scale, kv_len=kv_len, causal=causal)  # CPU path
    expected = attention_oracle(q, kc, vc, K_SCALE, V_SCALE, scale, kv_len, causal)
    assert_close(out, expected, mx.float32, "reference")


# (backend, dtype, B, H, KV, L, D, S_alloc, kv_len, causal): AFM base (H/KV = 16/2, D = 128) and draft (8/4, D = 32)
# shapes, L = 1..8, several splits (kv_len > 64), a split no query row can see (kv_len = 129, L = 8), kv_len = L.
KERNEL_CASES = [
    ("metal", mx.float32, 1, 8, 4, 1, 32, 40, 37, True),
    ("metal", mx.float32, 2, 4, 2, 5, 32, 160, 150, True),
    ("metal", mx.float16, 1, 16, 2, 4, 128, 50, 45, True),
    ("metal", mx.bfloat16, 1, 8, 1, 8, 128, 70, 70, True),
    ("metal", mx.float32, 1, 2, 2, 2, 64, 40, 33, False),
    ("metal", mx.float16, 1, 4, 1, 8, 32, 8, 8, True),
    ("metal", mx.float32, 1, 4, 2, 8, 32, 140, 129, True),
    ("cuda", mx.float32, 2, 4, 2, 5, 32, 160, 150, True),
    ("cuda", mx.bfloat16, 1, 16, 2, 3, 128, 48, 40, True),
    ("cuda", mx.float16, 1, 8, 4, 1, 32, 300, 290, True),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)).replace("mlx.core.", ""))
def test_emulated_kernel_matches_oracle(case):
    which, dtype, b, h, kv, l, d, s_alloc, kv_len, causal = case
    q, kc, vc = make_inputs(str(case), b, h, kv, l, d, s_alloc, dtype)
    scale = d**-0.5
    with emulated(which), warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check would warn and fall back
        out = kv_attention(q, kc, vc, K_SCALE, V_SCALE, scale=scale, kv_len=kv_len, causal=causal)
        assert kernel_verdicts("kv_attention") == [True]
    assert out.dtype == dtype and out.shape == (b, h, l, d)
    assert_close(out, attention_oracle(q, kc, vc, K_SCALE, V_SCALE, scale, kv_len, causal), dtype, f"{which} kernel")


@pytest.mark.parametrize("which", ["metal", "cuda"])
def test_each_code_is_read_once(which):
    """All H / KV query heads and L rows share one read of the K/V codes: each valid position's codes are read
    exactly once across all splits, positions past kv_len never; q once per split."""
    b, h, kv, l, d, s_alloc, kv_len = 1, 8, 2, 4, 32, 200, 170
    q, kc, vc = make_inputs("reads", b, h, kv, l, d, s_alloc)
    with emulated(which):
        kv_attention(q, kc, vc, K_SCALE, V_SCALE, scale=d**-0.5, kv_len=kv_len)
        kern = dispatch.kernel("kv_attention_partial", which, attention.PARTIAL_INPUTS, attention.PARTIAL_OUTPUTS)
    n_splits = attention.split_plan(kv_len, b * kv)[1]
    assert n_splits > 1
    for name in ("k_codes", "v_codes"):
        reads = kern.last_reads[name].reshape(b, kv, s_alloc, d)
        assert (reads[:, :, :kv_len] == 1).all() and (reads[:, :, kv_len:] == 0).all(), name
    assert (kern.last_reads["q"] == n_splits).all()


def test_attention_int8_reads_the_cache_buffers():
    """With the project's KVCache: the whole int8 buffers (S_alloc = 256) and `offset` valid positions."""
    rng = np.random.default_rng(11)
    cache = KVCache()
    b, h, kv, d = 1, 16, 2, 128
    for new in (37, 1, 4):  # prefill, decode, verify
        cache.update_and_fetch(random_codes(rng, (b, kv, new, d)), random_codes(rng, (b, kv, new, d)))
    assert cache.keys.shape[2] == KVCache.step and cache.offset == 42
    q = mx.array(rng.normal(size=(b, h, 4, d)).astype(np.float32))
    expected = attention_oracle(q, cache.keys, cache.values, K_SCALE, V_SCALE, d**-0.5, cache.offset)
    k_scale, v_scale = mx.array(K_SCALE), mx.array(V_SCALE)  # the model's 0-d quant_key/value_scale
    assert_close(attention_int8(q, cache, k_scale, v_scale, scale=d**-0.5), expected, mx.float32, "cpu")
    with emulated("metal"):
        out = attention_int8(q, cache, k_scale, v_scale, scale=d**-0.5)
        assert kernel_verdicts("kv_attention") == [True]
    assert_close(out, expected, mx.float32, "metal")


def test_unsupported_shapes_use_the_reference():
    q, kc, vc = make_inputs("unsupported", 1, 4, 2, 3, 48, 20)  # head_dim 48: not a multiple of 32
    q9, kc9, vc9 = make_inputs("nine", 1, 4, 2, 9, 32, 20)  # 9 queries
    with emulated("metal"):
        out = kv_attention(q, kc, vc, K_SCALE, V_SCALE, scale=0.1, kv_len=15)
        out9 = kv_attention(q9, kc9, vc9, K_SCALE, V_SCALE, scale=0.1, kv_len=15)
        assert dispatch.verdicts() == {}
    reference = kv_attention_reference(q, kc, vc, K_SCALE, V_SCALE, scale=0.1, kv_len=15)
    np.testing.assert_array_equal(np.array(out), np.array(reference))
    assert_close(out9, attention_oracle(q9, kc9, vc9, K_SCALE, V_SCALE, 0.1, 15), mx.float32, "9 queries")


def test_shape_errors_are_reported():
    q, kc, vc = make_inputs("errors", 1, 6, 4, 2, 32, 10)
    with pytest.raises(ValueError, match="heads"):
        kv_attention(q, kc, vc, K_SCALE, V_SCALE, scale=0.1)
    q, kc, vc = make_inputs("errors2", 1, 4, 2, 3, 32, 10)
    with pytest.raises(ValueError, match="kv_len"):
        kv_attention(q, kc, vc, K_SCALE, V_SCALE, scale=0.1, kv_len=2)
