"""Float64 NumPy oracles for the kernels, written from the spec, plus test helpers shared by test_kernels_*.

Spec (MLX affine quantization, as `mx.quantize` produces it): row n of W is cut into groups of `group_size`
consecutive values along K; value k is the code q (an unsigned `bits`-bit integer) stored in uint32 word
k // (32 / bits) of row n at bits [bits * (k % (32 / bits)), +bits) (low bits first), and dequantizes to
scale[n, k // group_size] * q + bias[n, k // group_size].
Attention: query head h reads KV head h // (H / KV); the L queries are at positions kv_len - L .. kv_len - 1 and,
causally, query l sees keys 0 .. kv_len - L + l; K = codes * k_scale, V = codes * v_scale.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np

import metal_emu
from afm_mlx.kernels import dispatch

FLOAT_DTYPES = [mx.float32, mx.float16, mx.bfloat16]


# ---- quantized matmul ----


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] codes in [0, 2^bits) -> [N, K * bits / 32] uint32, low bits first."""
    per_word = 32 // bits
    n, k = q.shape
    words = q.astype(np.uint64).reshape(n, k // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)[None, None, :]
    return (words << shifts).sum(axis=-1).astype(np.uint32)


def unpack_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """[N, K * bits / 32] uint32 -> [N, K] codes."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    return ((w[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)


def dequantize(w, scales, biases, bits: int, group_size: int) -> np.ndarray:
    q = unpack_codes(np.asarray(w), bits).astype(np.float64)
    s = np.repeat(f64(scales), group_size, axis=1)
    b = np.repeat(f64(biases), group_size, axis=1)
    return s * q + b


def qmm_oracle(x, w, scales, biases, bits: int, group_size: int, lora=None, dense=None) -> np.ndarray:
    """y[..., N] = x @ dequant(w)^T (+ lora_scale * x @ A @ B) in float64; `dense`: dequant(w) if already known."""
    dense = dequantize(w, scales, biases, bits, group_size) if dense is None else dense
    y = f64(x) @ dense.T
    if lora is not None:
        a, b, lora_scale = lora
        y = y + lora_scale * (f64(x) @ f64(a)) @ f64(b)
    return y


def random_quantized(rng: np.random.Generator, n: int, k: int, bits: int, group_size: int, dtype=mx.float32):
    """(w uint32, scales, biases) in `dtype`, built from random codes (not through mx.quantize)."""
    q = rng.integers(0, 1 << bits, size=(n, k))
    groups = (n, k // group_size)
    scales = rng.uniform(0.5, 1.5, size=groups) * rng.choice([-1, 1], size=groups) / (1 << bits)
    biases = rng.normal(0, 0.5, size=(n, k // group_size)) / (1 << bits)
    return (mx.array(pack_codes(q, bits)), mx.array(scales.astype(np.float32)).astype(dtype),
            mx.array(biases.astype(np.float32)).astype(dtype))


# ---- attention over int8 codes ----


def attention_oracle(q, k_codes, v_codes, k_scale: float, v_scale: float, scale: float, kv_len: int,
                     causal: bool = True) -> np.ndarray:  # fmt: skip
    q = f64(q)
    b, h, l, d = q.shape
    kv = k_codes.shape[1]
    k = np.asarray(k_codes)[:, :, :kv_len].astype(np.float64) * k_scale
    v = np.asarray(v_codes)[:, :, :kv_len].astype(np.float64) * v_scale
    heads = np.arange(h) // (h // kv)
    scores = scale * np.einsum("bhld,bhsd->bhls", q, k[:, heads])
    if causal:
        visible = np.arange(kv_len)[None, :] <= (kv_len - l + np.arange(l))[:, None]
        scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhls,bhsd->bhld", p, v[:, heads])


def random_codes(rng: np.random.Generator, shape) -> mx.array:
    return mx.array(rng.integers(-128, 128, size=shape).astype(np.int8))


# ---- helpers ----


def f64(a) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32)).astype(np.float64)
    return np.asarray(a, np.float64)


def assert_close(actual, expected, dtype, what: str = "") -> None:
    """Within the kernels' tolerance table for `dtype` (max error against the largest reference magnitude)."""
    from afm_mlx.kernels import within_tolerance

    ok, detail = within_tolerance(f64(actual), expected, dtype)
    assert ok, f"{what}: {detail}"


EMULATED_FACTORIES = {"metal": metal_emu.metal_kernel, "cuda": metal_emu.cuda_kernel}


@contextmanager
def emulated(which: str):
    """Route afm_mlx.kernels' dispatch through the CPU emulation of the Metal or CUDA kernels."""
    saved = dict(dispatch.FACTORIES)
    dispatch.FACTORIES[which] = EMULATED_FACTORIES[which]
    dispatch.force_backend(which)
    try:
        yield
    finally:
        dispatch.FACTORIES.clear()
        dispatch.FACTORIES.update(saved)
        dispatch.force_backend(None)


def kernel_verdicts(name: str) -> list[bool]:
    """Self-check verdicts recorded so far for kernel `name` ('qmm_small' / 'kv_attention')."""
    return [ok for key, ok in dispatch.verdicts().items() if key[0] == name]
