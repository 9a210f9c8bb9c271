"""One tolerance table per activation dtype, used by the runtime self-check and by the tests.

A kernel output `y` matches a reference `ref` when max|y - ref| <= atol + rtol * max|ref|. The error is measured
against the largest reference magnitude, not element-wise: dot products cancel, and a small element carries
the absolute error of the large terms that produced it. rtol is a few units of the dtype's rounding of the
output (float16: 2^-11, bfloat16: 2^-8) or, in float32, of accumulating ~10^4 terms in a different order.
"""

from __future__ import annotations

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
