"""afm_mlx.kv: the K/V history's float views and the padded causal mask."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import afm_mlx.kv as KV


def int8_history(length: int = 5, size: int = 8) -> KV.KVHistory:
    codes = mx.array(np.random.default_rng(0).integers(-128, 128, (1, 2, size, 4)), dtype=mx.int8)
    return KV.KVHistory(codes, codes, mx.array(0.5), mx.array(0.25), length)


@pytest.mark.parametrize("padded", [False, True])
def test_float_views_are_kept_per_dtype(padded):
    """A second dtype gets its own dequantised arrays, not the first caller's (they were cached by `padded` only)."""
    kv = int8_history()
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        keys, values = kv.floats(dtype, padded=padded)
        assert keys.dtype == values.dtype == dtype
        assert keys.shape[2] == (8 if padded else 5)
        np.testing.assert_array_equal(np.array(keys.astype(mx.float32)),
                                      0.5 * np.array(kv.keys[..., :keys.shape[2], :]).astype(np.float32))
    assert kv.floats(mx.float16, padded=padded)[0] is kv.floats(mx.float16, padded=padded)[0]  # still shared
