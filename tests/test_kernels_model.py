"""The model's logits with the kernels equal those without, through the emulated Metal kernels on a tiny 2-bit
quantized config (head dim 32, GQA 2) with int8 K/V: prefill (reference path), decode (L = 1), verify (L = 4, 8).

The model routes its quantized linears (SmallBatchQuantizedLinear), its quantized head (Model.head) and its
int8 attention (model.attend, regular and KV-reuse layers) through afm_mlx.kernels whenever the kernel backend
is not the CPU; `emulated("metal")` makes the backend Metal, run by the CPU emulator.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx import kernels
from afm_mlx.presets import tiny_base
from kernel_oracles import assert_close, emulated, kernel_verdicts
from toolkit_fixtures import (STEP_TOKENS, decode_verify_logits, mlx_model_from_toolkit, quantize_tiny,
                              toolkit_weights)


def quantized_tiny_model():
    model = quantize_tiny(mlx_model_from_toolkit(toolkit_weights(tiny_base(hidden_dim=128, num_heads=4,
                                                                           num_kv_heads=2), seed=3)))
    args = model.args  # five projections in every regular (qkv, out, gate, up, down) and reuse layer
    assert kernels.use_small_batch_kernels(model) == 5 * (args.num_regular_layers + args.num_kv_reuse_layers)
    return model


def test_model_logits_with_kernels_equal_without():
    model = quantized_tiny_model()
    without = decode_verify_logits(model)
    with emulated("metal"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel may fail its self-check and fall back
        with_kernels = decode_verify_logits(model)
        qmm_checks, attention_checks = kernel_verdicts("qmm_small"), kernel_verdicts("kv_attention")
    # the kernels really ran: M = 1, 4, 8 rows for the 2-bit linears and the 4-bit head; L = 1, 4, 8 queries
    assert len(qmm_checks) >= 6 and all(qmm_checks)
    assert len(attention_checks) == 3 and all(attention_checks)
    for step, (a, b) in enumerate(zip(with_kernels, without)):
        assert a.shape == b.shape
        assert_close(a, b.astype(np.float64), mx.float32, f"step {step}")


def test_adapter_logits_with_the_fused_lora_kernel_equal_without():
    """With an adapter active, every few-row quantized projection takes its LoRA term into qmm_small's reduction
    (x @ A by MLX, @ B in the kernel): the logits match the plain LoRA path's."""
    from afm_mlx import bench
    from afm_mlx.adapters import add_adapter
    from afm_mlx.kernels import dispatch

    model = quantized_tiny_model()
    add_adapter(model, bench.random_adapter(model.args, 4, seed=1), "a", activate=True)
    without = decode_verify_logits(model)
    with emulated("metal"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with_kernels = decode_verify_logits(model)
        with_lora = [ok for key, ok in dispatch.verdicts().items() if key[0] == "qmm_small" and key[7]]
    assert len(with_lora) >= 3 and all(with_lora)  # M = 1, 4, 8 with the LoRA term fused
    for step, (a, b) in enumerate(zip(with_kernels, without)):
        assert_close(a, b.astype(np.float64), mx.float32, f"step {step}")


def test_every_attention_reads_int8_codes(monkeypatch):
    """Guards the test above: with a GPU backend, every regular and reuse layer attends through the kernel."""
    model = quantized_tiny_model()
    calls = []
    original = kernels.kv_attention

    def counting(*args, **kw):
        calls.append(args[1].dtype)
        return original(*args, **kw)

    monkeypatch.setattr(kernels, "kv_attention", counting)
    with emulated("metal"):
        model(mx.array(STEP_TOKENS[:5])[None], model.make_cache())
    layers = model.args.num_regular_layers + model.args.num_kv_reuse_layers
    assert calls == [mx.int8] * layers


@pytest.fixture(autouse=True)
def _no_leftover_backend():
    yield
    from afm_mlx.kernels import dispatch

    dispatch.force_backend(None)


def test_model_keeps_mlx_ops_on_cuda(monkeypatch):
    """On CUDA both kernels measured slower in the model than MLX's own ops (dispatch.MODEL_BACKENDS): the model
    must route neither its linears and head through qmm_small nor its int8 attention through kv_attention there."""
    from afm_mlx.kernels import qmm

    model = quantized_tiny_model()
    calls = []
    monkeypatch.setattr(qmm, "qmm_small", lambda *a, **k: calls.append("qmm_small"))
    monkeypatch.setattr(kernels, "qmm_small", lambda *a, **k: calls.append("qmm_small"))
    monkeypatch.setattr(kernels, "kv_attention", lambda *a, **k: calls.append("kv_attention"))
    with emulated("cuda"):
        logits = model(mx.array(STEP_TOKENS[:5])[None], model.make_cache())
        assert not kernels.model_uses("qmm_small") and not kernels.model_uses("kv_attention")
    assert calls == [] and logits.shape == (1, 5, model.args.vocab_size)
