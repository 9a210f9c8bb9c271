"""qmm_small: x[M, K] @ dequant(W)[N, K]^T for the few rows of decode and speculative verification (M = 1..8).

MLX's quantized_matmul costs ~2.3x at M = 4 what it costs at M = 1 for 2-bit weights (mlx #3852); this kernel
reads every weight word once and applies it to all M rows, so its cost stays close to the M = 1 weight read.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from .reference import qmm_small_reference
from .tolerances import TOLERANCES

MIN_ROWS, MAX_ROWS = 1, 8  # raise MIN_ROWS to 2 where MLX's own M = 1 kernel measures faster (kernels_bench.py)
KERNEL_BITS = (2, 4)
KERNEL_GROUPS = (32, 64, 128)
ROWS_PER_SIMDGROUP = 4  # output rows per SIMD-group / warp
SIMDGROUPS = 2  # per threadgroup / block
INPUTS = ["x", "w", "scales", "biases", "lora_t", "lora_b", "k", "n", "rank"]


def _check_shapes(x, w, scales, biases, bits, group_size, lora) -> None:
    k = x.shape[-1]
    n = w.shape[0]
    if w.dtype != mx.uint32 or w.ndim != 2 or w.shape[1] * 32 != k * bits:
        raise ValueError(f"w must be uint32 [N, K*bits/32] = [{n}, {k * bits // 32}], got {w.dtype} {w.shape}")
    if k % group_size or scales.shape != (n, k // group_size) or biases.shape != scales.shape:
        raise ValueError(f"scales/biases must be [N, K/group_size] = [{n}, {k // group_size}], got {scales.shape}")
    if lora is not None:
        a, b, _ = lora
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != k or b.shape != (a.shape[1], n):
            raise ValueError(f"lora needs A[K, r], B[r, N] with K={k}, N={n}; got {a.shape}, {b.shape}")


def _uses_kernel(which: str, m: int, x, bits: int, group_size: int) -> bool:
    return (which != "cpu" and max(MIN_ROWS, 1) <= m <= MAX_ROWS and bits in KERNEL_BITS and group_size in KERNEL_GROUPS
            and x.dtype in TOLERANCES)  # fmt: skip


def _launch(which: str, x2, w, scales, biases, bits: int, group_size: int, lora):
    m, k = x2.shape
    n = w.shape[0]
    if lora is not None:
        a, lora_b, lora_scale = lora
        lora_t = (x2 @ a.astype(x2.dtype)).astype(mx.float32) * lora_scale  # [M, r], in x's dtype like mlx-lm
        rank = a.shape[1]
    else:
        lora_t, lora_b, rank = mx.zeros((1,), mx.float32), mx.zeros((1,), x2.dtype), 0
    rows_per_group = ROWS_PER_SIMDGROUP * SIMDGROUPS  # module constants, read per call (benchmarks sweep them)
    kern = dispatch.kernel("qmm_small", which, INPUTS, ["y"])
    return kern(
        inputs=[x2, w, scales, biases, lora_t, lora_b, k, n, rank],
        template=[("T", x2.dtype), ("S", scales.dtype), ("BT", lora_b.dtype), ("M", m), ("BITS", bits),
                  ("GS", group_size), ("R", ROWS_PER_SIMDGROUP), ("HAS_LORA", lora is not None)],
        grid=(32 * SIMDGROUPS * math.ceil(n / rows_per_group), 1, 1),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x2.dtype],
    )[0]  # fmt: skip


def qmm_small(x, w, scales, biases, *, bits: int, group_size: int, lora=None) -> mx.array:
    """y[..., N] = x[..., K] @ dequant(w)^T (+ lora_scale * (x @ A) @ B), MLX affine packing (mx.quantize).

    w [N, K*bits/32] uint32, scales/biases [N, K/group_size]; lora = (A[K, r], B[r, N], lora_scale) or None.
    The custom kernel runs for 1..8 rows, bits 2/4, groups 32/64/128 on Metal or CUDA; otherwise, and on the
    CPU, this is `mx.quantized_matmul` (+ the LoRA term).
    """
    _check_shapes(x, w, scales, biases, bits, group_size, lora)
    k, n = x.shape[-1], w.shape[0]
    m = x.size // k if k else 0
    which = dispatch.backend()
    if not _uses_kernel(which, m, x, bits, group_size):
        return qmm_small_reference(x, w, scales, biases, bits=bits, group_size=group_size, lora=lora)
    x2 = x.reshape(m, k)
    args = dict(bits=bits, group_size=group_size, lora=lora)
    shape_class = ("qmm_small", which, str(x.dtype), str(scales.dtype), m, bits, group_size, lora is not None,
                   ROWS_PER_SIMDGROUP, SIMDGROUPS)  # fmt: skip
    y = dispatch.checked(
        shape_class,
        run_kernel=lambda: _launch(which, x2, w, scales, biases, bits, group_size, lora),
        run_oracle=lambda: qmm_small_reference(x2, w, scales, biases, dtype=mx.float32, **args),
        run_fallback=lambda: qmm_small_reference(x2, w, scales, biases, **args),
        dtype=x.dtype,
    )
    return y.reshape(*x.shape[:-1], n)


def quantized_linear_small(x, layer, lora=None) -> mx.array:
    """`layer(x)` (+ the LoRA term) for an affine `nn.QuantizedLinear`, through qmm_small for 1..8 rows.

    Any other layer (nn.Linear, another quantization mode) is called as is, with the LoRA term added in x's
    dtype; so a model can route all its linears through here. lora = (A[K, r], B[r, N], lora_scale) or None.
    """
    if not isinstance(layer, nn.QuantizedLinear) or getattr(layer, "mode", "affine") != "affine":
        return add_lora(layer(x), x, lora)
    y = qmm_small(x, layer.weight, layer.scales, layer.biases, bits=layer.bits, group_size=layer.group_size,
                  lora=lora)  # fmt: skip
    if "bias" in layer:
        y = y + layer.bias
    return y


def add_lora(y: mx.array, x: mx.array, lora) -> mx.array:
    """y + lora_scale * (x @ A) @ B in y's dtype, as one matmul and one addmm; lora = (A, B, lora_scale) or None."""
    if lora is None:
        return y
    a, b, lora_scale = lora
    return mx.addmm(y, x @ a, b, alpha=lora_scale).astype(y.dtype)


