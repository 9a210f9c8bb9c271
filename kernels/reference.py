"""Pure-MLX versions of the kernels: the CPU path, the fallback, and what the self-check compares against."""

from __future__ import annotations

import mlx.core as mx


def qmm_small_reference(x, w, scales, biases, *, bits, group_size, lora=None, dtype=None):
    """y[..., N] = x[..., K] @ dequant(w)[N, K]^T (+ lora_scale * (x @ A) @ B), computed in `dtype` (default x's).

    lora = (A[K, r], B[r, N], lora_scale). Computing in float32 gives the self-check's oracle.
    """
    dtype = dtype or x.dtype
    out_dtype = x.dtype
    x = x.astype(dtype)
    y = mx.quantized_matmul(x, w, scales.astype(dtype), biases.astype(dtype), transpose=True,
                            group_size=group_size, bits=bits)  # fmt: skip
    if lora is not None:
        a, b, lora_scale = lora
        y = y + (lora_scale * ((x @ a.astype(dtype)) @ b.astype(dtype))).astype(dtype)
    return y.astype(out_dtype)


def quantize_codes(x, scale):
    """round-half-even(x / scale) clipped to [-128, 127], in float32, as int8: the quantise half of tamm's K/V
    fake-quant (the model stores these codes)."""
    return mx.clip(mx.round(x.astype(mx.float32) / scale), -128, 127).astype(mx.int8)


def dequantize_codes(codes, scale, dtype):
    """codes * scale in float32, then cast to `dtype`: tamm's K/V fake-quant rounding (the model uses this too)."""
    scale = scale if isinstance(scale, mx.array) and scale.dtype == mx.float32 else mx.array(scale, mx.float32)
    x = codes.astype(mx.float32) * scale
    return x if dtype == mx.float32 else x.astype(dtype)


def kv_attention_reference(q, k_codes, v_codes, k_scale, v_scale, *, scale, kv_len=None, causal=True, dtype=None):
    """softmax(scale * q @ (codes_k * k_scale)^T, lower-right causal) @ (codes_v * v_scale), computed in `dtype`.

    q [B, H, L, D]; k_codes, v_codes [B, KV, S, D] int8 of which the first kv_len positions are valid.
    """
    dtype = dtype or q.dtype
    kv_len = k_codes.shape[2] if kv_len is None else kv_len
    k = dequantize_codes(k_codes[:, :, :kv_len], k_scale, dtype)
    v = dequantize_codes(v_codes[:, :, :kv_len], v_scale, dtype)
    mask = "causal" if causal and q.shape[2] > 1 else None
    out = mx.fast.scaled_dot_product_attention(q.astype(dtype), k, v, scale=scale, mask=mask)
    return out.astype(q.dtype)
