"""qmm_small: the MLX reference (CPU path) and the Metal and CUDA kernels (run through the CPU emulator) against a
float64 NumPy oracle written from MLX's affine-quantization spec."""

from __future__ import annotations

import warnings
import zlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from afm_mlx.kernels import dispatch, lora_block_diagonal, qmm, qmm_small, qmm_small_reference, quantized_linear_small
from kernel_oracles import (
    assert_close,
    dequantize,
    emulated,
    kernel_verdicts,
    pack_codes,
    qmm_oracle,
    random_quantized,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mx_quantize_packs_as_the_spec_says(bits, group_size):
    """Our oracle's reading of the packing (low bits first, scale * q + bias) is what mx.quantize writes."""
    rng = np.random.default_rng(bits * 1000 + group_size)
    w = mx.array(rng.normal(size=(6, 256)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    expected = np.array(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits))
    np.testing.assert_allclose(dequantize(wq, scales, biases, bits, group_size), expected, rtol=1e-6, atol=1e-6)
    codes = unpack_codes(np.array(wq), bits)
    np.testing.assert_array_equal(pack_codes(codes, bits), np.array(wq))


@pytest.mark.parametrize("m", [1, 3, 8, 11])
@pytest.mark.parametrize("bits,group_size", [(2, 64), (4, 32)])
def test_reference_matches_oracle(m, bits, group_size):
    rng = np.random.default_rng(m + bits)
    w, scales, biases = random_quantized(rng, 24, 192, bits, group_size)
    x = mx.array(rng.normal(size=(m, 192)).astype(np.float32))
    a, b = (mx.array(rng.normal(size=shape).astype(np.float32)) for shape in [(192, 5), (5, 24)])
    lora = (a, b, 0.5)
    for lo in (None, lora):
        y = qmm_small(x, w, scales, biases, bits=bits, group_size=group_size, lora=lo)  # CPU: the reference
        assert_close(y, qmm_oracle(x, w, scales, biases, bits, group_size, lo), mx.float32, "reference")


# (backend, x dtype, scales dtype, M, N, K, bits, group, lora rank): odd N (partial SIMD-groups), K whose word
# count is below / not a multiple of the 32 lanes, every dtype, LoRA ranks below and above the lane count.
KERNEL_CASES = [
    ("metal", mx.float32, mx.float32, 1, 13, 96, 4, 32, 0),
    ("metal", mx.float32, mx.float32, 7, 8, 2048, 4, 64, 0),
    ("metal", mx.float32, mx.float32, 8, 24, 256, 2, 64, 0),
    ("metal", mx.float16, mx.float16, 5, 17, 256, 4, 128, 0),
    ("metal", mx.bfloat16, mx.bfloat16, 3, 9, 128, 2, 32, 0),
    ("metal", mx.float16, mx.float16, 4, 16, 384, 2, 128, 5),
    ("metal", mx.bfloat16, mx.float32, 2, 11, 192, 4, 64, 40),
    ("cuda", mx.float32, mx.float32, 8, 13, 256, 2, 32, 3),
    ("cuda", mx.float16, mx.float16, 4, 9, 384, 2, 128, 0),
    ("cuda", mx.bfloat16, mx.bfloat16, 1, 16, 128, 4, 64, 0),
    ("cuda", mx.float16, mx.float32, 6, 10, 256, 4, 32, 33),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)).replace("mlx.core.", ""))
def test_emulated_kernel_matches_oracle(case):
    which, dtype, scale_dtype, m, n, k, bits, group_size, rank = case
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    w, scales, biases = random_quantized(rng, n, k, bits, group_size, scale_dtype)
    x = mx.array(rng.normal(size=(m, k)).astype(np.float32)).astype(dtype)
    lora = None
    if rank:
        a = mx.array(rng.normal(0, 0.1, size=(k, rank)).astype(np.float32)).astype(dtype)
        b = mx.array(rng.normal(0, 0.1, size=(rank, n)).astype(np.float32)).astype(dtype)
        lora = (a, b, 2.0)
    with emulated(which), warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check would warn and fall back
        y = qmm_small(x, w, scales, biases, bits=bits, group_size=group_size, lora=lora)
        assert kernel_verdicts("qmm_small") == [True]
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, qmm_oracle(x, w, scales, biases, bits, group_size, lora), dtype, f"{which} kernel")


