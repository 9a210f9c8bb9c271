"""Runtime LoRA adapters on any AFMTextV7 base, float or quantized, several resident at once.

    name = load_adapter(model, "adapter-final.pt")          # toolkit .pt, .fmadapter or mlx-lm adapter dir
    set_active_adapter(model, name)                          # or None: the plain base, no LoRA compute at all
    with using_adapter(model, "other"): ...                  # for one call, previous adapter restored after

Each adapted projection computes y = W x + scale * (x A) B without touching W (docs/format.md 3.1), so a 2-bit base
keeps the adapter exact: fusing W + scale * (A B)^T into 2-bit weights would re-quantize it and erase the adapter.
`LoRALinear` wraps the model's Linear / QuantizedLinear and returns the same [.., out] tensor the model expects; for
the fused Q|K|V projection one block-diagonal B adds the Q, K and V LoRAs to their own column blocks. Wrappers are
put in place only for the active adapter and removed when none is active; switching between adapters flips one
attribute per module.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .converters.adapter_formats import (
    TOOLKIT_BASE_SIGNATURE,
    AdapterWeights,
    check_adapter,
    default_adapter_name,
    lora_layout,
    module_of,
    read_adapter,
    write_fmadapter,
)
from .errors import AFMError
from .kernels import SmallBatchQuantizedLinear, add_lora, lora_block_diagonal


@dataclass
class LoRA:
    """One module's LoRA: A [in, parts * r] (the parts' A side by side) and B [parts * r, out], block-diagonal over
    the parts' B_k [r, out_k] (Q | K | V), so x A B = concat_k(x A_k B_k) is two matmuls for any number of parts
    (on a launch-bound GPU each op costs; the zero blocks cost a little bandwidth instead)."""

    a: mx.array
    b: mx.array
    scale: float
    part_sizes: tuple[int, ...]  # out_k of each part

    @property
    def rank(self) -> int:
        return self.a.shape[1] // len(self.part_sizes)

    @property
    def num_parameters(self) -> int:
        return self.a.size + self.rank * sum(self.part_sizes)  # the B_k, not the zero blocks

    def parts(self) -> list[tuple[mx.array, mx.array]]:
        """(A_k [in, r], B_k [r, out_k]) per part."""
        r, start, out = self.rank, 0, []
        for k, size in enumerate(self.part_sizes):
            out.append((self.a[:, k * r:(k + 1) * r], self.b[k * r:(k + 1) * r, start:start + size]))
            start += size
        return out


class LoRALinear(nn.Module):
    """y = linear(x) + scale * (x A) B: the model's Linear / QuantizedLinear plus the active adapter's LoRA."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.lora: LoRA | None = None  # plain attribute: not a parameter, set by set_active_adapter
        self.row_loras: _RowLoRAs | None = None  # set by using_row_adapters for one batched forward

    def __call__(self, x: mx.array) -> mx.array:
        if self.row_loras is not None:
            return self.row_loras.apply(self.linear(x), x)
        lora = self.lora
        if lora is None:
            return self.linear(x)
        term = (lora.a, lora.b, lora.scale)
        if isinstance(self.linear, SmallBatchQuantizedLinear):  # on Metal: @ B inside the few-row kernel
            return self.linear(x, lora=term)
        return add_lora(self.linear(x), x, term)


@dataclass
class _RowLoRAs:
    """Per-row LoRAs of a batch x [B, L, in], Punica's gathered form: every resident adapter's A and scale * B
    stacked (slot 0 all zeros, for rows without an adapter), each row's pair picked by index inside the matmul
    (mx.gather_mm), so a step costs the same two matmuls whatever mix of adapters its rows use."""

    a: mx.array  # [1 + adapters, in, R]
    b: mx.array  # [1 + adapters, R, out], scale folded in
    rows: mx.array  # uint32 [B]: the slot of each row

    def apply(self, y: mx.array, x: mx.array) -> mx.array:
        xa = mx.gather_mm(x, self.a, rhs_indices=self.rows)
        return y + mx.gather_mm(xa, self.b, rhs_indices=self.rows).astype(y.dtype)


