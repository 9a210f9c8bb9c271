"""Map an adapter-toolkit (tamm) AFMTextV7 state dict onto the mlx-lm `afm7` parameter names.

Spec: docs/format.md sections 1 and 7. The mapping is decided from names and shapes alone
(`map_toolkit_state_dict`), so a 12.7 GB checkpoint is planned without reading any tensor data; the data is
then pulled one tensor at a time through `MappedCheckpoint.load`.

Layouts handled:
- base:  `layers.segment_0.layer_i.*` (regular) and `layers.segment_1.layer_j.*` (KV reuse), weights under
  `.wrapped.`, LoRA under `.adapters.base_adapter[.lora_k].{a,b}_transpose`;
- draft: `layers.layer_i.*` (regular only), no `.wrapped.`, optional leading `model.`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from afm_mlx.errors import AFMError

DEFAULT_ROPE_THETA = 500000.0
DEFAULT_RMS_NORM_EPS = 1e-5

# Per-layer name tables: toolkit suffix (after `layer_i.`, `.wrapped.` removed) -> our suffix.
_COMMON = {
    "attention.norm.weight": "input_layernorm.weight",
    "attention.output_transform.weight": "self_attn.out_proj.weight",
    "feed_forward.norm.weight": "post_attention_layernorm.weight",
    "feed_forward.hidden_transform.linear_0.weight": "mlp.gate_proj.weight",  # goes through SiLU
    "feed_forward.hidden_transform.linear_1.weight": "mlp.up_proj.weight",
    "feed_forward.output_transform.weight": "mlp.down_proj.weight",
}
REGULAR_LAYER = {
    **_COMMON,
    "attention.qkv_transform.fused_linear.weight": "self_attn.qkv_proj.weight",
    "attention.qk_norm.query_norm.weight": "self_attn.q_norm.weight",
    "attention.qk_norm.key_norm.weight": "self_attn.k_norm.weight",
}
REUSE_LAYER = {
    **_COMMON,
    "attention.q_transform.weight": "self_attn.q_proj.weight",
    "attention.q_norm.query_norm.weight": "self_attn.q_norm.weight",
}
_KV_QUANT_PREFIX = "attention.kv_quantizer.{}_quantizer.activation_post_process."
_WEIGHT_SUFFIXES = (".weight", ".bias")  # learned tensors: never ignored
KV_SCALE = {"key": "self_attn.quant_key_scale", "value": "self_attn.quant_value_scale"}

# LoRA-carrying modules: toolkit module -> our module (mlx-lm adapter layout: `<module>.lora_a[.k]`, `.lora_b[.k]`).
LORA_MODULES = {
    "attention.qkv_transform": "self_attn.qkv_proj",  # fused: lora_0/1/2 = Q/K/V
    "attention.q_transform": "self_attn.q_proj",
    "attention.output_transform": "self_attn.out_proj",
    "feed_forward.hidden_transform.linear_0": "mlp.gate_proj",
    "feed_forward.hidden_transform.linear_1": "mlp.up_proj",
    "feed_forward.output_transform": "mlp.down_proj",
}

_LAYER_RE = re.compile(r"^layers\.(?:segment_(?P<seg>\d+)\.)?layer_(?P<idx>\d+)\.(?P<rest>.+)$")
_LORA_RE = re.compile(
    r"^(?P<module>.+)\.adapters\.base_adapter(?:\.lora_(?P<part>\d+))?\.(?P<ab>[ab])_transpose$"
)


def normalize_key(key: str) -> str:
    """Strip an optional leading `model.` and every `.wrapped.` (the AdaptedLayer wrapper)."""
    if key.startswith("model."):
        key = key[len("model.") :]
    return key.replace(".wrapped.", ".")


def kv_scale_from_range(value_range: np.ndarray) -> np.ndarray:
    """The fake-quant scale of section 4.6: `max(range_f32 * f32([1/-128, 1/127]))`, all in float32."""
    r = np.asarray(value_range, dtype=np.float32).reshape(-1)
    if r.shape != (2,):
        raise AFMError(f"KV-quantizer range must have 2 values [min, max], got shape {tuple(r.shape)}")
    reciprocals = np.array([1 / -128, 1 / 127], dtype=np.float32)
    scale = np.max(r * reciprocals).astype(np.float32)
    if not np.isfinite(scale) or scale <= 0:
        raise AFMError(f"KV-quantizer range {r.tolist()} gives scale {float(scale)}; it must be positive")
    return np.array(scale, dtype=np.float32)


@dataclass(frozen=True)
class WeightSource:
    """Where a target parameter comes from: one source key, optionally transformed after reading."""

    key: str
    shape: tuple[int, ...]  # expected target shape
    transform: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class MappedCheckpoint:
    """The plan for one checkpoint: inferred config and, per target name, where its data comes from."""

    config: dict[str, Any]
    weights: dict[str, WeightSource]  # target name -> source, in source order
    lora: dict[str, WeightSource] = field(default_factory=dict)  # mlx-lm adapter names, e.g. `...qkv_proj.lora_a.0`
    ignored: list[str] = field(default_factory=list)  # source keys deliberately dropped
    tied_output: str | None = None  # source key of the tied output head, dropped after the tie check
    unknown_buffers: list[str] = field(default_factory=list)  # kv-quantizer state we do not know, ignored

    def load(self, name: str, tensors: Mapping[str, Any]) -> np.ndarray:
        """Read one target (or LoRA) tensor from `tensors` and apply its transform."""
        src = self.weights.get(name) or self.lora[name]
        array = _to_numpy(tensors[src.key])
        if src.transform is not None:
            array = src.transform(array)
        if tuple(array.shape) != src.shape:
            raise AFMError(f"{src.key}: read shape {tuple(array.shape)}, expected {src.shape}")
        return array


def _to_numpy(tensor: Any, copy: bool = True) -> np.ndarray:
    """A NumPy array from an array or a lazy tensor; torch_zip tensors are read into owned memory (copy=True)
    so that no memory map of the checkpoint stays resident after the tensor is dropped."""
    if isinstance(tensor, np.ndarray) or not hasattr(tensor, "numpy"):
        return np.asarray(tensor)
    try:
        return tensor.numpy(copy=copy)
    except TypeError:  # numpy() without a copy flag (e.g. a torch tensor)
        return tensor.numpy()


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape)


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {shown}{more}"


# ---- classification of source keys ----


@dataclass
class _Sorted:
    """Source keys sorted into their roles, before any shape is checked."""

    top: dict[str, str] = field(default_factory=dict)  # normalized top-level key -> source key
    layers: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)  # (kind, idx) -> rest -> key
    unknown: list[str] = field(default_factory=list)
    layouts: set[str] = field(default_factory=set)


def _classify(keys: list[str]) -> _Sorted:
    out = _Sorted()
    for key in keys:
        norm = normalize_key(key)
        m = _LAYER_RE.match(norm)
        if m is None:
            if norm in ("embedding.weight", "output_norm.weight", "output_transform.weight"):
                out.top[norm] = key
            else:
                out.unknown.append(key)
            continue
        seg = m["seg"]
        kind = {None: "regular", "0": "regular", "1": "reuse"}.get(seg)
        if kind is None:
            out.unknown.append(key)
            continue
        out.layouts.add("draft" if seg is None else "segmented")
        out.layers.setdefault((kind, int(m["idx"])), {})[m["rest"]] = key
    if len(out.layouts) > 1:
        raise AFMError("checkpoint mixes `layers.layer_N` and `layers.segment_S.layer_N` keys")
    return out


def _layer_count(sorted_keys: _Sorted, kind: str) -> int:
    indices = sorted(i for k, i in sorted_keys.layers if k == kind)
    if indices != list(range(len(indices))):
        raise AFMError(f"{kind} layer indices are not 0..n-1: {indices[:10]}")
    return len(indices)


# ---- config inference ----


def _infer_config(tensors, sorted_keys: _Sorted, rope_theta: float, rms_norm_eps: float) -> dict[str, Any]:
    if "embedding.weight" not in sorted_keys.top:
        raise AFMError("not an AFMTextV7 checkpoint: no `embedding.weight` tensor")
    n_regular, n_reuse = _layer_count(sorted_keys, "regular"), _layer_count(sorted_keys, "reuse")
    if n_regular == 0:
        raise AFMError("not an AFMTextV7 checkpoint: no `layers.[segment_0.]layer_0.*` tensors")
    vocab_size, hidden = _shape(tensors[sorted_keys.top["embedding.weight"]])
    layer0 = sorted_keys.layers[("regular", 0)]

    def layer0_shape(rest: str) -> tuple[int, ...]:
        if rest not in layer0:
            raise AFMError(f"missing tensor for regular layer 0: {rest}")
        return _shape(tensors[layer0[rest]])

    (head_dim,) = layer0_shape("attention.qk_norm.query_norm.weight")
    if head_dim <= 0 or hidden % head_dim:
        raise AFMError(f"q-norm size {head_dim} does not divide the hidden size {hidden}")
    num_heads = hidden // head_dim
    qkv_rows = layer0_shape("attention.qkv_transform.fused_linear.weight")[0]
    kv_rows = qkv_rows - hidden
    if kv_rows <= 0 or kv_rows % (2 * head_dim):
        raise AFMError(f"qkv weight has {qkv_rows} rows: not hidden {hidden} + 2 * k * head_dim {head_dim}")
    ffn = layer0_shape("feed_forward.hidden_transform.linear_0.weight")[0]
    scale_factor = ffn / hidden
    if int(hidden * scale_factor) != ffn:  # mlx-lm builds the MLP as int(hidden * factor)
        raise AFMError(f"FFN size {ffn} is not reproducible as int({hidden} * factor)")
    return {
        "model_type": "afm7",
        "vocab_size": vocab_size,
        "hidden_dim": hidden,
        "num_layers": n_regular + n_reuse,
        "num_kv_reuse_layers": n_reuse,
        "num_heads": num_heads,
        "num_kv_heads": kv_rows // (2 * head_dim),
        "hidden_dim_scale_factor": scale_factor,
        "rope_theta": float(rope_theta),
        "rms_norm_eps": float(rms_norm_eps),
        "kv_quant": _has_kv_quant(sorted_keys, n_regular),
    }


def _has_kv_quant(sorted_keys: _Sorted, n_regular: int) -> bool:
    """All regular layers carry key and value range buffers, or none does."""
    wanted = [_KV_QUANT_PREFIX.format(kind) + "range" for kind in ("key", "value")]
    have = [
        f"layer {i} {w.split('.')[2]}"
        for i in range(n_regular)
        for w in wanted
        if w in sorted_keys.layers[("regular", i)]
    ]
    if have and len(have) != 2 * n_regular:
        missing = [
            f"regular layer {i}: {w}"
            for i in range(n_regular)
            for w in wanted
            if w not in sorted_keys.layers[("regular", i)]
        ]
        raise AFMError(f"KV-quantizer range buffers present in some layers but missing in {_listing(missing)}")
    return bool(have)


def target_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of the mlx-lm afm7 model for `config`, in model order, with its shape."""
    d, v = config["hidden_dim"], config["vocab_size"]
    head_dim = d // config["num_heads"]
    kv = config["num_kv_heads"] * head_dim
    ffn = int(d * config["hidden_dim_scale_factor"])
    n_reuse = config["num_kv_reuse_layers"]
    common = {
        "input_layernorm.weight": (d,),
        "self_attn.out_proj.weight": (d, d),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (ffn, d),
        "mlp.up_proj.weight": (ffn, d),
        "mlp.down_proj.weight": (d, ffn),
    }
    regular = {
        **common,
        "self_attn.qkv_proj.weight": (d + 2 * kv, d),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
    }
    if config.get("kv_quant", True):
        regular.update({KV_SCALE["key"]: (), KV_SCALE["value"]: ()})
    reuse = {**common, "self_attn.q_proj.weight": (d, d), "self_attn.q_norm.weight": (head_dim,)}
    shapes = {"model.embedding.weight": (v, d)}
    for i in range(config["num_layers"] - n_reuse):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in regular.items()})
    for j in range(n_reuse):
        shapes.update({f"model.kv_reuse_layers.{j}.{k}": s for k, s in reuse.items()})
    shapes["model.output_norm.weight"] = (d,)
    return shapes


