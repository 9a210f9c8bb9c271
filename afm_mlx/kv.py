"""The int8 K/V of AFM's fake-quant, and causal attention over a regular layer's cached history.

K/V are fake-quantised to int8 with one scalar scale per layer (tamm computes it in fp32), so the cache stores
the codes; `KVHistory` is what a regular layer leaves for the KV-reuse layers that attend to it; `attend` picks
the kernel that reads the codes, or dequantise + MLX's SDPA (on the CPU, where SDPA is a graph of ops, the same
ops with the query heads grouped: grouped_attention). Shapes: B batch, H query heads, KV key/value heads,
L new tokens, S cached positions, D head dim.
"""

from __future__ import annotations

from functools import lru_cache, partial

import mlx.core as mx

from . import kernels
from .dtypes import backend_name
from .kernels.reference import dequantize_codes, quantize_codes


# The K/V fake-quant, each half compiled into one fused kernel (on a launch-bound GPU every node costs; the
# CUDA-graph error the 3B prefill once raised came from MLX's float32 quantized matmul past 128 rows, not from
# these: benchmarks/results/cuda-nvidia-h100-80gb-hbm3/gpu_run-1.log). Elementwise: shapeless, one trace.
int8_codes = mx.compile(quantize_codes, shapeless=True)


@lru_cache(maxsize=None)
def _dequantize(dtype: mx.Dtype):
    return mx.compile(partial(dequantize_codes, dtype=dtype), shapeless=True)


def dequantize_int8(codes: mx.array, scale: mx.array, dtype: mx.Dtype) -> mx.array:
    """codes * scale in float32, cast to `dtype` (kernels.reference.dequantize_codes), compiled per dtype."""
    return _dequantize(dtype)(codes, scale)


# Few-row attention (speculative verification) over the whole cache buffer with an explicit mask, on these
# backends. MLX's CUDA SDPA runs L > 1 queries through cuDNN, which builds a graph per distinct (q, k, v) shape
# (mlx/backend/cuda/scaled_dot_product_attention.cpp); the valid K/V length changes every round, so every verify
# pays a build: the 3B verify forward took 50 ms per round against a 9.4 ms decode step on an H100, and a 3-row
# demo verify at lengths 129..168 took 48.7 ms over the prefix, 1.72 ms padded (H200, verify_probe.py, gpu_run-2.log
# in benchmarks/results/cuda-nvidia-h200/). The buffer grows in KVCache.step chunks, so its shape, and the graph,
# hold for 256 positions. The compiled step (afm_mlx.step) pads every step on every backend, decode too: nothing in
# its trace may depend on the length.
PADDED_ATTENTION_BACKENDS = ("cuda",)
PADDED_ATTENTION_MAX_ROWS = 16


class KVHistory:
    """A regular layer's K/V after this step: whole cache buffers [B, KV, S_alloc, D] with `length` valid.

    Int8 codes with scalar scales under kv-quant (the kernel reads them directly), floats otherwise. The float
    view is dequantised once and shared by every layer that attends to it (all the reuse layers).
    """

    def __init__(self, keys, values, key_scale, value_scale, length: int):
        self.keys, self.values, self.key_scale, self.value_scale = keys, values, key_scale, value_scale
        self.length = length
        self._floats = {}

    def floats(self, dtype: mx.Dtype, padded: bool = False) -> tuple[mx.array, mx.array]:
        """K/V as floats: the valid [B, KV, length, D], or (padded) the whole buffers [B, KV, S_alloc, D].

        Kept per (dtype, padded): a layer attending in another dtype must not get the first caller's arrays."""
        key = (dtype, padded)
        if key not in self._floats:
            k, v = (self.keys, self.values) if padded else (self.keys[..., :self.length, :],
                                                            self.values[..., :self.length, :])
            if self.key_scale is not None:
                k, v = dequantize_int8(k, self.key_scale, dtype), dequantize_int8(v, self.value_scale, dtype)
            self._floats[key] = (k, v)
        return self._floats[key]


def padded_causal_mask(rows: int, length: int | mx.array, size: int, dtype: mx.Dtype, groups: int = 1) -> mx.array:
    """Additive mask [1, 1, groups * rows, size]: query i of each group sits at position length - rows + i and
    sees keys 0 .. that (groups > 1: the rows of grouped_attention, each KV head's query heads one after another).

    `length` may be an int32 array [B] (the compiled step's position, B = 1; or a batch whose rows have their own
    lengths, afm_mlx.batch): the mask is then [B, 1, groups * rows, size], row b's slots past its length hidden.
    Built once per forward by model.Span.mask.
    """
    if isinstance(length, mx.array):
        last_visible = (mx.arange(groups * rows) % rows)[None, :, None] + (length - rows)[:, None, None]
        visible = mx.arange(size)[None, None, :] <= last_visible
        return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))[:, None]
    last_visible = (mx.arange(groups * rows) % rows)[:, None] + (length - rows)
    visible = mx.arange(size)[None, :] <= last_visible
    return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))[None, None]


def grouped_attention(q: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array) -> mx.array:
    """MLX's SDPA as its CPU backend computes it (the op-by-op fallback), with each KV head's query heads as the
    rows of one matmul [B, KV, groups * L, D] instead of a broadcast over a group axis: the same products and
    sums, fewer graph nodes. mask: padded_causal_mask(..., groups)."""
    B, H, L, D = q.shape
    kv_heads = keys.shape[1]
    q = (mx.array(scale, q.dtype) * q).reshape(B, kv_heads, H // kv_heads * L, D)
    weights = mx.softmax(q @ keys.swapaxes(-1, -2) + mask, axis=-1, precise=True)
    return (weights @ values).reshape(B, H, L, D)


def attend(q: mx.array, kv: KVHistory, scale: float, span) -> mx.array:
    """Causal GQA attention of the L queries q [B, H, L, D], the last L of kv.length positions.

    Where it pays (kernels.model_uses), int8 histories go to the kernel that reads the codes;
    otherwise dequantise + SDPA ("causal" is lower-right aligned), over the whole buffer with the span's mask
    in the compiled step and in a batch whose rows have their own lengths (span.padded), and for a few rows on
    PADDED_ATTENTION_BACKENDS.
    """
    if kv.key_scale is not None and kernels.model_uses("kv_attention") and not span.padded:
        return kernels.kv_attention(q, kv.keys, kv.values, kv.key_scale, kv.value_scale, scale=scale,
                                    kv_len=kv.length)
    rows = q.shape[2]
    if span.padded or (1 < rows <= PADDED_ATTENTION_MAX_ROWS and backend_name() in PADDED_ATTENTION_BACKENDS):
        keys, values = kv.floats(q.dtype, padded=True)
        if backend_name() == "cpu":  # no SDPA kernel there, only its fallback graph
            groups = q.shape[1] // keys.shape[1]
            return grouped_attention(q, keys, values, scale, span.mask(rows, keys.shape[2], q.dtype, groups))
        mask = span.mask(rows, keys.shape[2], q.dtype)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    keys, values = kv.floats(q.dtype)
    mask = "causal" if rows > 1 else None
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
