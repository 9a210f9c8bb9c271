"""afm_mlx.kv: the K/V history's float views and the padded causal mask (built per forward, no module state)."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import afm_mlx.kv as KV
import afm_mlx.model as model_module
from afm_mlx import step
from afm_mlx.dtypes import backend_name
from afm_mlx.presets import tiny_base
from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights


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


def test_a_mask_left_by_another_thread_is_not_reused():
    """The padded mask is built per forward (model.Span), not kept in module state: a mask another thread left
    unevaluated on its own stream cannot be evaluated here ("There is no Stream(cpu, 0) in current thread")."""
    def other_thread_forward():
        with mx.stream(mx.new_stream(mx.cpu)):
            KV.padded_causal_mask(2, 5, 8, mx.float32)  # left lazy, as a forward's graph leaves it

    thread = threading.Thread(target=other_thread_forward)
    thread.start()
    thread.join()
    mask = np.array(KV.padded_causal_mask(2, 5, 8, mx.float32))[0, 0]
    np.testing.assert_array_equal(mask == 0, np.arange(8)[None, :] <= np.array([[3], [4]]))


def test_one_mask_serves_every_layer_of_a_forward(monkeypatch):
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(), seed=5))
    built = []
    monkeypatch.setattr(model_module, "padded_causal_mask", lambda *a: built.append(a) or KV.padded_causal_mask(*a))
    monkeypatch.setattr(step, "ENABLED", False)
    monkeypatch.setattr(KV, "PADDED_ATTENTION_BACKENDS", (backend_name(),))
    cache = model.make_cache()
    model.prefill(mx.arange(1, 9)[None], cache)  # 8 rows: padded as well, 4 regular layers
    mx.eval(model(mx.array([[3, 4, 5]]), cache, num_logits=2))  # regular layers 3 rows, reuse layers 2
    groups = model.args.num_heads // model.args.num_kv_heads  # the CPU's grouped_attention rows
    assert built == [(rows, length, 256, mx.float32, groups) for rows, length in ((8, 8), (3, 11), (2, 11))]  # once each


@pytest.mark.parametrize("rows, length", [(1, 7), (1, 256), (4, 130), (6, 300)])
def test_grouped_attention_is_sdpa_over_the_valid_prefix_bit_for_bit(rows, length):
    """On the CPU: the padded buffer, the mask's exact zeros and one matmul per KV head change no bit."""
    rng = np.random.default_rng(rows)
    size = 512 if length > 256 else 256
    q = mx.array(rng.normal(size=(1, 8, rows, 32)), dtype=mx.float32)
    keys, values = (mx.array(rng.normal(size=(1, 2, size, 32)), dtype=mx.float32) for _ in range(2))
    expected = mx.fast.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], scale=0.17,
                                                    mask="causal" if rows > 1 else None)
    mask = KV.padded_causal_mask(rows, length, size, mx.float32, groups=4)
    np.testing.assert_array_equal(np.array(KV.grouped_attention(q, keys, values, 0.17, mask)), np.array(expected))
