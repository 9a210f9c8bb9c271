"""The int8 K/V stored as codes or as the values they stand for (kv.DEQUANTIZED_STORAGE_BACKENDS, none by
default: tried on CUDA, where no kernel reads codes, it did not decode faster on an H200): the cache's dtype
changes, the logits do not."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import afm_mlx.kv as KV
from afm_mlx import kernels
from afm_mlx.dtypes import backend_name
from afm_mlx.errors import AFMError
from afm_mlx.loading import cast_floats
from afm_mlx.presets import tiny_base
from toolkit_fixtures import STEP_TOKENS, decode_verify_logits, mlx_model_from_toolkit, toolkit_weights


def stored_dequantized_here(monkeypatch) -> None:
    monkeypatch.setattr(KV, "DEQUANTIZED_STORAGE_BACKENDS", (backend_name(),))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_dequantized_storage_gives_identical_logits(dtype, monkeypatch):
    """Prefill, decode, verify, rollback, verify: bit-identical logits, since the stored values are exactly what
    the codes are dequantised to before attention (same fp32 product, same cast)."""
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(), seed=7))
    cast_floats(model, dtype)
    assert KV.stores_codes()  # the CPU keeps codes
    codes = decode_verify_logits(model)
    stored_dequantized_here(monkeypatch)
    assert not KV.stores_codes()
    values = decode_verify_logits(model)
    for step, (a, b) in enumerate(zip(values, codes)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step}")


def test_cache_dtype_follows_the_storage(monkeypatch):
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(), seed=7))
    tokens = mx.array(STEP_TOKENS)[None, :5]
    cache = model.make_cache()
    model.prefill(tokens, cache)
    assert {c.keys.dtype for c in cache} == {mx.int8}
    stored_dequantized_here(monkeypatch)
    cache = model.make_cache()
    model.prefill(tokens, cache)
    assert {c.keys.dtype for c in cache} == {mx.float32}
    # the stored values are on the layer's int8 grid
    layer = model.model.layers[0].self_attn
    grid = np.array(cache[0].keys[..., :5, :]) / np.array(layer.quant_key_scale)
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)


def test_a_cache_filled_in_one_form_refuses_the_other(monkeypatch):
    """A codes cache handed floats (filled before the storage form changed, e.g. under another backend policy)
    would have them cast to int8 silently: refused in one line instead."""
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(), seed=7))
    cache = model.make_cache()
    model.prefill(mx.array(STEP_TOKENS)[None, :5], cache)
    stored_dequantized_here(monkeypatch)
    with pytest.raises(AFMError, match="holds mlx.core.int8 K/V"):
        model(mx.array(STEP_TOKENS)[None, 5:6], cache)


def test_codes_are_kept_wherever_the_kv_attention_kernel_reads_them(monkeypatch):
    stored_dequantized_here(monkeypatch)
    monkeypatch.setattr(kernels, "model_uses", lambda kernel: kernel == "kv_attention")
    assert KV.stores_codes()