def _lora_shapes(config: Mapping[str, Any], module: str, rank: int) -> dict[str, tuple[int, ...]]:
    """mlx-lm adapter tensors of one module: `lora_a[.k]` [in, r] and `lora_b[.k]` [r, out_k]."""
    d = config["hidden_dim"]
    head_dim = d // config["num_heads"]
    ffn = int(d * config["hidden_dim_scale_factor"])
    if module == "self_attn.qkv_proj":
        outs = [d, config["num_kv_heads"] * head_dim, config["num_kv_heads"] * head_dim]
        return {
            **{f"lora_a.{k}": (d, rank) for k in range(3)},
            **{f"lora_b.{k}": (rank, o) for k, o in enumerate(outs)},
        }
    fan_in = ffn if module == "mlp.down_proj" else d
    fan_out = ffn if module in ("mlp.gate_proj", "mlp.up_proj") else d
    return {"lora_a": (fan_in, rank), "lora_b": (rank, fan_out)}


# ---- the mapping ----


def map_toolkit_state_dict(
    tensors: Mapping[str, Any],
    *,
    rope_theta: float = DEFAULT_ROPE_THETA,
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS,
) -> MappedCheckpoint:
    """Plan the conversion of a toolkit state dict (names and shapes only; no tensor data is read).

    Strict: every source key must be used or deliberately ignored, every target parameter filled exactly
    once, and every shape must match the inferred config; otherwise AFMError lists the offending keys.
    """
    keys = list(tensors.keys())
    sorted_keys = _classify(keys)
    if sorted_keys.unknown:
        raise AFMError(f"unknown tensors in checkpoint, {_listing(sorted_keys.unknown)}")
    config = _infer_config(tensors, sorted_keys, rope_theta, rms_norm_eps)
    plan = _Plan(config, target_shapes(config), draft_layout="draft" in sorted_keys.layouts)
    for key in keys:
        plan.place(key, _shape(tensors[key]))
    plan.check_complete()
    result = plan.result()
    _check_float_dtypes(tensors, [*result.weights.values(), *result.lora.values()])
    return result


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _dtype_name(tensor: Any) -> str:
    """'float32' for a torch_zip tensor, a NumPy array or a torch tensor alike."""
    return str(getattr(tensor, "dtype", "unknown")).removeprefix("torch.")


