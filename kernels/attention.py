"""kv_attention: causal GQA attention of 1..8 query rows against int8 K/V codes with scalar scales.

MLX has no attention over quantized K/V, and its fused vector SDPA stops at L * (H / KV) <= 32 (L <= 4 for AFM)
and never covers head_dim 32. This kernel reads the int8 codes of the cache directly, once per KV head for all
H / KV query heads, split over the sequence (flash-decoding) and merged by a second small kernel.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import dispatch
from .reference import kv_attention_reference
from .tolerances import TOLERANCES

MAX_QUERIES = 8
MAX_HEAD_DIM = 256
TILE = 32  # keys per threadgroup-memory tile (kv_attention_partial)
TARGET_GROUPS = 128  # threadgroups to aim for across B * KV * splits
MIN_BLOCK = 64
PARTIAL_INPUTS = ["q", "k_codes", "v_codes", "qk_scale", "kv_len", "s_alloc", "n_kv", "block"]
PARTIAL_OUTPUTS = ["part_o", "part_m", "part_l"]
REDUCE_INPUTS = ["part_o", "part_m", "part_l", "v_scale", "n_splits"]


def _check_shapes(q, k_codes, v_codes, kv_len: int) -> None:
    if q.ndim != 4 or k_codes.ndim != 4 or v_codes.shape != k_codes.shape:
        shapes = f"{q.shape}, {k_codes.shape}, {v_codes.shape}"
        raise ValueError(f"need q [B, H, L, D] and K/V codes [B, KV, S, D]; got {shapes}")
    b, h, l, d = q.shape
    kb, kv, s, kd = k_codes.shape
    if kb != b or kd != d or h % kv:
        raise ValueError(f"q {q.shape} does not fit K/V {k_codes.shape} (batch, head_dim, heads % kv_heads)")
    if not l <= kv_len <= s:
        raise ValueError(f"kv_len={kv_len} must lie in [L={l}, S={s}]")


def _uses_kernel(which: str, q, k_codes) -> bool:
    d = q.shape[-1]
    return (which != "cpu" and 1 <= q.shape[2] <= MAX_QUERIES and d % 32 == 0 and d <= MAX_HEAD_DIM
            and q.dtype in TOLERANCES and k_codes.dtype == mx.int8)  # fmt: skip


def split_plan(kv_len: int, groups_per_split: int) -> tuple[int, int]:
    """(block, n_splits): keys per threadgroup (a multiple of the tile) so that ~TARGET_GROUPS groups run."""
    want = max(1, TARGET_GROUPS // max(groups_per_split, 1))
    block = max(MIN_BLOCK, TILE * math.ceil(kv_len / (want * TILE)))
    return block, math.ceil(kv_len / block)


def launch_shape(rows: int) -> tuple[int, int]:
    """(SIMD-groups per threadgroup, query rows per SIMD-group) for G * L = rows query rows per KV head."""
    nsg = min(8, rows)
    return nsg, math.ceil(rows / nsg)


def _launch(which: str, q, k_codes, v_codes, qk_scale, v_scale, kv_len: int, causal: bool):
    b, h, l, d = q.shape
    _, kv, s_alloc, _ = k_codes.shape
    g = h // kv
    nsg, rps = launch_shape(g * l)
    block, n_splits = split_plan(kv_len, b * kv)
    rows = b * h * l
    partial = dispatch.kernel("kv_attention_partial", which, PARTIAL_INPUTS, PARTIAL_OUTPUTS)
    part_o, part_m, part_l = partial(
        inputs=[q, k_codes, v_codes, qk_scale, kv_len, s_alloc, kv, block],
        template=[("T", q.dtype), ("D", d), ("L", l), ("G", g), ("NSG", nsg), ("RPS", rps), ("CAUSAL", causal)],
        grid=(32 * n_splits, nsg, b * kv),
        threadgroup=(32, nsg, 1),
        output_shapes=[(rows, n_splits, d), (rows, n_splits), (rows, n_splits)],
        output_dtypes=[mx.float32] * 3,
    )  # fmt: skip
    reduce = dispatch.kernel("kv_attention_reduce", which, REDUCE_INPUTS, ["out"])
    out = reduce(
        inputs=[part_o, part_m, part_l, v_scale, n_splits],
        template=[("T", q.dtype), ("D", d)],
        grid=(d, rows, 1),
        threadgroup=(d, 1, 1),
        output_shapes=[(rows, d)],
        output_dtypes=[q.dtype],
    )[0]
    return out.reshape(b, h, l, d)


def _scalar(value) -> mx.array:
    return mx.array(value, dtype=mx.float32) if not isinstance(value, mx.array) else value.astype(mx.float32)


def kv_attention(q, k_codes, v_codes, k_scale, v_scale, *, scale: float, kv_len: int | None = None,
                 causal: bool = True) -> mx.array:  # fmt: skip
    """Attention of q [B, H, L, D] over int8 codes [B, KV, S, D] (dequant = codes * k_scale / v_scale).

    Only the first kv_len positions (default S) are valid; the L queries sit at positions kv_len - L .. kv_len - 1
    (lower-right causal, as mx.fast.scaled_dot_product_attention's "causal"); query head h reads KV head
    h // (H / KV). Pass the cache's whole buffer and kv_len rather than a slice: a slice would be copied.
    Returns [B, H, L, D] in q's dtype. The kernel covers L <= 8 and head_dim a multiple of 32 up to 256 on Metal
    and CUDA; otherwise, and on the CPU, this is dequantize + mx.fast.scaled_dot_product_attention.
    """
    kv_len = k_codes.shape[2] if kv_len is None else int(kv_len)
    _check_shapes(q, k_codes, v_codes, kv_len)
    which = dispatch.backend()
    args = dict(scale=scale, kv_len=kv_len, causal=causal)
    if not _uses_kernel(which, q, k_codes):
        return kv_attention_reference(q, k_codes, v_codes, k_scale, v_scale, **args)
    b, h, l, d = q.shape
    qk_scale = _scalar(k_scale) * scale
    shape_class = ("kv_attention", which, str(q.dtype), d, l, h // k_codes.shape[1], causal)
    return dispatch.checked(
        shape_class,
        run_kernel=lambda: _launch(which, q, k_codes, v_codes, qk_scale, _scalar(v_scale), kv_len, causal),
        run_oracle=lambda: kv_attention_reference(q, k_codes, v_codes, k_scale, v_scale, dtype=mx.float32, **args),
        run_fallback=lambda: kv_attention_reference(q, k_codes, v_codes, k_scale, v_scale, **args),
        dtype=q.dtype,
    )


def attention_int8(q, cache, k_scale, v_scale, *, scale: float, causal: bool = True) -> mx.array:
    """kv_attention over a KV cache holding int8 codes (afm_mlx.cache.KVCache with kv-quant): its whole `keys` /
    `values` buffers and its `offset` valid positions; call after update_and_fetch, so that the offset includes
    the L new positions. k_scale / v_scale: the layer's quant_key_scale / quant_value_scale."""
    return kv_attention(q, cache.keys, cache.values, k_scale, v_scale, scale=scale, kv_len=cache.offset,
                        causal=causal)  # fmt: skip