@dataclass
class _Adapter:
    name: str
    rank: int
    scale: float
    format: str
    source: str
    metadata: dict
    loras: dict[str, LoRA]  # module path -> weights

    @property
    def num_parameters(self) -> int:
        return sum(lora.num_parameters for lora in self.loras.values())


@dataclass
class _Registry:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    wrappers: dict[str, LoRALinear] = field(default_factory=dict)  # module path -> its (re-usable) wrapper
    active: str | None = None
    stacks: dict[str, tuple[mx.array, mx.array]] | None = None  # module path -> gathered (A, B); see _RowLoRAs


def _registry(model: nn.Module) -> _Registry:
    registry = model.__dict__.get("_afm_adapters")
    if registry is None:
        registry = _Registry()
        model.__dict__["_afm_adapters"] = registry  # a plain attribute: never part of the parameter tree
    return registry


# ---- module paths ----


def _get(model: nn.Module, path: str) -> nn.Module:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    _get(model, parent)[leaf] = module


def _is_quantized(module: nn.Module) -> bool:
    return "scales" in module


def _dtype(module: nn.Module) -> mx.Dtype:
    return module["scales"].dtype if _is_quantized(module) else module["weight"].dtype


# ---- loading ----


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, activate: bool = False, *,
                 scale: float | None = None, expected_signature: str | None = TOOLKIT_BASE_SIGNATURE,
                 allow_signature_mismatch: bool = False) -> str:
    """Read an adapter (toolkit .pt, .fmadapter, mlx-lm dir), keep it resident on `model`; returns its name.

    name: defaults to the file/dir name (`chat.fmadapter` -> "chat"). scale: overrides the file's (toolkit: 0.5).
    expected_signature / allow_signature_mismatch: the .fmadapter `baseModelSignature` check.
    """
    adapter = read_adapter(path, model.args, expected_signature=expected_signature,
                           allow_signature_mismatch=allow_signature_mismatch)
    if scale is not None:
        adapter.scale = float(scale)
    return add_adapter(model, adapter, name or default_adapter_name(path), activate)


def add_adapter(model: nn.Module, adapter: AdapterWeights, name: str, activate: bool = False) -> str:
    """Make an in-memory adapter resident on `model` under `name` (cast to the projections' dtype)."""
    registry = _registry(model)
    if name in registry.adapters:
        raise AFMError(f"an adapter named {name!r} is already loaded; pick another name or unload_adapter() it")
    check_adapter(adapter, model.args)
    wrappers = {p: registry.wrappers[p] if p in registry.wrappers else _new_wrapper(model, p)
                for p in adapter.modules}
    loras = {p: _module_lora(adapter, p, _dtype(w.linear)) for p, w in wrappers.items()}
    mx.eval([(lora.a, lora.b) for lora in loras.values()])  # the block-diagonal B built once, here
    registry.wrappers.update(wrappers)
    registry.adapters[name] = _Adapter(name, adapter.rank, adapter.scale, adapter.format, adapter.source,
                                       adapter.metadata, loras)
    registry.stacks = None
    if activate:
        set_active_adapter(model, name)
    return name


def _new_wrapper(model: nn.Module, path: str) -> LoRALinear:
    module = _get(model, path)
    if isinstance(module, LoRALinear):
        raise AFMError(f"{path} is already a LoRA wrapper not managed by afm_mlx.adapters")
    if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        raise AFMError(f"{path} is a {type(module).__name__}; LoRA adapts Linear/QuantizedLinear projections")
    return LoRALinear(module)


