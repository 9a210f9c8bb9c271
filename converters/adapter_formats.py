"""Read and write AFMTextV7 LoRA adapters: toolkit checkpoints, `.fmadapter` packages, mlx-lm adapter directories.

Spec: docs/format.md section 3. Every format is read into one in-memory form, `AdapterWeights`:
float32 NumPy tensors under mlx-lm's adapter names, meaning y = W x + scale * (x A) B for each adapted projection:

    model.layers.{i}.self_attn.qkv_proj.lora_a.{k}   [in, r]      k = 0, 1, 2: Q, K, V (fused projection)
    model.layers.{i}.self_attn.qkv_proj.lora_b.{k}   [r, out_k]
    model.{layers|kv_reuse_layers}.{i}.<module>.lora_a / .lora_b   out_proj, gate/up/down_proj, q_proj (reuse)

Formats:
- toolkit checkpoint (`adapter-final.pt`, `adapter-epochN.pt`): a plain dict of
  `layers.segment_S.layer_N.<module>.adapters.base_adapter[.lora_k].{a,b}_transpose` (a [in, r], b [r, out]), fp32
  or bf16. The scale alpha/r = 16/32 = 0.5 is not stored.
- `.fmadapter` directory: `metadata.json` + `adapter_weights.bin`, a CoreML MIL blob file (storage v2) of fp16
  tensors in state-dict order, each transposed (A as [r, in], B as [out, r]), with the Q and K LoRA-B rows permuted
  from interleaved (GPT-J) to half-split (NeoX) RoPE order. The blob holds no names or shapes: they follow from the
  base config and `loraRank`. Optionally `draft.mil` + `draft_weights.bin` (an embedded draft model).
- mlx-lm adapter directory: `adapters.safetensors` + `adapter_config.json` (`lora_parameters: {rank, scale}`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from afm_mlx.errors import AFMError
from afm_mlx.jsonfile import read_json, require

from .mapping import LORA_MODULES, normalize_key
from .output import check_name, write_folder
from .torch_zip import BF16, bf16_bits_to_float32, open_checkpoint, save_checkpoint

MAX_LORA_RANK = 4096  # the toolkit trains rank 32; a rank past the model's width is not an adapter
TOOLKIT_SCALE = 0.5  # alpha / rank = 16 / 32 in the toolkit's base-model config
TOOLKIT_BASE_SIGNATURE = "9799725ff8e851184037110b422d891ad3b92ec1"  # BASE_SIGNATURE of toolkit 26.0.0
FMADAPTER_WEIGHTS, FMADAPTER_METADATA = "adapter_weights.bin", "metadata.json"
FMADAPTER_DRAFT_FILES = ("draft.mil", "draft_weights.bin")
MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"

# Adapted modules in registration (= state-dict) order, section 3.3: toolkit module -> our module.
SEGMENT_0_MODULES = {k: v for k, v in LORA_MODULES.items() if k != "attention.q_transform"}
SEGMENT_1_MODULES = {"attention.q_transform": LORA_MODULES["attention.q_transform"],
                     **{k: v for k, v in SEGMENT_0_MODULES.items() if k != "attention.qkv_transform"}}
_STACKS = {0: "layers", 1: "kv_reuse_layers"}  # toolkit segment -> our layer list

_TOOLKIT_KEY = re.compile(r"^layers\.segment_(?P<seg>[01])\.layer_(?P<idx>\d+)\.(?P<module>.+)\.adapters\."
                          r"(?P<id>[^.]+)(?:\.lora_(?P<part>\d+))?\.(?P<ab>[ab])_transpose$")
_MLX_NAME = re.compile(r"^model\.(?P<stack>layers|kv_reuse_layers)\.(?P<idx>\d+)\.(?P<module>self_attn\.\w+|mlp\.\w+)"
                       r"\.lora_(?P<ab>[ab])(?:\.(?P<part>\d+))?$")


# ---- the adapter layout of a base config ----


@dataclass(frozen=True)
class LoraSlot:
    """One LoRA tensor of a base: our name, the toolkit key, shape ([in, r] or [r, out]) and RoPE head count.

    rope_heads > 0 marks a Q or K LoRA-B, whose output rows the .fmadapter stores in half-split order per head.
    """

    name: str
    toolkit_key: str
    shape: tuple[int, int]
    rope_heads: int = 0

    @property
    def module(self) -> str:
        return module_of(self.name)


def module_of(name: str) -> str:
    """`model.layers.0.self_attn.qkv_proj.lora_b.1` -> `model.layers.0.self_attn.qkv_proj`."""
    return name[: name.index(".lora_")]


def _module_parts(args: Any, module: str) -> list[tuple[int, int, int]]:
    """(fan_in, fan_out, rope_heads) per LoRA part of one of our modules."""
    d, kv, ffn = args.hidden_dim, args.num_kv_heads * args.head_dim, args.ffn_dim
    return {
        "self_attn.qkv_proj": [(d, d, args.num_heads), (d, kv, args.num_kv_heads), (d, kv, 0)],
        "self_attn.q_proj": [(d, d, args.num_heads)],
        "self_attn.out_proj": [(d, d, 0)],
        "mlp.gate_proj": [(d, ffn, 0)],
        "mlp.up_proj": [(d, ffn, 0)],
        "mlp.down_proj": [(ffn, d, 0)],
    }[module]


def lora_layout(args: Any, rank: int) -> list[LoraSlot]:
    """Every LoRA tensor of the base `args` (a ModelArgs) at `rank`, in the toolkit's state-dict order."""
    slots = []
    segments = [(0, args.num_regular_layers, SEGMENT_0_MODULES), (1, args.num_kv_reuse_layers, SEGMENT_1_MODULES)]
    for seg, count, modules in segments:
        for i in range(count):
            for tk_module, module in modules.items():
                parts = _module_parts(args, module)
                for k, (fan_in, fan_out, heads) in enumerate(parts):
                    ours = f"model.{_STACKS[seg]}.{i}.{module}"
                    part = f".{k}" if len(parts) > 1 else ""
                    tk = f"layers.segment_{seg}.layer_{i}.{tk_module}.adapters.base_adapter"
                    tk += f".lora_{k}" if len(parts) > 1 else ""
                    slots.append(LoraSlot(f"{ours}.lora_a{part}", f"{tk}.a_transpose", (fan_in, rank)))
                    slots.append(LoraSlot(f"{ours}.lora_b{part}", f"{tk}.b_transpose", (rank, fan_out), heads))
    return slots


