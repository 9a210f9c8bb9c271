"""Affine MLX quantization with proof: find the grid a QAT weight already lies on, pack it exactly, verify.

MLX affine format (per row, per group of `group` consecutive inputs): w = scale * q + bias, q in 0..2^bits-1,
codes packed into uint32 words as one little-endian bit stream (low bits first), scales/biases [rows, cols/group].

`mx.quantize` is not used for on-grid weights: it moves the scale so that zero is representable and so loses
up to one grid step on every group of a 2-bit QAT weight (mlx-notes.md section 6). Here scale = (max - min) /
(2^bits - 1) and bias = min per group are taken from the data, the codes must come out as integers, and the
packed tensor is accepted as exact only if `mx.dequantize` gives back the original float32 values bit for bit.
Scales and biases of exact packings are float32, because MLX dequantizes in the scales' dtype and float16
arithmetic would round s * q + b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np

from afm_mlx.errors import AFMError

QUANT_BITS = (2, 3, 4, 8)  # MLX affine widths offered (5 and 6 exist too, but are not searched)
GROUP_SIZES = (128, 64, 32)
FLOAT_BITS = {16: np.float16, 32: np.float32}  # "bits" 16 / 32 = stored unquantized in that float type
ROW_CHUNK_ELEMENTS = 1 << 23  # rows per chunk are chosen so one chunk holds ~8M values (32 MB in float32)
SAMPLE_ROWS = 16  # rows tried first, to reject a bit width / group size cheaply


@dataclass(frozen=True)
class QuantSetting:
    """A requested storage: bits 2/3/4/8 (affine, `group_size` 32/64/128) or 16/32 (float16/float32)."""

    bits: int
    group_size: int = 64

    def __post_init__(self):
        if self.bits not in QUANT_BITS + tuple(FLOAT_BITS):
            raise AFMError(f"bits must be one of 2, 3, 4, 8 (quantized) or 16, 32 (float), got {self.bits}")
        if self.quantized and self.group_size not in GROUP_SIZES:
            raise AFMError(f"group size must be 32, 64 or 128, got {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.bits in QUANT_BITS


@dataclass
class Packed:
    """One stored tensor: the arrays to save under `<module>.{weight,scales,biases}` and the proof."""

    arrays: dict[str, np.ndarray]  # "weight" (+ "scales", "biases" when quantized)
    bits: int  # 2/3/4/8, or 16/32 for float storage
    group_size: int | None
    exact: bool
    method: str  # "grid" (exact affine), "lossy" (mx.quantize), "float16", "float32"
    max_abs_error: float = 0.0
    relative_error: float = 0.0  # ||w - w_stored||_F / ||w||_F
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.group_size is not None

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# ---- bit packing ----


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] integer codes -> [rows, cols * bits / 32] uint32, one little-endian bit stream per row."""
    rows, cols = codes.shape
    if (cols * bits) % 32:
        raise AFMError(f"{cols} values of {bits} bits do not fill whole uint32 words")
    if 32 % bits == 0:  # 2, 4, 8: whole codes per word, code k of a word at bit k * bits
        per_word = 32 // bits
        c = codes.astype(np.uint32).reshape(rows, cols // per_word, per_word)
        shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
        return np.bitwise_or.reduce(c << shifts, axis=-1)
    bitplanes = (codes.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, cols, bits]
    stream = np.packbits(bitplanes.reshape(rows, cols * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(stream).view("<u4").astype(np.uint32)


def unpack_codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of `pack_codes`: [rows, cols] uint8 codes."""
    rows = packed.shape[0]
    stream = np.ascontiguousarray(packed.astype("<u4")).view(np.uint8)
    planes = np.unpackbits(stream, axis=-1, bitorder="little")[:, : cols * bits].reshape(rows, cols, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(-1).astype(np.uint8)


# ---- exact grid search ----


def _row_chunks(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def grid_fit(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes uint8 [r, c], scales f32 [r, c/g], biases f32 [r, c/g]) reproducing `w` exactly, or None.

    Per group: bias = min, scale = (max - min) / k, where k = 2^bits - 1 if the group uses both grid ends,
    else fewer steps (k is tried downwards; for 8 bits only k = 255), each tried as float16-rounded (QAT grids
    have float16 steps) and as float32; codes = round((w - bias) / scale) must give f32(scale * q + bias) == w.
    """
    rows, cols = w.shape
    levels = 2**bits - 1
    g = w.astype(np.float32, copy=False).reshape(rows, cols // group, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None
    codes_out = np.zeros(g.shape, dtype=np.uint8)
    scale_out = np.zeros(lo.shape, dtype=np.float32)
    ok = np.zeros(lo.shape, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for steps in range(levels, 0 if bits <= 4 else levels - 1, -1):
            step64 = (hi.astype(np.float64) - lo) / steps
            for scale in (step64.astype(np.float16).astype(np.float32), step64.astype(np.float32)):
                codes = np.rint((g - lo) / np.where(scale > 0, scale, np.float32(1)))
                fits = (codes >= 0) & (codes <= levels) & (scale * codes + lo == g)
                take = fits.all(-1, keepdims=True) & np.isfinite(scale) & ~ok
                codes_out = np.where(take, codes, codes_out).astype(np.uint8)
                scale_out = np.where(take, scale, scale_out)
                ok |= take
                if ok.all():
                    return codes_out.reshape(rows, cols), scale_out[..., 0], lo[..., 0].copy()
    return None


def _dequantize_mx(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int, bits: int) -> np.ndarray:
    out = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=group, bits=bits)
    return np.array(out.astype(mx.float32))


class _ErrorStats:
    """Max abs and Frobenius-relative error of stored vs original, accumulated over row chunks (float64)."""

    def __init__(self):
        self.max_abs, self.err_sq, self.ref_sq = 0.0, 0.0, 0.0

    def add(self, original: np.ndarray, stored: np.ndarray) -> None:
        diff = stored.astype(np.float64) - original
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.err_sq += float(np.sum(diff * diff))
        self.ref_sq += float(np.sum(np.square(original, dtype=np.float64)))

    @property
    def relative(self) -> float:
        return float(np.sqrt(self.err_sq / self.ref_sq)) if self.ref_sq > 0 else float(np.sqrt(self.err_sq))


def pack_exact(w: np.ndarray, bits: int, group: int) -> Packed | None:
    """Pack `w` [rows, cols] on its own affine grid, chunk by chunk, each chunk verified with mx.dequantize."""
    rows, cols = w.shape
    if cols % group or (group * bits) % 32:
        return None
    if grid_fit(np.asarray(w[:SAMPLE_ROWS], dtype=np.float32), bits, group) is None:  # cheap rejection
        return None
    parts: dict[str, list[np.ndarray]] = {"weight": [], "scales": [], "biases": []}
    for rows_ in _row_chunks(rows, cols):
        chunk = np.asarray(w[rows_], dtype=np.float32)
        fit = grid_fit(chunk, bits, group)
        if fit is None:
            return None
        codes, scales, biases = fit
        packed = pack_codes(codes, bits)
        if not np.array_equal(_dequantize_mx(packed, scales, biases, group, bits), chunk):
            return None  # MLX's own arithmetic disagrees in some last bit: not exact
        for key, value in zip(parts, (packed, scales, biases)):
            parts[key].append(value)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return Packed(arrays, bits, group, exact=True, method="grid")


def pack_lossy(w: np.ndarray, bits: int, group: int) -> Packed:
    """mx.quantize (MLX's own affine rule) chunk by chunk, with the error it leaves measured."""
    rows, cols = w.shape
    if cols % group:
        raise AFMError(f"input size {cols} is not a multiple of the group size {group}")
    parts: dict[str, list[np.ndarray]] = {"weight": [], "scales": [], "biases": []}
    stats = _ErrorStats()
    for rows_ in _row_chunks(rows, cols):
        chunk = np.asarray(w[rows_], dtype=np.float32)
        packed, scales, biases = (np.array(a) for a in mx.quantize(mx.array(chunk), group_size=group, bits=bits))
        stats.add(chunk, _dequantize_mx(packed, scales, biases, group, bits))
        for key, value in zip(parts, (packed, scales, biases)):
            parts[key].append(value)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    exact = stats.max_abs == 0.0
    return Packed(arrays, bits, group, exact, "lossy", stats.max_abs, stats.relative)


def store_float(w: np.ndarray, bits: int) -> Packed:
    """Unquantized storage in float16 (bits 16) or float32 (bits 32), with the rounding error measured."""
    stored = np.asarray(w).astype(FLOAT_BITS[bits])
    stats = _ErrorStats()
    for rows_ in _row_chunks(w.shape[0], int(np.prod(w.shape[1:], dtype=np.int64))):
        stats.add(np.asarray(w[rows_], dtype=np.float32), stored[rows_])
    exact = stats.max_abs == 0.0
    return Packed({"weight": stored}, bits, None, exact, f"float{bits}", stats.max_abs, stats.relative)


def _fits_float16(w: np.ndarray) -> bool:
    """Whether float16 holds every value exactly (checked in row chunks, without a float16 copy of `w`)."""
    with np.errstate(over="ignore"):
        return all(
            np.array_equal(np.asarray(w[rows_]).astype(np.float16).astype(np.float32), np.asarray(w[rows_]))
            for rows_ in _row_chunks(w.shape[0], int(np.prod(w.shape[1:], dtype=np.int64)))
        )


def fitting_group(in_features: int, requested: int) -> int:
    """The requested group size, or the largest smaller MLX group size that divides `in_features`."""
    for group in (g for g in GROUP_SIZES if g <= requested):
        if in_features % group == 0:
            return group
    raise AFMError(f"input size {in_features} is not a multiple of 32: it cannot be quantized; store it as float")


def quantize_tensor(w: np.ndarray, request: QuantSetting, recipe: str = "auto") -> Packed:
    """Store one weight matrix.

    `auto`: the lowest exact grid (bits, then largest group), else float16 if lossless, else the requested
    setting (lossy, noted). `lossy`: the requested setting, packed on the data's own grid when the data lies on
    one at that setting (then exact), else with mx.quantize."""
    if recipe not in ("auto", "lossy"):
        raise AFMError(f"recipe must be 'auto' or 'lossy', got {recipe!r}")
    if w.ndim != 2:
        raise AFMError(f"only 2-D weights are quantized, got shape {tuple(w.shape)}")
    if recipe == "auto":
        for bits in QUANT_BITS:
            for group in GROUP_SIZES:
                if (packed := pack_exact(w, bits, group)) is not None:
                    return packed
        if _fits_float16(w):
            return store_float(w, 16)
    notes = []
    if request.quantized:
        group = fitting_group(w.shape[1], request.group_size)
        if group != request.group_size:
            notes.append(f"group {request.group_size} does not divide {w.shape[1]} inputs; used {group}")
        packed = pack_exact(w, request.bits, group) or pack_lossy(w, request.bits, group)
    else:
        packed = store_float(w, request.bits)
    packed.notes += notes
    if recipe == "auto" and not packed.exact:
        packed.notes.append("no exact grid found; stored with the requested lossy setting")
    return packed