def _module_lora(adapter: AdapterWeights, module_path: str, dtype: mx.Dtype) -> LoRA:
    names = sorted(n for n in adapter.tensors if module_of(n) == module_path)  # lora_a[.k]..., lora_b[.k]...
    a = np.concatenate([adapter.tensors[n] for n in names if ".lora_a" in n], axis=1)
    bs = [mx.array(adapter.tensors[n]).astype(dtype) for n in names if ".lora_b" in n]
    b = bs[0] if len(bs) == 1 else lora_block_diagonal(bs)
    return LoRA(mx.array(a).astype(dtype), b, adapter.scale, tuple(b_k.shape[1] for b_k in bs))


def runtime_lora_shapes(args: Any, rank: int) -> dict[str, list[tuple[int, ...]]]:
    """Shapes the wrappers allocate for a full adapter (module path -> [A, B]), without allocating: the parts' A
    side by side, their B block-diagonal."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for slot in lora_layout(args, rank):
        a, b = shapes.setdefault(slot.module, [(0, 0), (0, 0)])
        if ".lora_a" in slot.name:
            shapes[slot.module][0] = (slot.shape[0], a[1] + rank)
        else:
            shapes[slot.module][1] = (b[0] + rank, b[1] + slot.shape[1])
    return shapes


# ---- switching ----


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one applied (None: the plain base; its projections are put back, no LoRA compute)."""
    registry = _registry(model)
    if name is not None and name not in registry.adapters:
        loaded = ", ".join(registry.adapters) or "none"
        raise AFMError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
    loras = registry.adapters[name].loras if name is not None else {}
    for path, wrapper in registry.wrappers.items():
        current = _get(model, path)
        if current is not wrapper and current is not wrapper.linear:
            raise AFMError(f"{path} was replaced after adapters were loaded (quantized?); load adapters after "
                           "quantizing, or reload them")
        wrapper.lora = loras.get(path)
        wanted = wrapper if wrapper.lora is not None else wrapper.linear
        if current is not wanted:
            _set(model, path, wanted)
    registry.active = name


def active_adapter(model: nn.Module) -> str | None:
    return _registry(model).active


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the resident adapters, in load order."""
    return list(_registry(model).adapters)


def adapter_info(model: nn.Module, name: str) -> dict[str, Any]:
    """rank, scale, format, source, parameter count, modules and whether it is active."""
    registry = _registry(model)
    if name not in registry.adapters:
        raise AFMError(f"no adapter named {name!r} is loaded")
    a = registry.adapters[name]
    return {"name": a.name, "rank": a.rank, "scale": a.scale, "format": a.format, "source": a.source,
            "parameters": a.num_parameters, "modules": len(a.loras), "active": registry.active == name}


@contextmanager
def using_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Apply adapter `name` (None: none) inside the block, then restore whichever was active before."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield
    finally:
        set_active_adapter(model, previous)


@contextmanager
def using_row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Inside the block, batch row b of a forward gets adapter names[b] (None: the bare base), as S-LoRA/Punica
    batch requests for different adapters (see _RowLoRAs); rows that all share one adapter (or none) take the
    plain path, so a batch without adapters costs nothing extra. Build the forward (lazily) inside the block; the
    active adapter is restored after."""
    if len(set(names)) <= 1:
        with using_adapter(model, names[0] if names else None):
            yield
        return
    registry, previous = _registry(model), active_adapter(model)
    for name in set(names) - {None}:
        _adapter(registry, name)  # AFMError for a name not loaded
    set_active_adapter(model, None)  # also checks nothing was replaced behind the registry's back
    slot = {name: i + 1 for i, name in enumerate(registry.adapters)}
    rows = mx.array([0 if n is None else slot[n] for n in names], dtype=mx.uint32)
    for path, (a, b) in _stacks(registry).items():
        registry.wrappers[path].row_loras = _RowLoRAs(a, b, rows)
        _set(model, path, registry.wrappers[path])
    try:
        yield
    finally:
        for wrapper in registry.wrappers.values():
            wrapper.row_loras = None
        set_active_adapter(model, previous)