def lora_parameter_count(args: Any, rank: int) -> int:
    """LoRA parameters of a full adapter: 66,633,728 for the 3B base at rank 32 (section 1.4)."""
    return sum(math.prod(slot.shape) for slot in lora_layout(args, rank))


def fmadapter_blob_size(args: Any, rank: int) -> int:
    """Bytes of a full fp16 adapter_weights.bin: header + per tensor (64-byte record + data padded to 64)."""
    return _ALIGN + sum(_ALIGN + _align(2 * math.prod(slot.shape)) for slot in lora_layout(args, rank))


# ---- names ----


def toolkit_key_to_name(key: str) -> tuple[str, str] | None:
    """(our name, adapter id) for a toolkit LoRA key (after `normalize_key`), None if it is not a LoRA key."""
    m = _TOOLKIT_KEY.match(key)
    if m is None:
        return None
    modules = SEGMENT_0_MODULES if m["seg"] == "0" else SEGMENT_1_MODULES
    module = modules.get(m["module"])
    fused = module == "self_attn.qkv_proj"
    if module is None or fused != (m["part"] is not None) or (fused and int(m["part"]) > 2):
        return None
    part = f".{m['part']}" if fused else ""
    return f"model.{_STACKS[int(m['seg'])]}.{m['idx']}.{module}.lora_{m['ab']}{part}", m["id"]


def name_to_toolkit_key(name: str) -> str:
    """Our adapter name -> the toolkit key (adapter id `base_adapter`)."""
    m = _MLX_NAME.match(name)
    if m is None:
        raise AFMError(f"not a LoRA tensor name: {name}")
    seg = 0 if m["stack"] == "layers" else 1
    modules = {v: k for k, v in (SEGMENT_0_MODULES if seg == 0 else SEGMENT_1_MODULES).items()}
    part = f".lora_{m['part']}" if m["part"] is not None else ""
    return (f"layers.segment_{seg}.layer_{m['idx']}.{modules[m['module']]}.adapters.base_adapter{part}"
            f".{m['ab']}_transpose")


