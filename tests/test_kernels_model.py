"""The model's logits with the kernels equal those without, through the emulated Metal kernels on a tiny 2-bit
quantized config (head dim 32, GQA 2) with int8 K/V: prefill (reference path), decode (L = 1), verify (L = 4, 8).

Until afm_mlx.model calls afm_mlx.kernels itself, test-only hooks route its quantized linears and its attention
through the kernels' entry points:
- nn.QuantizedLinear.__call__ / QuantizedEmbedding.as_linear -> quantized_linear_small / qmm_small;
- the model's dequantize_int8 remembers which int8 codes and scale produced each dequantized K/V array, and its
  attend() then calls kv_attention on those codes (regular and KV-reuse layers alike).
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import afm_mlx.model as model_module
from afm_mlx.kernels import kv_attention, qmm_small, quantized_linear_small
from afm_mlx.presets import tiny_base
from kernel_oracles import assert_close, emulated, kernel_verdicts
from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights

TOKENS = [3, 17, 200, 5, 5, 99, 42, 7, 128, 1, 250, 64, 9, 33, 180, 2, 77, 140, 12, 201, 4]


def quantized_tiny_model():
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(hidden_dim=128, num_heads=4, num_kv_heads=2), seed=3))
    nn.quantize(model, group_size=32, bits=2, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Embedding))
    return model


def route_model_through_kernels(monkeypatch) -> None:
    """Test-only stand-in for the lead's wiring (see the module docstring)."""
    monkeypatch.setattr(nn.QuantizedLinear, "__call__", lambda self, x: quantized_linear_small(x, self))

    def head(self, x):
        return qmm_small(x, self.weight, self.scales, self.biases, bits=self.bits, group_size=self.group_size)

    monkeypatch.setattr(nn.QuantizedEmbedding, "as_linear", head)
    codes_of: dict[int, tuple] = {}
    dequantize, attend = model_module.dequantize_int8, model_module.attend

    def remembering_dequantize(codes, scale, dtype):
        out = dequantize(codes, scale, dtype)
        codes_of[id(out)] = (out, codes, scale)  # keep `out` alive so its id is not reused
        return out

    def attend_on_codes(q, keys, values, scale):
        if id(keys) not in codes_of or id(values) not in codes_of:
            return attend(q, keys, values, scale)
        (_, k_codes, k_scale), (_, v_codes, v_scale) = codes_of[id(keys)], codes_of[id(values)]
        return kv_attention(q, k_codes, v_codes, k_scale, v_scale, scale=scale)

    monkeypatch.setattr(model_module, "dequantize_int8", remembering_dequantize)
    monkeypatch.setattr(model_module, "attend", attend_on_codes)


def run_steps(model) -> list[np.ndarray]:
    """Prefill 9 tokens, then decode 1, verify 4 (num_logits=4), roll back 2, verify 8: the logits of each call."""
    cache = model.make_cache()
    tokens = mx.array(TOKENS)[None]
    model.prefill(tokens[:, :9], cache)
    logits = [model(tokens[:, 9:10], cache), model(tokens[:, 10:14], cache, num_logits=4)]
    for c in cache:
        c.trim(2)
    logits.append(model(tokens[:, 12:20], cache))
    return [np.array(x) for x in logits]


def test_model_logits_with_kernels_equal_without(monkeypatch):
    model = quantized_tiny_model()
    without = run_steps(model)
    route_model_through_kernels(monkeypatch)
    with emulated("metal"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel may fail its self-check and fall back
        with_kernels = run_steps(model)
        qmm_checks, attention_checks = kernel_verdicts("qmm_small"), kernel_verdicts("kv_attention")
    # the kernels really ran: M = 1, 4, 8 rows for the 2-bit linears and the 4-bit head; L = 1, 4, 8 queries
    assert len(qmm_checks) >= 6 and all(qmm_checks)
    assert len(attention_checks) == 3 and all(attention_checks)
    for step, (a, b) in enumerate(zip(with_kernels, without)):
        assert a.shape == b.shape
        assert_close(a, b.astype(np.float64), mx.float32, f"step {step}")


def test_the_hooks_reach_every_attention(monkeypatch):
    """Guards the test above: the hooked attend sees the int8 codes of every regular and reuse layer."""
    model = quantized_tiny_model()
    route_model_through_kernels(monkeypatch)
    calls = []
    original = kv_attention

    def counting(*args, **kw):
        calls.append(args[1].dtype)
        return original(*args, **kw)

    monkeypatch.setitem(globals(), "kv_attention", counting)
    cache = model.make_cache()
    model(mx.array(TOKENS[:5])[None], cache)
    layers = model.args.num_regular_layers + model.args.num_kv_reuse_layers
    assert calls == [mx.int8] * layers


@pytest.fixture(autouse=True)
def _no_leftover_backend():
    yield
    from afm_mlx.kernels import dispatch

    dispatch.force_backend(None)