def _stacks(registry: _Registry) -> dict[str, tuple[mx.array, mx.array]]:
    """Per adapted module, every resident adapter's A [in, R] and scale * B [R, out] stacked behind a zero slot
    (R: the largest rank x parts; smaller ones zero-padded). Built on first use after adapters change."""
    if registry.stacks is None:
        adapters = list(registry.adapters.values())
        registry.stacks = {path: _stack(adapters, path) for path in registry.wrappers
                           if any(path in a.loras for a in adapters)}
        mx.eval(registry.stacks)
    return registry.stacks


def _stack(adapters: list[_Adapter], path: str) -> tuple[mx.array, mx.array]:
    loras = [a.loras.get(path) for a in adapters]
    width = max(lora.a.shape[1] for lora in loras if lora is not None)
    sample = next(lora for lora in loras if lora is not None)
    a_zero = mx.zeros((sample.a.shape[0], width), sample.a.dtype)
    b_zero = mx.zeros((width, sample.b.shape[1]), sample.b.dtype)
    a_parts, b_parts = [a_zero], [b_zero]
    for lora in loras:
        if lora is None:
            a_parts.append(a_zero)
            b_parts.append(b_zero)
            continue
        pad = width - lora.a.shape[1]
        a_parts.append(mx.pad(lora.a, [(0, 0), (0, pad)]))
        b_parts.append(mx.pad((lora.scale * lora.b).astype(lora.b.dtype), [(0, pad), (0, 0)]))
    return mx.stack(a_parts), mx.stack(b_parts)


def _adapter(registry: _Registry, name: str) -> _Adapter:
    if name not in registry.adapters:
        loaded = ", ".join(registry.adapters) or "none"
        raise AFMError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
    return registry.adapters[name]


def unload_adapter(model: nn.Module, name: str) -> None:
    registry = _registry(model)
    if name not in registry.adapters:
        raise AFMError(f"no adapter named {name!r} is loaded")
    if registry.active == name:
        set_active_adapter(model, None)
    del registry.adapters[name]
    registry.stacks = None


# ---- fusing and export ----


def fuse_adapter(model: nn.Module, name: str | None = None) -> None:
    """Merge adapter `name` (default: the active one) into a float base: W += scale * (A B)^T, then unload it.

    Refused on a quantized base: W + scale * (A B)^T would be re-quantized to the base's grid, whose steps are far
    larger than the adapter's update, so the adapter would be lost. Other resident adapters then apply on top of
    the fused weights.
    """
    registry = _registry(model)
    name = name if name is not None else registry.active
    if name is None or name not in registry.adapters:
        raise AFMError(f"no adapter {name!r} to fuse (loaded: {', '.join(registry.adapters) or 'none'})")
    entry = registry.adapters[name]
    quantized = [p for p in entry.loras if _is_quantized(registry.wrappers[p].linear)]
    if quantized:
        base = registry.wrappers[quantized[0]].linear
        raise AFMError(f"cannot fuse adapter {name!r} into a quantized base ({base.bits}-bit, group "
                       f"{base.group_size}): W + scale*(AB)^T would be re-quantized to that grid and the adapter "
                       "erased; keep it as a runtime adapter (set_active_adapter) or fuse into an unquantized base")
    for path, lora in entry.loras.items():
        linear = registry.wrappers[path].linear
        linear.weight = (linear.weight.astype(mx.float32) + _delta(lora)).astype(linear.weight.dtype)
    mx.eval([registry.wrappers[p].linear.weight for p in entry.loras])
    unload_adapter(model, name)


def _delta(lora: LoRA) -> mx.array:
    """scale * (A B)^T as [out, in] in float32 (B block-diagonal: the parts' blocks stacked in output order)."""
    return lora.scale * (lora.a.astype(mx.float32) @ lora.b.astype(mx.float32)).T