# ---- the in-memory adapter ----


@dataclass
class AdapterWeights:
    """A LoRA adapter: float32 tensors under our names (see the module docstring), its rank and scale."""

    tensors: dict[str, np.ndarray]
    rank: int
    scale: float
    format: str  # "toolkit", "fmadapter", "mlx-lm" or "memory"
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    draft_files: list[str] = field(default_factory=list)  # draft.mil / draft_weights.bin inside a .fmadapter

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(module_of(n) for n in self.tensors))

    @property
    def num_parameters(self) -> int:
        return sum(t.size for t in self.tensors.values())

    def scaled_to(self, scale: float) -> dict[str, np.ndarray]:
        """The tensors with B rescaled so that `scale * A B'` equals this adapter's `self.scale * A B`."""
        factor = self.scale / scale
        if factor == 1.0:
            return dict(self.tensors)
        return {n: (t * np.float32(factor) if ".lora_b" in n else t) for n, t in self.tensors.items()}


def infer_rank(tensors: dict[str, np.ndarray], source: str) -> int:
    """The common LoRA rank: A's columns and B's rows, equal for every tensor."""
    ranks: dict[int, str] = {}
    for name, t in tensors.items():
        if t.ndim != 2:
            raise AFMError(f"{source}: {name} has shape {tuple(t.shape)}; LoRA tensors are 2-D")
        ranks.setdefault(int(t.shape[1] if ".lora_a" in name else t.shape[0]), name)
    if len(ranks) != 1:
        (r1, n1), (r2, n2) = list(ranks.items())[:2]
        raise AFMError(f"{source}: mixed LoRA ranks ({n1} has rank {r1}, {n2} has rank {r2})")
    return next(iter(ranks))