def _check_float_dtypes(tensors: Mapping[str, Any], sources: list[WeightSource]) -> None:
    """Weights and kv-quantizer ranges are floats in every toolkit file: an integer or bool tensor in their place
    would be cast to float and could even be stored "exactly" on a grid, so it is refused, not converted."""
    bad = [f"{s.key} ({_dtype_name(tensors[s.key])})" for s in sources
           if _dtype_name(tensors[s.key]) not in FLOAT_DTYPES]
    if bad:
        raise AFMError(f"checkpoint does not match AFMTextV7: non-floating-point weights, {_listing(bad)}")


class _Plan:
    """Accumulates the assignment of source keys to targets, collecting every problem before raising."""

    def __init__(self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], draft_layout: bool):
        self.config, self.shapes, self.draft_layout = config, shapes, draft_layout
        self.weights: dict[str, WeightSource] = {}
        self.lora: dict[str, WeightSource] = {}
        self.ignored: list[str] = []
        self.unknown_buffers: list[str] = []
        self.tied_output: str | None = None
        self.problems: list[str] = []
        self.rank: int | None = None
        self.attempted: set[str] = set()

    def place(self, key: str, shape: tuple[int, ...]) -> None:
        norm = normalize_key(key)
        m = _LAYER_RE.match(norm)
        if m is None:
            self._place_top(key, norm, shape)
            return
        kind = "reuse" if m["seg"] == "1" else "regular"
        prefix = f"model.{'kv_reuse_layers' if kind == 'reuse' else 'layers'}.{m['idx']}."
        table = REUSE_LAYER if kind == "reuse" else REGULAR_LAYER
        rest = m["rest"]
        if rest in table:
            self._assign(self.weights, prefix + table[rest], key, shape)
        elif kind == "regular" and self._place_kv_quant(key, prefix, rest, shape):
            pass
        elif (lora := _LORA_RE.match(rest)) and lora["module"] in LORA_MODULES:
            self._place_lora(key, prefix, lora, shape)
        else:
            self.problems.append(f"unknown key {key}")

    def _place_top(self, key: str, norm: str, shape: tuple[int, ...]) -> None:
        if norm == "output_transform.weight":
            if shape != self.shapes["model.embedding.weight"]:
                self.problems.append(f"{key}: shape {shape} != embedding {self.shapes['model.embedding.weight']}")
            self.tied_output = key
            return
        self._assign(self.weights, f"model.{norm}", key, shape)

    def _place_kv_quant(self, key: str, prefix: str, rest: str, shape: tuple[int, ...]) -> bool:
        """The `range` buffer becomes the layer's scale; the rest of a key/value quantizer's state is observer
        bookkeeping (num_samples, and whatever else a FakeQuantize with EMA observers may carry: we have not
        seen Apple's file), ignored and listed. A *weight* there, or another quantizer, stays an error."""
        for kind, target in KV_SCALE.items():
            base = _KV_QUANT_PREFIX.format(kind)
            if rest == base + "range":
                self._assign(self.weights, prefix + target, key, shape, source_shape=(2,), transform=kv_scale_from_range)
                return True
            if rest == base + "num_samples":
                self.ignored.append(key)  # observer bookkeeping, unused at inference
                return True
            if rest.startswith(f"attention.kv_quantizer.{kind}_quantizer.") and not rest.endswith(_WEIGHT_SUFFIXES):
                self.unknown_buffers.append(key)
                return True
        return False

    def _place_lora(self, key: str, prefix: str, lora: re.Match, shape: tuple[int, ...]) -> None:
        module = LORA_MODULES[lora["module"]]
        if self.rank is None and len(shape) == 2:  # a_transpose [in, r] comes first, b_transpose [r, out]
            self.rank = shape[1] if lora["ab"] == "a" else shape[0]
        suffix = f"lora_{lora['ab']}" + (f".{lora['part']}" if lora["part"] is not None else "")
        expected = _lora_shapes(self.config, module, self.rank or 0)
        if suffix not in expected:
            self.problems.append(f"unknown key {key}")
            return
        self._assign(self.lora, f"{prefix}{module}.{suffix}", key, shape, expected=expected[suffix])

    def _assign(self, into, target, key, shape, *, source_shape=None, transform=None, expected=None) -> None:
        expected = expected if expected is not None else self.shapes.get(target)
        self.attempted.add(target)
        if expected is None:
            self.problems.append(f"unexpected key {key} (no parameter {target} in the inferred config)")
        elif target in into:
            self.problems.append(f"duplicate source for {target}: {into[target].key} and {key}")
        elif shape != (source_shape if source_shape is not None else expected):
            self.problems.append(f"{key}: shape {shape}, expected {source_shape or expected}")
        else:
            into[target] = WeightSource(key, expected, transform)

    def check_complete(self) -> None:
        if self.unknown_buffers and not self.config["kv_quant"]:
            self.problems.append(f"kv_quantizer buffers without `range`, {_listing(self.unknown_buffers)}")
        missing = [_toolkit_name(t, self.draft_layout) for t in self.shapes if t not in self.attempted]
        if missing:
            self.problems.append(f"missing tensors {_listing(missing)}")
        if self.lora:
            lora_missing = [t for t in self._all_lora_targets() if t not in self.attempted]
            if lora_missing:
                self.problems.append(f"incomplete base_adapter LoRA tensors, missing {_listing(lora_missing)}")
        if self.problems:
            head = self.problems[0] if len(self.problems) == 1 else f"{len(self.problems)} problems"
            raise AFMError(f"checkpoint does not match AFMTextV7: {head}" + (
                "" if len(self.problems) == 1 else ": " + "; ".join(self.problems[:5])
                + (" ..." if len(self.problems) > 5 else "")))

    def _all_lora_targets(self) -> list[str]:
        targets = []
        n_reuse = self.config["num_kv_reuse_layers"]
        for i in range(self.config["num_layers"] - n_reuse):
            for module in ("self_attn.qkv_proj", "self_attn.out_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                targets += [f"model.layers.{i}.{module}.{k}" for k in _lora_shapes(self.config, module, 1)]
        for j in range(n_reuse):
            for module in ("self_attn.q_proj", "self_attn.out_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                targets += [f"model.kv_reuse_layers.{j}.{module}.{k}" for k in _lora_shapes(self.config, module, 1)]
        return targets

    def result(self) -> MappedCheckpoint:
        return MappedCheckpoint(self.config, self.weights, self.lora, self.ignored, self.tied_output,
                                self.unknown_buffers)


def _toolkit_name(target: str, draft_layout: bool) -> str:
    """The toolkit key a target comes from (for messages; `.wrapped.` omitted)."""
    m = re.match(r"^model\.(layers|kv_reuse_layers)\.(\d+)\.(.+)$", target)
    if m is None:
        return target.removeprefix("model.")
    reuse = m[1] == "kv_reuse_layers"
    table = {v: k for k, v in (REUSE_LAYER if reuse else REGULAR_LAYER).items()}
    table.update({v: _KV_QUANT_PREFIX.format(k) + "range" for k, v in KV_SCALE.items()})
    segment = "" if draft_layout else f"segment_{int(reuse)}."
    return f"layers.{segment}layer_{m[2]}.{table.get(m[3], m[3])}"


# ---- tied head and convenience ----


def check_tied_output(tensors: Mapping[str, Any], mapped: MappedCheckpoint, chunk_rows: int = 8192) -> None:
    """The dropped `output_transform.weight` must be the embedding: same storage, or equal values."""
    if mapped.tied_output is None:
        return
    emb_key = mapped.weights["model.embedding.weight"].key
    shares = getattr(tensors, "shares_storage", None)
    if shares is not None and shares(emb_key, mapped.tied_output):
        return
    emb, out = _to_numpy(tensors[emb_key], copy=False), _to_numpy(tensors[mapped.tied_output], copy=False)
    for start in range(0, emb.shape[0], chunk_rows):  # row blocks keep the comparison's memory small
        if not np.array_equal(emb[start : start + chunk_rows], out[start : start + chunk_rows]):
            raise AFMError(
                f"{mapped.tied_output} is neither tied to nor equal to {emb_key} (rows from {start} differ); "
                "an untied output head is not supported by the afm7 model"
            )


def toolkit_to_mlx_arrays(
    state_dict: Mapping[str, Any], **options: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, {our name: float array}) for a toolkit state dict held in memory (tests, small models)."""
    mapped = map_toolkit_state_dict(state_dict, **options)
    check_tied_output(state_dict, mapped)
    return mapped.config, {name: mapped.load(name, state_dict) for name in mapped.weights}