def adapter_weights(model: nn.Module, name: str) -> AdapterWeights:
    """A resident adapter back as float32 `AdapterWeights` (its values in the model's dtype, widened)."""
    registry = _registry(model)
    if name not in registry.adapters:
        raise AFMError(f"no adapter named {name!r} is loaded")
    entry = registry.adapters[name]
    tensors = {}
    for path, lora in entry.loras.items():
        fused = len(lora.part_sizes) > 1
        for k, (a, b) in enumerate(lora.parts()):
            part = f".{k}" if fused else ""
            tensors[f"{path}.lora_a{part}"] = np.array(a.astype(mx.float32))
            tensors[f"{path}.lora_b{part}"] = np.array(b.astype(mx.float32))
    return AdapterWeights(tensors, entry.rank, entry.scale, entry.format, entry.source, dict(entry.metadata))


def export_fmadapter(model_or_adapter: nn.Module | AdapterWeights, out_dir: str | os.PathLike, name: str, *,
                     adapter: str | None = None, args: Any = None, **metadata: Any):
    """Write `<out_dir>/<name>.fmadapter` from a resident adapter of a model (default: the active one) or from
    `AdapterWeights` (then `args`, the base's ModelArgs, is needed). Metadata keywords: author, description,
    license, base_signature, draft_token_count, creator_defined, overwrite. Returns the package path."""
    if isinstance(model_or_adapter, AdapterWeights):
        if args is None:
            raise AFMError("export_fmadapter(AdapterWeights, ...) needs args= (the base's ModelArgs)")
        weights = model_or_adapter
    else:
        chosen = adapter if adapter is not None else active_adapter(model_or_adapter)
        if chosen is None:
            raise AFMError("no adapter given and none is active: pass adapter=NAME")
        weights, args = adapter_weights(model_or_adapter, chosen), model_or_adapter.args
    return write_fmadapter(weights, out_dir, name, args, **metadata)


EXPORT_FORMATS = ("fmadapter", "mlx-lm", "pt")


def export_adapter(source: str | os.PathLike, out_dir: str | os.PathLike, name: str, *,
                   model: str | os.PathLike | None = None, to: str = "fmadapter",
                   allow_signature_mismatch: bool = False, overwrite: bool = False, **metadata: Any):
    """Convert an adapter file (toolkit .pt, .fmadapter, mlx-lm dir) to `to` under `out_dir`; returns the path.

    model: a converted model directory whose config.json gives the base's shapes (default: the 3B base).
    fmadapter -> OUT/NAME.fmadapter (metadata keywords as in `write_fmadapter`); mlx-lm -> OUT/NAME/; pt -> OUT/NAME.pt.
    """
    from .converters.adapter_formats import write_mlx_adapter, write_toolkit_adapter
    from .converters.output import check_name, exit_on_signals, made_parents, remove_stale
    from .model import ModelArgs
    from .presets import BASE_3B

    if to not in EXPORT_FORMATS:
        raise AFMError(f"unknown adapter format {to!r}: use one of {', '.join(EXPORT_FORMATS)}")
    check_name(name.removesuffix(".fmadapter") if to == "fmadapter" else name, "adapter name")  # stays in out_dir
    if model is not None:
        from .loading import read_config

        args = ModelArgs.from_dict(read_config(Path(model)))
    else:
        args = BASE_3B
    adapter = read_adapter(source, args, allow_signature_mismatch=allow_signature_mismatch)
    if to == "fmadapter":
        return write_fmadapter(adapter, out_dir, name, args, overwrite=overwrite, **metadata)
    target = Path(out_dir) / (f"{name}.pt" if to == "pt" else name)
    if target.exists() and not overwrite:
        raise AFMError(f"{target} exists (pass overwrite=True / --overwrite to replace it)")
    if to == "pt":
        with exit_on_signals(), made_parents(Path(out_dir)):  # save_checkpoint removes its own temporary file
            remove_stale(target, ("tmp",))  # ... unless it was killed: .NAME.pt.tmp-PID
            write_toolkit_adapter(adapter, target, overwrite=overwrite)
        return target
    return write_mlx_adapter(adapter, target, args, overwrite=overwrite)
