"""The CPU tuning (afm_mlx.cpu): row-parallel matmuls over several CPU streams, fused rms_norm.

Each output row of a split matmul is computed by the same op from the same inputs, so a tuned model must give
bit-identical logits to an untuned one, for quantized and float weights, prefill, decode and verify, with and
without a LoRA adapter. The tiny test models' calls are far below PARALLEL_MIN_MACS, so the tests lower it to 1
to split every matmul.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import afm_mlx.loading as loading
from afm_mlx import cpu
from afm_mlx.adapters import load_adapter
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.presets import tiny_base
from adapter_fixtures import toolkit_lora
from toolkit_fixtures import decode_verify_logits, mlx_model_from_toolkit, quantize_tiny, toolkit_weights


def test_row_parallel_splits_rows_over_streams_and_matches_whole(monkeypatch):
    monkeypatch.setenv("AFM_MLX_CPU_STREAMS", "3")
    monkeypatch.setattr(cpu, "PARALLEL_MIN_MACS", 1)
    calls = []

    def matmul(x, w, stream):
        calls.append((w.shape[0], stream))
        return mx.matmul(x, w.T, stream=stream)

    x, linear = mx.random.normal((2, 5, 16)), nn.Linear(16, 7, bias=False)
    y = cpu.row_parallel(matmul, x, linear, ("weight",))
    assert [rows for rows, _ in calls] == [2, 2, 3]  # 7 rows in three blocks, in order
    streams = [s for _, s in calls]
    assert streams[0] is None and all(s is not None for s in streams[1:]) and streams[1] != streams[2]
    np.testing.assert_array_equal(np.array(y), np.array(x @ linear.weight.T))
    linear.weight = linear.weight * 2  # new weights: new blocks, not the cached ones
    np.testing.assert_array_equal(np.array(cpu.row_parallel(matmul, x, linear, ("weight",))),
                                  np.array(x @ linear.weight.T))


def test_a_first_call_inside_mx_compile_splits_lazily(monkeypatch):
    monkeypatch.setenv("AFM_MLX_CPU_STREAMS", "2")
    monkeypatch.setattr(cpu, "PARALLEL_MIN_MACS", 1)
    linear = nn.Linear(16, 6, bias=False)
    linear.__class__ = cpu.ParallelLinear
    x = mx.random.normal((3, 16))
    y = mx.compile(lambda x: linear(x), inputs=linear.state)(x)  # the weights are traced: no eval possible
    assert "_row_blocks" not in linear.__dict__  # nothing evaluated (or cached) while tracing
    np.testing.assert_array_equal(np.array(y), np.array(x @ linear.weight.T))


def test_one_stream_means_no_split(monkeypatch):
    monkeypatch.setenv("AFM_MLX_CPU_STREAMS", "1")
    calls = []
    cpu.row_parallel(lambda x, w, s: calls.append(w.shape) or x @ w.T, mx.ones((1, 4)), nn.Linear(4, 6), ("weight",))
    assert calls == [(6, 4)]


def _model(quantized: bool, tune: bool, monkeypatch):
    monkeypatch.setattr(loading, "tune_for_device", loading.tune_for_device if tune else lambda model: None)
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(hidden_dim=128, num_heads=4, num_kv_heads=2), seed=3))
    if quantized:
        quantize_tiny(model)
        if tune:
            loading.tune_for_device(model)
    return model


@pytest.mark.parametrize("quantized", [True, False], ids=["2-bit", "float"])
@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
def test_tuned_model_logits_are_bit_identical(quantized, adapter, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "PARALLEL_MIN_MACS", 1)
    monkeypatch.setenv("AFM_MLX_CPU_STREAMS", "2")
    tuned, plain = _model(quantized, True, monkeypatch), _model(quantized, False, monkeypatch)
    args = tuned.args  # every projection, the head and every norm were swapped
    layers = args.num_regular_layers + args.num_kv_reuse_layers
    assert cpu.tune_for_cpu(tuned) == {"parallel": 0, "fused_norms": 0}  # already done: nothing left to swap
    assert sum(isinstance(m, cpu.FusedRMSNorm) for _, m in tuned.named_modules()) == \
        3 * layers + args.num_regular_layers + 1
    assert sum(type(m).__name__.startswith("Parallel") for _, m in tuned.named_modules()) == 5 * layers + 1
    if adapter:
        path = tmp_path / "adapter.pt"
        save_checkpoint(path, toolkit_lora(args, 5, rank=4, gain=50.0).items())
        for model in (tuned, plain):
            load_adapter(model, path, activate=True)
    tuned_logits = decode_verify_logits(tuned)
    plain_logits = decode_verify_logits(plain)
    for a, b in zip(tuned_logits, plain_logits):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows, n, parts", [(1, 768, 1), (2, 768, 2), (2, 256, 1), (1, 8192, 2)],
                         ids=["demo-linear-decode", "demo-linear-verify-2", "demo-out-proj-verify-2", "demo-head"])
def test_calls_split_by_multiply_adds(rows, n, parts, monkeypatch):
    monkeypatch.setenv("AFM_MLX_CPU_STREAMS", "2")
    calls = []
    cpu.row_parallel(lambda x, w, s: calls.append(w.shape) or x @ w.T, mx.ones((1, rows, 256)), nn.Linear(256, n),
                     ("weight",))
    assert len(calls) == parts


def test_demo_model_is_tuned_on_cpu():
    model, _ = loading.load_model()
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert {"ParallelQuantizedLinear", "ParallelQuantizedEmbedding", "FusedRMSNorm"} <= kinds
    assert not kinds & {"QuantizedLinear", "QuantizedEmbedding", "RMSNorm"}