@pytest.mark.parametrize("which", ["metal", "cuda"])
def test_every_weight_word_is_read_once(which):
    """All M = 8 rows come from one pass over the weights: each uint32 word, scale and bias read exactly once per
    word of its group (the emulator counts reads per element)."""
    rng = np.random.default_rng(7)
    n, k, bits, group_size = 13, 512, 2, 64
    w, scales, biases = random_quantized(rng, n, k, bits, group_size)
    x = mx.array(rng.normal(size=(8, k)).astype(np.float32))
    with emulated(which):
        qmm_small(x, w, scales, biases, bits=bits, group_size=group_size)
        kern = dispatch.kernel("qmm_small", which, qmm.INPUTS, ["y"])
    reads = kern.last_reads
    assert (reads["w"] == 1).all(), np.unique(reads["w"])
    words_per_group = group_size * bits // 32
    assert (reads["scales"] == words_per_group).all() and (reads["biases"] == words_per_group).all()


def test_leading_dims_and_unsupported_shapes():
    """[B, L, K] inputs are flattened to M = B * L rows; M > 8 or 3-bit weights use the reference, not the kernel."""
    rng = np.random.default_rng(3)
    w4, s4, b4 = random_quantized(rng, 16, 128, 4, 32)
    w3, s3, b3 = (mx.array(a) for a in mx.quantize(mx.array(rng.normal(size=(16, 128)).astype(np.float32)), 32, 3))
    x = mx.array(rng.normal(size=(2, 3, 128)).astype(np.float32))
    big = mx.array(rng.normal(size=(3, 4, 128)).astype(np.float32))
    with emulated("metal"):
        y = qmm_small(x, w4, s4, b4, bits=4, group_size=32)
        assert kernel_verdicts("qmm_small") == [True]
        y_big = qmm_small(big, w4, s4, b4, bits=4, group_size=32)
        y3 = qmm_small(x, w3, s3, b3, bits=3, group_size=32)
        assert len(dispatch.verdicts()) == 1
    assert y.shape == (2, 3, 16) and y_big.shape == (3, 4, 16)
    assert_close(y, qmm_oracle(x, w4, s4, b4, 4, 32), mx.float32, "leading dims")
    reference = qmm_small_reference(big, w4, s4, b4, bits=4, group_size=32)
    np.testing.assert_array_equal(np.array(y_big), np.array(reference))
    np.testing.assert_array_equal(np.array(y3), np.array(mx.quantized_matmul(x, w3, s3, b3, group_size=32, bits=3)))


def test_quantized_linear_small_equals_the_layer():
    rng = np.random.default_rng(5)
    layer = nn.QuantizedLinear(64, 24, bias=True, group_size=32, bits=2)
    layer.bias = mx.array(rng.normal(size=24).astype(np.float32))
    dense = nn.Linear(64, 24, bias=False)
    x = mx.array(rng.normal(size=(1, 4, 64)).astype(np.float32))
    with emulated("metal"):
        y = quantized_linear_small(x, layer)
        np.testing.assert_allclose(np.array(quantized_linear_small(x, dense)), np.array(dense(x)), rtol=0, atol=0)
        assert kernel_verdicts("qmm_small") == [True]
    assert_close(y, np.array(layer(x)).astype(np.float64), mx.float32, "QuantizedLinear")


def test_multi_part_lora_through_a_block_diagonal_b():
    """The adapters' fused-QKV LoRA (A_q | A_k | A_v side by side, one B per part) as one (A, blockdiag(B)) pair."""
    rng = np.random.default_rng(8)
    parts, r, k = [16, 8, 8], 3, 64
    w, scales, biases = random_quantized(rng, sum(parts), k, 2, 32)
    a = mx.array(rng.normal(size=(k, 3 * r)).astype(np.float32))
    bs = [mx.array(rng.normal(size=(r, n)).astype(np.float32)) for n in parts]
    x = mx.array(rng.normal(size=(4, k)).astype(np.float32))
    base = qmm_oracle(x, w, scales, biases, 2, 32)
    per_part = np.concatenate([np.array(x @ a[:, i * r:(i + 1) * r] @ b, np.float64) for i, b in enumerate(bs)], axis=1)
    with emulated("metal"):
        y = qmm_small(x, w, scales, biases, bits=2, group_size=32, lora=(a, lora_block_diagonal(bs), 0.5))
        assert kernel_verdicts("qmm_small") == [True]
    assert_close(y, base + 0.5 * per_part, mx.float32, "multi-part LoRA")


def test_shape_errors_are_reported():
    rng = np.random.default_rng(1)
    w, scales, biases = random_quantized(rng, 8, 64, 4, 32)
    x = mx.zeros((2, 64))
    with pytest.raises(ValueError, match="uint32"):
        qmm_small(x, w, scales, biases, bits=2, group_size=32)
    with pytest.raises(ValueError, match="scales"):
        qmm_small(x, w, scales, biases, bits=4, group_size=64)
    with pytest.raises(ValueError, match="lora"):
        qmm_small(x, w, scales, biases, bits=4, group_size=32, lora=(mx.zeros((64, 2)), mx.zeros((3, 8)), 1.0))