def check_adapter(adapter: AdapterWeights, args: Any) -> None:
    """Every tensor must have a place in the base `args` with the right shape, every module all its parts."""
    slots = {s.name: s for s in lora_layout(args, adapter.rank)}
    base = f"{args.num_regular_layers} regular + {args.num_kv_reuse_layers} KV-reuse layers, hidden {args.hidden_dim}"
    for name, tensor in adapter.tensors.items():
        if name not in slots:
            raise AFMError(f"{adapter.source}: {name} has no place in this base ({base}): "
                           "the adapter was trained for another model")
        if tuple(tensor.shape) != slots[name].shape:
            raise AFMError(f"{adapter.source}: {name} has shape {tuple(tensor.shape)}, this base ({base}) needs "
                           f"{slots[name].shape}: the adapter was trained for another model size")
    touched = set(adapter.modules)
    missing = [s.name for s in slots.values() if s.module in touched and s.name not in adapter.tensors]
    if missing:
        raise AFMError(f"{adapter.source}: incomplete LoRA module, {missing[0]} is missing"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not adapter.tensors:
        raise AFMError(f"{adapter.source}: the adapter holds no LoRA tensors")
    damaged = next((n for n, t in adapter.tensors.items() if not np.isfinite(t).all()), None)
    if damaged is not None:  # NaN/inf would turn every logit NaN, silently: refuse at load, not at generation
        raise AFMError(f"{adapter.source}: {damaged} holds NaN or infinite values; the adapter is damaged")


# ---- toolkit checkpoints ----


def read_toolkit_adapter(path: str | os.PathLike) -> AdapterWeights:
    """A toolkit adapter checkpoint (`adapter-final.pt`) through the torch-free reader; bf16 is widened exactly."""
    source = str(path)
    tensors: dict[str, np.ndarray] = {}
    ids, others = set(), []
    with open_checkpoint(path) as ckpt:
        for key in ckpt:
            parsed = toolkit_key_to_name(normalize_key(key))
            if parsed is None:
                if ".adapters." in key:
                    raise AFMError(f"{source}: unrecognised adapter tensor {key} (not a LoRA of an AFMTextV7 "
                                   "projection)")
                others.append(key)
                continue
            tensor = ckpt[key]
            if tensor.dtype not in ("float32", "bfloat16", "float16"):
                raise AFMError(f"{source}: {key} has dtype {tensor.dtype}; LoRA tensors are floating point")
            tensors[parsed[0]] = np.asarray(tensor.numpy(copy=True), dtype=np.float32)
            ids.add(parsed[1])
    if others:
        raise AFMError(f"{source}: not an adapter checkpoint: it holds {len(others)} non-LoRA tensors (e.g. "
                       f"{others[0]}); base and draft checkpoints are converted with `afm-mlx convert`")
    if not tensors:
        raise AFMError(f"{source}: no LoRA tensors (`...adapters.base_adapter...a_transpose`) in this checkpoint")
    if len(ids) > 1:
        raise AFMError(f"{source}: holds several adapters ({', '.join(sorted(ids))}); save one per file")
    adapter = AdapterWeights(tensors, infer_rank(tensors, source), TOOLKIT_SCALE, "toolkit", source,
                             {"adapter_id": ids.pop()})
    _warn_if_untrained(adapter)
    return adapter


def _warn_if_untrained(adapter: AdapterWeights) -> None:
    if all(not np.any(t) for n, t in adapter.tensors.items() if ".lora_b" in n):
        warnings.warn(f"{adapter.source}: every LoRA-B is zero, so this adapter changes nothing (an untrained "
                      "base_adapter?)", stacklevel=3)


def write_toolkit_adapter(adapter: AdapterWeights, path: str | os.PathLike, *, bf16: bool = False,
                          overwrite: bool = True) -> None:
    """Write a toolkit-style checkpoint (scale folded to the toolkit's 0.5), atomically, in state-dict order;
    overwrite=False: an existing file is an AFMError."""
    tensors = adapter.scaled_to(TOOLKIT_SCALE)
    order = sorted(tensors, key=_state_dict_order)
    save_checkpoint(path, ((name_to_toolkit_key(n), BF16(tensors[n]) if bf16 else tensors[n]) for n in order),
                    replace=overwrite)


def _state_dict_order(name: str) -> tuple:
    m = _MLX_NAME.match(name)
    seg = 0 if m["stack"] == "layers" else 1
    modules = list((SEGMENT_0_MODULES if seg == 0 else SEGMENT_1_MODULES).values())
    return seg, int(m["idx"]), modules.index(m["module"]), int(m["part"] or 0), m["ab"]


# ---- CoreML MIL blob storage (v2) ----

_ALIGN = 64
_HEADER = struct.Struct("<II7Q")  # count, version, reserved
_RECORD = struct.Struct("<IIQQ5Q")  # sentinel, mil_dtype, sizeInBytes, offset (absolute, of the data), reserved
_SENTINEL = 0xDEADBEEF
_BLOB_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4"), 5: np.dtype("<u2")}  # fp16, fp32, bf16 (as bits)
_BLOB_DTYPE_NAMES = {1: "float16", 2: "float32", 3: "uint8", 4: "int8", 5: "bfloat16", 6: "int16", 7: "uint16"}


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def read_mil_blob(path: str | os.PathLike) -> list[np.ndarray]:
    """The tensors of a MIL blob storage file as flat float32 arrays, every record validated."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    size = data.size
    if size < _HEADER.size:
        raise AFMError(f"{path}: {size} bytes is too short for a MIL blob header (64 bytes); file truncated?")
    count, version = _HEADER.unpack_from(data, 0)[:2]
    if version != 2:
        raise AFMError(f"{path}: MIL blob storage version {version}, only version 2 is supported")
    arrays, pos = [], _HEADER.size
    for i in range(count):
        if pos + _RECORD.size > size:
            raise AFMError(f"{path}: truncated: record {i} of {count} starts at byte {pos}, the file has {size}")
        sentinel, dtype, nbytes, offset = _RECORD.unpack_from(data, pos)[:4]
        if sentinel != _SENTINEL:
            raise AFMError(f"{path}: record {i} at byte {pos} has sentinel {sentinel:#x}, not 0xdeadbeef: "
                           "not a MIL blob file, or damaged")
        if dtype not in _BLOB_DTYPES:
            raise AFMError(f"{path}: record {i} has data type {_BLOB_DTYPE_NAMES.get(dtype, dtype)}; "
                           "adapter weights are float16")
        np_dtype = _BLOB_DTYPES[dtype]
        if offset < pos + _RECORD.size or nbytes % np_dtype.itemsize:
            raise AFMError(f"{path}: record {i} has an invalid data offset {offset} / size {nbytes}")
        if offset + nbytes > size:
            raise AFMError(f"{path}: truncated: tensor {i} of {count} needs bytes up to {offset + nbytes}, "
                           f"the file has {size}")
        values = np.frombuffer(data, np_dtype, nbytes // np_dtype.itemsize, offset)
        arrays.append(bf16_bits_to_float32(values) if dtype == 5 else values.astype(np.float32))
        pos = _align(offset + nbytes)
    return arrays


def write_mil_blob(path: str | os.PathLike, arrays: Iterable[np.ndarray]) -> None:
    """Write fp16 tensors as MIL blob storage v2 (what coremltools' `write_fp16_data` produces)."""
    arrays = [np.ascontiguousarray(a, dtype="<f2") for a in arrays]
    with open(path, "wb") as f:
        f.write(_HEADER.pack(len(arrays), 2, *[0] * 7))
        pos = _HEADER.size
        for a in arrays:
            offset = pos + _RECORD.size
            f.write(_RECORD.pack(_SENTINEL, 1, a.nbytes, offset, *[0] * 5))
            f.write(a.tobytes())
            pos = _align(offset + a.nbytes)
            f.write(b"\0" * (pos - offset - a.nbytes))


# ---- .fmadapter ----


def to_half_split(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """The toolkit's `_permute_qk` on [out, c]: within each head, row 2i+j moves to j*(head_dim/2)+i."""
    out, cols = rows.shape
    return rows.reshape(n_heads, out // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(out, cols)


def to_interleaved(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `to_half_split`: back to interleaved (GPT-J, tamm) RoPE row order."""
    out, cols = rows.shape
    return rows.reshape(n_heads, 2, out // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(out, cols)


def is_fmadapter(path: Path) -> bool:
    return path.is_dir() and ((path / FMADAPTER_WEIGHTS).exists() or (path / FMADAPTER_METADATA).exists())


_MAX_JSON_BYTES = 1 << 20  # an adapter's metadata.json / adapter_config.json is well under a kilobyte


def _read_json(path: Path) -> Any:
    """A small JSON file from an untrusted adapter: size-capped, and deep nesting (json recurses) is an error."""
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise AFMError(f"{path}: {path.stat().st_size} bytes, more than an adapter's JSON ever needs "
                       f"({_MAX_JSON_BYTES}); not an adapter file")
    return read_json(path)


def read_fmadapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    meta_file = Path(path) / FMADAPTER_METADATA
    if not meta_file.is_file():
        raise AFMError(f"{path}: not a .fmadapter package: {FMADAPTER_METADATA} is missing")
    meta = _read_json(meta_file)
    if not 0 < require(meta, "loraRank", int, str(meta_file)) <= MAX_LORA_RANK:
        raise AFMError(f"{meta_file}: `loraRank` {meta['loraRank']} is outside 1..{MAX_LORA_RANK}")
    require(meta, "baseModelSignature", str, str(meta_file))
    return meta


def check_signature(meta: dict, source: str, expected: str | None, allow_mismatch: bool) -> None:
    """An adapter only fits the base it was trained on: compare `baseModelSignature` with the expected one."""
    found = meta["baseModelSignature"]
    if expected is None or found == expected:
        return
    message = (f"{source}: exported for base model {found[:7]}, but this base is {expected[:7]} (toolkit 26.0.0); "
               "an adapter only works with the base it was trained on")
    if not allow_mismatch:
        raise AFMError(message + " (allow_signature_mismatch=True / --allow-signature-mismatch loads it anyway)")
    warnings.warn(message, stacklevel=3)


def read_fmadapter(path: str | os.PathLike, args: Any, *, expected_signature: str | None = TOOLKIT_BASE_SIGNATURE,
                   allow_signature_mismatch: bool = False) -> AdapterWeights:
    """A `.fmadapter` package for the base `args`: blob validated, transposes and Q/K row permutation undone."""
    path = Path(path)
    meta = read_fmadapter_metadata(path)
    check_signature(meta, str(path), expected_signature, allow_signature_mismatch)
    blob = path / FMADAPTER_WEIGHTS
    if not blob.is_file():
        raise AFMError(f"{path}: {FMADAPTER_WEIGHTS} is missing")
    arrays = read_mil_blob(blob)
    rank = meta["loraRank"]
    slots = lora_layout(args, rank)
    if len(arrays) != len(slots):
        raise AFMError(f"{blob}: holds {len(arrays)} tensors, an adapter for this base ({args.num_regular_layers} "
                       f"regular + {args.num_kv_reuse_layers} KV-reuse layers) has {len(slots)}: exported for "
                       "another model")
    tensors = {}
    for i, (slot, flat) in enumerate(zip(slots, arrays)):
        if flat.size != math.prod(slot.shape):
            raise AFMError(_size_mismatch(blob, i, slot, flat.size, rank))
        stored = flat.reshape(slot.shape[::-1])  # transposed: A as [r, in], B as [out, r]
        if slot.rope_heads:
            stored = to_interleaved(stored, slot.rope_heads)
        tensors[slot.name] = np.ascontiguousarray(stored.T)
    draft = [f for f in FMADAPTER_DRAFT_FILES if (path / f).exists()]
    return AdapterWeights(tensors, rank, TOOLKIT_SCALE, "fmadapter", str(path), meta, draft)


def _size_mismatch(blob: Path, index: int, slot: LoraSlot, found: int, rank: int) -> str:
    per_rank = math.prod(slot.shape) // rank
    where = f"{blob}: tensor {index} ({slot.toolkit_key}) has {found} values"
    if found % per_rank == 0:
        return f"{where}, i.e. rank {found // per_rank}, but metadata.json says loraRank {rank}"
    return f"{where}, this base needs {math.prod(slot.shape)} (shape {slot.shape[::-1]}): exported for another model"


def write_fmadapter(adapter: AdapterWeights, out_dir: str | os.PathLike, name: str, args: Any, *,
                    author: str = "3P developer", description: str = "", license: str = "",
                    base_signature: str = TOOLKIT_BASE_SIGNATURE, draft_token_count: int = 5,
                    creator_defined: dict | None = None, overwrite: bool = False) -> Path:
    """Write `<out_dir>/<name>.fmadapter` as the toolkit's exporter does; returns its path.

    The scale is folded into B so that the device's fixed 0.5 reproduces the adapter; modules the adapter lacks are
    written as zeros (no change). Written whole or not at all (converters/output.py).
    """
    stem = _check_export_options(name, base_signature, draft_token_count)
    check_adapter(adapter, args)
    target = Path(out_dir) / f"{stem}.fmadapter"
    if target.exists() and not overwrite:
        raise AFMError(f"{target} exists (pass overwrite=True / --overwrite to replace it)")
    arrays = _fmadapter_arrays(adapter, args)
    metadata = {
        # The toolkit's exporter names the package NAME.fmadapter unless NAME already ends so, but builds the
        # identifier from NAME as given: `-n x.fmadapter` gives `fmadapter-x.fmadapter-<sig>`. Kept as it is.
        "adapterIdentifier": f"fmadapter-{name}-{base_signature[:7]}",
        "author": author,
        "baseModelSignature": base_signature,
        "creatorDefined": creator_defined or {},
        "description": description,
        "license": license,
        "loraRank": adapter.rank,
        "speculativeDecodingDraftTokenCount": draft_token_count,
    }

    def fill(folder: Path) -> None:
        write_mil_blob(folder / FMADAPTER_WEIGHTS, arrays)
        (folder / FMADAPTER_METADATA).write_text(
            json.dumps(metadata, sort_keys=True, indent=4, default=str, ensure_ascii=False), encoding="utf-8")

    write_folder(target, fill, replace=overwrite)
    return target


_SIGNATURE = re.compile(r"^[0-9a-f]{7,64}$")  # toolkit 26.0.0's is a 40-digit hex digest; the id uses [:7]


def _check_export_options(name: str, base_signature: str, draft_token_count: int) -> str:
    """The package name without `.fmadapter`, after checking what metadata.json will say."""
    stem = check_name(name.removesuffix(".fmadapter"), "adapter name")
    if not stem.isprintable():
        raise AFMError(f"invalid adapter name {name!r}: use a plain file name (printable characters)")
    try:
        stem.encode("utf-8")
    except UnicodeEncodeError:
        raise AFMError(f"invalid adapter name {name!r}: not valid UTF-8") from None
    if "-" in stem:
        warnings.warn(f"adapter name {stem!r} has a hyphen: hyphens in adapter names are reported to make loading "
                      "the .fmadapter on device fail; an underscore is safe", stacklevel=4)
    if not isinstance(base_signature, str) or not _SIGNATURE.match(base_signature):
        raise AFMError(f"base signature {base_signature!r:.50} is not a lowercase hex digest (7 to 64 digits)")
    if type(draft_token_count) is not int or not 1 <= draft_token_count <= 64:
        raise AFMError(f"speculative draft token count must be an integer in 1..64, got {draft_token_count!r}")
    return stem


def _fmadapter_arrays(adapter: AdapterWeights, args: Any) -> list[np.ndarray]:
    tensors = adapter.scaled_to(TOOLKIT_SCALE)
    slots = lora_layout(args, adapter.rank)
    absent = {s.module for s in slots if s.name not in tensors}
    if absent:
        warnings.warn(f"{adapter.source}: {len(absent)} of {len({s.module for s in slots})} projections carry no "
                      "LoRA; they are written as zeros (no change)", stacklevel=3)
    arrays = []
    for slot in slots:
        t = tensors.get(slot.name)
        stored = np.zeros(slot.shape[::-1], np.float32) if t is None else np.asarray(t, np.float32).T
        if slot.rope_heads:
            stored = to_half_split(stored, slot.rope_heads)
        half = stored.astype(np.float16)
        if not np.all(np.isfinite(half)):
            raise AFMError(f"{adapter.source}: {slot.name} overflows float16 (|value| > 65504); cannot export")
        arrays.append(half)
    return arrays


def import_fmadapter_draft(path: str | os.PathLike) -> None:
    """Embedded drafts cannot be imported: say why and what to use instead."""
    path = Path(path)
    present = [f for f in FMADAPTER_DRAFT_FILES if (path / f).exists()]
    if not present:
        raise AFMError(f"{path}: embeds no draft model (no draft.mil / draft_weights.bin)")
    raise AFMError(f"{path}: its draft model cannot be imported: draft_weights.bin is the toolkit's CoreML weight "
                   "template, whose tensor names, offsets and per-tensor formats (fp16, linear_4bits, lut_4bits) are "
                   "listed only in the toolkit's weights_spec yaml (`weights_mapping`), which the package does not "
                   "contain; convert the toolkit's draft-model-final.pt instead (`afm-mlx convert`)")


# ---- mlx-lm adapter directories ----


def read_mlx_adapter(path: str | os.PathLike) -> AdapterWeights:
    """An mlx-lm adapter directory (`adapters.safetensors` + `adapter_config.json`) for the afm7 model."""
    import mlx.core as mx

    path = Path(path)
    config = _read_mlx_config(path)
    params = config["lora_parameters"]
    try:
        arrays = mx.load(str(path / MLX_WEIGHTS))
    except (RuntimeError, ValueError, OSError) as err:
        raise AFMError(f"{path / MLX_WEIGHTS}: unreadable safetensors file ({err})") from None
    tensors = {}
    for name, array in arrays.items():
        if _MLX_NAME.match(name) is None or module_of(name).split(".", 3)[3] not in _ALL_MODULES:
            raise AFMError(f"{path / MLX_WEIGHTS}: unsupported tensor {name} (only LoRA on the attention and MLP "
                           "projections of an afm7 model)")
        tensors[name] = np.array(array.astype(mx.float32))
    if not tensors:
        raise AFMError(f"{path / MLX_WEIGHTS}: no LoRA tensors")
    rank = infer_rank(tensors, str(path))
    if rank != params["rank"]:
        raise AFMError(f"{path}: tensors have rank {rank}, but {MLX_CONFIG} says rank {params['rank']}")
    return AdapterWeights(tensors, rank, float(params["scale"]), "mlx-lm", str(path), config)


_ALL_MODULES = set(SEGMENT_0_MODULES.values()) | set(SEGMENT_1_MODULES.values())


def _read_mlx_config(path: Path) -> dict:
    config_file = path / MLX_CONFIG
    if not config_file.is_file() or not (path / MLX_WEIGHTS).is_file():
        raise AFMError(f"{path}: not an mlx-lm adapter directory ({MLX_WEIGHTS} and {MLX_CONFIG} needed)")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise AFMError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AFMError(f"{config_file}: fine_tune_type {repr(kind)[:40]}; only LoRA adapters are supported")
    params = require(config, "lora_parameters", dict, str(config_file))
    if not 0 < require(params, "rank", int, f"{config_file}: lora_parameters") <= MAX_LORA_RANK:
        raise AFMError(f"{config_file}: lora_parameters.rank {params['rank']} is outside 1..{MAX_LORA_RANK}")
    scale = require(params, "scale", (int, float), f"{config_file}: lora_parameters")
    if not math.isfinite(scale):
        raise AFMError(f"{config_file}: lora_parameters.scale must be finite, got {scale}")
    return config


def write_mlx_adapter(adapter: AdapterWeights, out_dir: str | os.PathLike, args: Any, *,
                      overwrite: bool = False) -> Path:
    """Write the mlx-lm adapter directory `out_dir` (loadable by `mlx_lm.tuner.utils.load_adapters` on afm7),
    whole or not at all; an existing one is replaced only with overwrite=True."""
    import mlx.core as mx

    check_adapter(adapter, args)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise AFMError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    n_regular = args.num_regular_layers
    first = min(int(m["idx"]) + (0 if m["stack"] == "layers" else n_regular)
                for m in map(_MLX_NAME.match, adapter.tensors))
    config = {"fine_tune_type": "lora", "num_layers": args.num_layers - first,
              "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": 0.0}}

    def fill(folder: Path) -> None:
        mx.save_safetensors(str(folder / MLX_WEIGHTS), {n: mx.array(t) for n, t in adapter.tensors.items()})
        (folder / MLX_CONFIG).write_text(json.dumps(config, indent=4))

    write_folder(out, fill, replace=overwrite)
    return out


# ---- any format ----


def adapter_format(path: str | os.PathLike) -> str:
    """"fmadapter", "mlx-lm" or "toolkit" for an adapter path; AFMError if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise AFMError(f"adapter not found: {path}")
    if is_fmadapter(path):
        return "fmadapter"
    if path.is_dir() and (path / MLX_WEIGHTS).exists():
        return "mlx-lm"
    if path.is_file() and path.name == MLX_WEIGHTS:
        return "mlx-lm"
    if path.is_file():
        return "toolkit"
    raise AFMError(f"{path}: not an adapter: expected a toolkit checkpoint (.pt), a .fmadapter package "
                   f"({FMADAPTER_METADATA} + {FMADAPTER_WEIGHTS}) or an mlx-lm adapter dir ({MLX_WEIGHTS})")


def read_adapter(path: str | os.PathLike, args: Any, **fmadapter_options: Any) -> AdapterWeights:
    """Any adapter format, checked against the base `args` (names, shapes, complete modules)."""
    path = Path(path)
    if path.is_file() and path.name in (FMADAPTER_WEIGHTS, FMADAPTER_METADATA):
        path = path.parent
    kind = adapter_format(path)
    if kind == "fmadapter":
        adapter = read_fmadapter(path, args, **fmadapter_options)
    elif kind == "mlx-lm":
        adapter = read_mlx_adapter(path if path.is_dir() else path.parent)
    else:
        adapter = read_toolkit_adapter(path)
    check_adapter(adapter, args)
    return adapter


def default_adapter_name(path: str | os.PathLike) -> str:
    """`chat.fmadapter` -> chat, `adapter-final.pt` -> adapter-final, `out/adapters` dir -> adapters."""
    path = Path(path).resolve()
    if path.is_file() and path.name in (MLX_WEIGHTS, FMADAPTER_WEIGHTS, FMADAPTER_METADATA):
        path = path.parent
    return path.name.removesuffix(".fmadapter") if path.suffix == ".fmadapter" else path.stem
