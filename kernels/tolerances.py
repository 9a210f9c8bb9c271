"""One tolerance table per activation dtype, used by the runtime self-check and by the tests.

A kernel output `y` matches a reference `ref` when max|y - ref| <= atol + rtol * max|ref|. The error is measured
against the largest reference magnitude, not element-wise: dot products cancel, and a small element carries
the absolute error of the large terms that produced it. rtol is a few units of the dtype's rounding of the
output (float16: 2^-11, bfloat16: 2^-8) or, in float32, of accumulating ~10^4 terms in a different order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCES: dict[mx.Dtype, Tolerance] = {
    mx.float32: Tolerance(rtol=1e-4, atol=1e-6),
    mx.float16: Tolerance(rtol=4e-3, atol=1e-4),
    mx.bfloat16: Tolerance(rtol=3e-2, atol=1e-3),
}


def self_check_dtype(dtype: mx.Dtype, backend: str) -> mx.Dtype:
    """The table row the runtime self-check holds a kernel to, given that its float32 oracle runs on the GPU.

    MLX computes float32 matmuls there in TF32 by default (MLX_ENABLE_TF32=1: CUDA, M5-class Apple GPUs), which
    keeps 10 mantissa bits, as float16 does; so a float32 kernel is checked with float16's bound unless
    MLX_ENABLE_TF32=0. (Seen on an H200: a correct float32 qmm_small + LoRA differed from the TF32 oracle by
    3.06e-3 at max|ref| 25, past float32's 2.55e-3.) The tests hold float32 kernels to float32's bound against
    a float64 NumPy oracle.
    """
    if dtype == mx.float32 and backend != "cpu" and os.environ.get("MLX_ENABLE_TF32", "1") != "0":
        return mx.float16
    return dtype


def max_error(actual, expected) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|) computed in float64."""
    a = np.asarray(_to_numpy(actual), np.float64)
    e = np.asarray(_to_numpy(expected), np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape {a.shape} != reference shape {e.shape}")
    if a.size == 0:
        return 0.0, 0.0
    return float(np.max(np.abs(a - e))), float(np.max(np.abs(e)))


def within_tolerance(actual, expected, dtype: mx.Dtype) -> tuple[bool, str]:
    """(ok, description) for `actual` against `expected` with the tolerance of `dtype`; NaN never passes."""
    tol = TOLERANCES[dtype]
    err, scale = max_error(actual, expected)
    bound = tol.atol + tol.rtol * scale
    ok = bool(np.isfinite(err) and err <= bound)
    detail = f"rtol {tol.rtol:g} x max|ref| {scale:.3g} + atol {tol.atol:g}"
    return ok, f"max abs error {err:.3g} vs bound {bound:.3g} ({detail})"


def _to_numpy(x):
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
    return x
