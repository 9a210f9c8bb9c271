"""Synthetic adapter-toolkit (tamm) state dicts for any AFMTextV7 config: test fixtures and the memory benchmark.

Tensors come out one at a time, in the toolkit's state-dict order (docs/format.md sections 1.1, 1.3, 3.3), so
a full-size 12.7 GB checkpoint can be streamed to disk without ever being held in memory. Every tensor is
drawn from its own seeded generator, so any tensor can be regenerated on its own.

`grid=True` puts the weights where Apple's 2-bit QAT leaves them: every linear weight on a 2-bit affine grid
(per group of `group_for(in_features)`: scale s and minimum b exactly representable in float16, codes 0..3
with both ends used, w = f32(s * q + b)), the embedding (and its tied output head) on a 4-bit grid with
group 32.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from afm_mlx.errors import AFMError

Thunk = Callable[[], np.ndarray]

WEIGHT_STD = 0.02
LINEAR_GRID_BITS = 2
EMBEDDING_GRID_BITS, EMBEDDING_GRID_GROUP = 4, 32


def _field(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def group_for(in_features: int) -> int:
    """The largest MLX group size (128, 64, 32) dividing `in_features`."""
    for group in (128, 64, 32):
        if in_features % group == 0:
            return group
    raise AFMError(f"input size {in_features} is not a multiple of 32: no MLX quantization group fits")


def grid_tensor(rng: np.random.Generator, shape: tuple[int, int], bits: int, group: int, step: float) -> np.ndarray:
    """A [out, in] float32 tensor on an affine grid: per group w = s*q + b, q in 0..2^bits-1, both ends used.

    s and b are float16 values (so any packer can store them losslessly in float16); `step` is the typical s.
    Drawn in row blocks, so a full-size embedding needs little more memory than its own float32 array.
    """
    rows, cols = shape
    out = np.empty(shape, dtype=np.float32)
    block = max(1, (1 << 22) // cols)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        out[start : start + n] = _grid_rows(rng, n, cols, bits, group, step)
    return out


def _grid_rows(rng: np.random.Generator, rows: int, cols: int, bits: int, group: int, step: float) -> np.ndarray:
    top = 2**bits - 1
    n_groups = cols // group
    s = np.abs(rng.normal(step, step * 0.2, (rows, n_groups, 1))).astype(np.float16).astype(np.float32)
    s = np.maximum(s, np.float32(step / 8))
    b = (-(top / 2) * s + rng.normal(0, step * 0.1, s.shape)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, top + 1, (rows, n_groups, group), dtype=np.uint8)
    low = rng.integers(0, group, (rows, n_groups, 1))  # two distinct positions per group get the two ends
    high = (low + rng.integers(1, group, (rows, n_groups, 1))) % group
    np.put_along_axis(q, low, 0, axis=-1)
    np.put_along_axis(q, high, top, axis=-1)
    return (s * q + b).astype(np.float32).reshape(rows, cols)


class LazyArray:
    """A tensor not drawn yet: `.shape`, `.dtype`, and `()` / `.numpy()` to draw it (each call draws anew)."""

    def __init__(self, shape: tuple[int, ...], dtype: str, draw: Thunk):
        self.shape, self.dtype, self._draw = tuple(shape), dtype, draw

    def __call__(self) -> np.ndarray:
        return self._draw()

    def numpy(self, copy: bool = True) -> np.ndarray:
        return self._draw()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class _Spec:
    """How to draw each kind of tensor; `thunk(...)` returns a zero-argument generator for one tensor."""

    def __init__(self, seed: int, grid: bool, lora_nonzero: bool):
        self.seed, self.grid, self.lora_nonzero = seed, grid, lora_nonzero
        self.count = 0

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def thunk(self, kind: str, shape: tuple[int, ...]) -> "LazyArray":
        self.count += 1
        index, rng = self.count, self._rng
        dtype = "int64" if kind == "num_samples" else "float32"
        return LazyArray(shape, dtype, lambda: self._draw(kind, shape, rng(index)))

    def _draw(self, kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if kind == "linear" and self.grid:
            return grid_tensor(rng, shape, LINEAR_GRID_BITS, group_for(shape[1]), step=0.015)
        if kind == "embedding" and self.grid:
            return grid_tensor(rng, shape, EMBEDDING_GRID_BITS, EMBEDDING_GRID_GROUP, step=0.004)
        if kind in ("linear", "embedding"):
            return rng.normal(0, WEIGHT_STD, shape).astype(np.float32)
        if kind == "norm":
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if kind == "range":  # [min, max]: fake-quant scale max(-min/128, max/127) lands in 0.012..0.04
            lo, hi = rng.uniform(1.5, 5.0, 2)
            return np.array([-lo, hi], dtype=np.float32)
        if kind == "num_samples":
            return np.array(int(rng.integers(100, 10000)), dtype=np.int64)
        if kind == "lora_a":  # tamm init: normal(std = sqrt(1 / fan_in))
            return rng.normal(0, np.sqrt(1 / shape[0]), shape).astype(np.float32)
        if kind == "lora_b":  # tamm init: zeros
            return (rng.normal(0, WEIGHT_STD, shape) if self.lora_nonzero else np.zeros(shape)).astype(np.float32)
        raise ValueError(kind)


def synthetic_thunks(
    config: Any,
    *,
    seed: int = 0,
    grid: bool = False,
    draft: bool = False,
    kv_quant: bool | None = None,
    lora: bool | None = None,
    lora_rank: int = 32,
    lora_nonzero: bool = False,
    tied_output: bool = True,
) -> list[tuple[str, "LazyArray"]]:
    """[(toolkit name, LazyArray)] in state-dict order. Cheap: no tensor is drawn yet.

    `draft=True` gives the draft layout (`layers.layer_N.*`, no `.wrapped.`, no adapters) and needs
    num_kv_reuse_layers == 0. `kv_quant` defaults to the config's `kv_quant` (True if absent); `lora` defaults
    to not draft. The tied `output_transform.weight` regenerates the embedding (same seed, same values).
    """
    d, vocab = _field(config, "hidden_dim"), _field(config, "vocab_size")
    n_reuse = _field(config, "num_kv_reuse_layers", 0)
    n_regular = _field(config, "num_layers") - n_reuse
    if draft and n_reuse:
        raise AFMError("the draft layout has no KV-reuse layers (num_kv_reuse_layers must be 0)")
    kv_quant = _field(config, "kv_quant", True) if kv_quant is None else kv_quant
    lora = (not draft) if lora is None else lora
    spec = _Spec(seed, grid, lora_nonzero)
    dims = _Dims(config)

    items: list[tuple[str, LazyArray]] = []
    embedding = spec.thunk("embedding", (vocab, d))
    items.append(("embedding.weight", embedding))
    for i in range(n_regular):
        prefix = f"layers.layer_{i}." if draft else f"layers.segment_0.layer_{i}."
        items += _regular_layer(prefix, dims, spec, draft, kv_quant, lora and lora_rank)
    for j in range(n_reuse):
        items += _reuse_layer(f"layers.segment_1.layer_{j}.", dims, spec, lora and lora_rank)
    items.append(("output_norm.weight", spec.thunk("norm", (d,))))
    if tied_output:
        items.append(("output_transform.weight", embedding))
    return items


def synthetic_dict(config: Any, **options: Any) -> dict[str, np.ndarray]:
    """The whole state dict in memory (tiny configs); the tied output head is the embedding array itself."""
    out: dict[str, np.ndarray] = {}
    cache: dict[int, np.ndarray] = {}
    for name, thunk in synthetic_thunks(config, **options):
        out[name] = cache.setdefault(id(thunk), thunk())
    return out


class _Dims:
    def __init__(self, config: Any):
        self.d = _field(config, "hidden_dim")
        self.head_dim = self.d // _field(config, "num_heads")
        self.kv = _field(config, "num_kv_heads") * self.head_dim
        self.ffn = int(self.d * _field(config, "hidden_dim_scale_factor"))


def _linear(name: str, shape: tuple[int, int], spec: _Spec, rank: int | bool, wrapped: bool, parts=None):
    """An (adapted) linear: `wrapped.<name>` weight then `adapters.base_adapter[.lora_k].{a,b}_transpose`."""
    module, _, leaf = name.rpartition(".")
    weight_name = f"{module}.wrapped.{leaf}" if wrapped else name
    if wrapped and ".fused_linear." in name:  # AdaptedLayer wraps the whole fused module
        weight_name = name.replace(".fused_linear.", ".wrapped.fused_linear.")
    items = [(weight_name, spec.thunk("linear", shape))]
    if not rank:
        return items
    adapter = name.split(".fused_linear.")[0] if "fused_linear" in name else module
    adapter += ".adapters.base_adapter"
    for k, out in enumerate(parts or [shape[0]]):
        sub = f"{adapter}.lora_{k}" if parts else adapter
        items.append((f"{sub}.a_transpose", spec.thunk("lora_a", (shape[1], rank))))
        items.append((f"{sub}.b_transpose", spec.thunk("lora_b", (rank, out))))
    return items


def _feed_forward(prefix: str, dims: _Dims, spec: _Spec, rank, wrapped: bool):
    d, ffn = dims.d, dims.ffn
    items = [(f"{prefix}feed_forward.norm.weight", spec.thunk("norm", (d,)))]
    for k in (0, 1):  # linear_0 = gate (SiLU), linear_1 = up
        items += _linear(f"{prefix}feed_forward.hidden_transform.linear_{k}.weight", (ffn, d), spec, rank, wrapped)
    items += _linear(f"{prefix}feed_forward.output_transform.weight", (d, ffn), spec, rank, wrapped)
    return items


def _regular_layer(prefix: str, dims: _Dims, spec: _Spec, draft: bool, kv_quant: bool, rank):
    d, hd, kv = dims.d, dims.head_dim, dims.kv
    wrapped = not draft
    att = prefix + "attention."
    items = [(f"{att}norm.weight", spec.thunk("norm", (d,)))]
    items += _linear(f"{att}qkv_transform.fused_linear.weight", (d + 2 * kv, d), spec, rank, wrapped, [d, kv, kv])
    items += [
        (f"{att}qk_norm.query_norm.weight", spec.thunk("norm", (hd,))),
        (f"{att}qk_norm.key_norm.weight", spec.thunk("norm", (hd,))),
    ]
    if kv_quant:
        for which in ("key", "value"):
            base = f"{att}kv_quantizer.{which}_quantizer.activation_post_process."
            items += [(base + "range", spec.thunk("range", (2,))), (base + "num_samples", spec.thunk("num_samples", ()))]
    items += _linear(f"{att}output_transform.weight", (d, d), spec, rank, wrapped)
    return items + _feed_forward(prefix, dims, spec, rank, wrapped)


def _reuse_layer(prefix: str, dims: _Dims, spec: _Spec, rank):
    d, hd = dims.d, dims.head_dim
    att = prefix + "attention."
    items = [(f"{att}norm.weight", spec.thunk("norm", (d,)))]
    items += _linear(f"{att}q_transform.weight", (d, d), spec, rank, True)
    items.append((f"{att}q_norm.query_norm.weight", spec.thunk("norm", (hd,))))
    items += _linear(f"{att}output_transform.weight", (d, d), spec, rank, True)
    return items + _feed_forward(prefix, dims, spec, rank, True)
