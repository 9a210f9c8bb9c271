"""CUDA kernels: the generated text compiles with the CUDA toolkit (no GPU needed), and on an NVIDIA GPU the real
kernels match the float64 oracle at AFM's shapes. (The CPU emulation of the CUDA bodies runs in
test_kernels_qmm.py / test_kernels_attention.py.)"""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.kernels import attention, dispatch, kv_attention, qmm, qmm_small
from kernel_oracles import (
    FLOAT_DTYPES,
    assert_close,
    attention_oracle,
    dequantize,
    kernel_verdicts,
    qmm_oracle,
    random_codes,
    random_quantized,
)
from metal_emu import cuda_compile, cuda_kernel

needs_gpu = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend and an NVIDIA GPU")


def generated_cuda_sources() -> list[str]:
    """The text mx.fast.cuda_kernel would hand to NVRTC for each kernel, per activation dtype."""
    sources = []
    for dt in FLOAT_DTYPES:
        for m, bits, gs, lora in [(4, 2, 128, True), (8, 4, 32, False)]:
            k = cuda_kernel("afm_qmm_small", qmm.INPUTS, ["y"], dispatch.body("qmm_small", "cuda"),
                            dispatch.header("cuda"))  # fmt: skip
            inputs = [mx.zeros((m, 256), dt), mx.zeros((8, 8 * bits), mx.uint32), mx.zeros((8, 256 // gs), dt),
                      mx.zeros((8, 256 // gs), dt), mx.zeros((m, 4)), mx.zeros((4, 8), dt), 256, 8, 4]  # fmt: skip
            template = [("T", dt), ("S", dt), ("BT", dt), ("M", m), ("BITS", bits), ("GS", gs), ("R", 4),
                        ("HAS_LORA", lora)]  # fmt: skip
            sources.append(k.generated_source(inputs, [dt], template))
        for d, l, g in [(128, 8, 8), (32, 1, 2)]:
            nsg, rps = attention.launch_shape(g * l)
            k = cuda_kernel("afm_kv_attention_partial", attention.PARTIAL_INPUTS, attention.PARTIAL_OUTPUTS,
                            dispatch.body("kv_attention_partial", "cuda"), dispatch.header("cuda"))  # fmt: skip
            codes = mx.zeros((1, 2, 64, d), mx.int8)
            inputs = [mx.zeros((1, 2 * g, l, d), dt), codes, codes, mx.array(0.1), 64, 64, 2, 64]
            template = [("T", dt), ("D", d), ("L", l), ("G", g), ("NSG", nsg), ("RPS", rps), ("CAUSAL", True)]
            sources.append(k.generated_source(inputs, [mx.float32] * 3, template))
        k = cuda_kernel("afm_kv_attention_reduce", attention.REDUCE_INPUTS, ["out"],
                        dispatch.body("kv_attention_reduce", "cuda"), dispatch.header("cuda"))  # fmt: skip
        inputs = [mx.zeros((8, 2, 128)), mx.zeros((8, 2)), mx.zeros((8, 2)), mx.array(0.1), 2]
        sources.append(k.generated_source(inputs, [dt], [("T", dt), ("D", 128)]))
    return sources


@pytest.mark.skipif(cuda_compile.find_nvcc() is None, reason="needs the CUDA toolkit's nvcc (set CUDA_HOME)")
def test_generated_cuda_text_compiles_for_sm90():
    ok, log = cuda_compile.compile_ptx(generated_cuda_sources(), arch="sm_90a")
    assert ok, log[-4000:]


# Spot rows: each (dtype, M, bits, group, LoRA) is a separate NVRTC compile of seconds, and on an H100 only 2 of
# these tests finished in 60 s with every M (benchmarks/results/cuda-nvidia-h100-80gb-hbm3/gpu_run-1.log). The
# same CUDA bodies run at other M and L, and odd shapes, in the emulator (test_kernels_qmm.py,
# test_kernels_attention.py).
def rows_for(dtype) -> list[int]:
    return [1, 2, 4, 8] if dtype == mx.bfloat16 else [1, 8]


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_qmm_small_on_gpu(dtype, bits):
    """AFM's FFN shape (K = 2048, N = 6656) at M = 1..8, group 32, and an odd small shape with LoRA rank 32."""
    dispatch.force_backend(None)
    rng = np.random.default_rng(bits)
    for n, k, group_size, rank, rows in [(6656, 2048, 128, 0, rows_for(dtype)), (6656, 2048, 32, 0, [3]),
                                         (77, 320, 64, 32, [2, 8])]:  # fmt: skip
        w, scales, biases = random_quantized(rng, n, k, bits, group_size, dtype)
        dense = dequantize(w, scales, biases, bits, group_size)
        lora = None
        if rank:
            shapes = [(k, rank), (rank, n)]
            a, b = (mx.array(rng.normal(0, 0.1, s).astype(np.float32)).astype(dtype) for s in shapes)
            lora = (a, b, 2.0)
        for m in rows:
            x = mx.array(rng.normal(size=(m, k)).astype(np.float32)).astype(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                y = qmm_small(x, w, scales, biases, bits=bits, group_size=group_size, lora=lora)
            assert_close(y, qmm_oracle(x, w, scales, biases, bits, group_size, lora, dense), dtype, f"M={m} N={n}")
    assert kernel_verdicts("qmm_small") and all(kernel_verdicts("qmm_small"))


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kv_attention_on_gpu(dtype):
    """AFM base (16 / 2 heads, D = 128) and draft (8 / 4 heads, D = 32) over long and short caches."""
    dispatch.force_backend(None)
    rng = np.random.default_rng(0)
    for h, kv, d, kv_len, s_alloc in [(16, 2, 128, 1000, 1024), (8, 4, 32, 77, 256), (16, 2, 128, 8, 256)]:
        kc, vc = random_codes(rng, (1, kv, s_alloc, d)), random_codes(rng, (1, kv, s_alloc, d))
        for l in rows_for(dtype):
            q = mx.array(rng.normal(size=(1, h, l, d)).astype(np.float32)).astype(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = kv_attention(q, kc, vc, 0.02, 0.01, scale=d**-0.5, kv_len=kv_len)
            expected = attention_oracle(q, kc, vc, 0.02, 0.01, d**-0.5, kv_len)
            assert_close(out, expected, dtype, f"H={h} D={d} L={l} S={kv_len}")
    assert kernel_verdicts("kv_attention") and all(kernel_verdicts("kv_attention"))