def lora_block_diagonal(bs: list[mx.array]) -> mx.array:
    """One B [sum r_k, sum N_k] for a LoRA whose output parts (Q | K | V) each have their own B_k [r_k, N_k] and
    whose A_k sit side by side in one A: x @ A @ blockdiag(B_k) = concat_k(x @ A_k @ B_k). Build it once per
    adapter activation, then pass (A, blockdiag, scale) as qmm_small's lora."""
    total = sum(b.shape[1] for b in bs)
    rows, start = [], 0
    for b in bs:
        left, right = start, total - start - b.shape[1]
        rows.append(mx.concatenate([mx.zeros((b.shape[0], left), b.dtype), b, mx.zeros((b.shape[0], right), b.dtype)],
                                   axis=1))  # fmt: skip
        start += b.shape[1]
    return mx.concatenate(rows, axis=0)


class SmallBatchQuantizedLinear(nn.QuantizedLinear):
    """An affine nn.QuantizedLinear whose few-row calls (decode, verification) go through qmm_small where that
    pays (dispatch.MODEL_BACKENDS).

    Same parameters and names as its base class; elsewhere, and for more than MAX_ROWS rows, it computes
    exactly what nn.QuantizedLinear does (mx.quantized_matmul).
    """

    def __call__(self, x: mx.array, lora=None) -> mx.array:
        """lora = (A, B, lora_scale): an adapter's term, fused into the kernel's reduction where it runs."""
        if dispatch.model_uses("qmm_small"):
            return quantized_linear_small(x, self, lora)
        return add_lora(super().__call__(x), x, lora)


def use_small_batch_kernels(model: nn.Module) -> int:
    """Make every affine QuantizedLinear of `model` a SmallBatchQuantizedLinear; returns how many.

    The class is swapped in place (parameters untouched), so this runs after loading, before adapters wrap.
    """
    swapped = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and module.mode == "affine":
            module.__class__ = SmallBatchQuantizedLinear
            swapped += 1
    return swapped
