"""Toolkit checkpoints -> MLX model directory: `convert(source, out, **options)`.

Output layout (loads with `afm_mlx.load` and with mlx-lm's afm7 model):

    OUT/config.json                 model_type afm7, ModelArgs fields, kv_quant, mlx-lm `quantization` block
    OUT/model*.safetensors          weights (quantized modules: .weight uint32 + .scales + .biases)
    OUT/tokenizer.model, tokenizer_config.json
    OUT/conversion_report.json      per tensor: storage, bits, group, max abs / relative error, exact
    OUT/draft/                      the draft, itself a model directory (same files), when a draft is given
    OUT/base_adapter/               only if the checkpoint's base_adapter LoRA is non-zero (mlx-lm adapter format)

Everything is written into a temporary sibling of OUT that is renamed at the end (converters/output.py), so a
failed or interrupted (Ctrl-C, SIGTERM, SIGHUP) conversion leaves nothing behind, not even the folders it made
for OUT; a killed one's leftovers are removed by the next conversion to OUT. Tensors are read, quantized and
written one at a time.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import numpy as np

from afm_mlx.errors import AFMError
from afm_mlx.model import ModelArgs, check_config_value

from .mapping import (
    DEFAULT_RMS_NORM_EPS,
    DEFAULT_ROPE_THETA,
    MappedCheckpoint,
    check_tied_output,
    map_toolkit_state_dict,
)
from .output import write_folder
from .quantize import Packed, QuantSetting, quantize_tensor, store_float
from .toolkit_tokenizer import CONFIG_NAME as TOKENIZER_CONFIG_NAME
from .toolkit_tokenizer import TokenizerExtension, check_eot, read_tokenizer_extension
from .toolkit_tokenizer import extend as extend_tokenizer
from .torch_zip import open_checkpoint
from .writer import DEFAULT_SHARD_BYTES, ShardWriter

REPORT_FILE = "conversion_report.json"
LORA_SCALE = 0.5  # alpha 16 / rank 32 (docs/format.md 3.1)
# (setting name, toolkit file name); looked up under TOOLKIT_DIR/assets/ first, then TOOLKIT_DIR/
TOOLKIT_FILES = {"base": "base-model.pt", "draft": "draft-model.pt", "tokenizer": "tokenizer.model"}


# ---- options ----


@dataclass(frozen=True)
class QuantPlan:
    """The requested storage of one model: linears, embedding, per-module overrides (glob -> setting)."""

    linear: QuantSetting = QuantSetting(2, 128)
    embedding: QuantSetting = QuantSetting(4, 32)
    overrides: tuple[tuple[str, QuantSetting], ...] = ()
    recipe: str = "auto"

    def setting_for(self, module: str) -> tuple[QuantSetting, str]:
        """(setting, recipe) for a module path; an override is applied at exactly its setting."""
        for pattern, setting in self.overrides:
            if fnmatch.fnmatchcase(module, pattern):
                return setting, "lossy"
        return (self.embedding if module == "model.embedding" else self.linear), self.recipe


def parse_override(text: str, default_group: int = 64) -> tuple[str, QuantSetting]:
    """`PATTERN=BITS[:GROUP]`, e.g. `model.layers.*.mlp.down_proj=4:64` or `model.embedding=16` (float16)."""
    pattern, sep, value = text.partition("=")
    bits, _, group = value.partition(":")
    if not sep or not pattern or not bits.isdigit() or (group and not group.isdigit()):
        raise AFMError(f"override {text!r}: expected PATTERN=BITS[:GROUP], e.g. 'model.embedding=8:64'")
    return pattern.removesuffix(".weight"), QuantSetting(int(bits), int(group) if group else default_group)


@dataclass
class Sources:
    base: Path
    draft: Path | None = None
    tokenizer: Path | None = None


def resolve_sources(source=None, base=None, draft=None, tokenizer=None) -> Sources:
    """Explicit paths win; otherwise the toolkit layout under `source` (assets/ or top level)."""
    found: dict[str, Path | None] = {"base": None, "draft": None, "tokenizer": None}
    if source is not None:
        root = Path(source)
        if root.is_file():
            found["base"] = root
        elif root.is_dir():
            for key, name in TOOLKIT_FILES.items():
                found[key] = next((p for p in (root / "assets" / name, root / name) if p.is_file()), None)
        else:
            raise AFMError(f"source not found: {root}")
    for key, explicit in (("base", base), ("draft", draft), ("tokenizer", tokenizer)):
        if explicit is not None:
            if not Path(explicit).is_file():
                raise AFMError(f"--{key} file not found: {explicit}")
            found[key] = Path(explicit)
    if found["base"] is None:
        where = f" in {source} (looked for assets/base-model.pt and base-model.pt)" if source else ""
        raise AFMError(f"no base checkpoint{where}; pass TOOLKIT_DIR or --base")
    return Sources(**found)


# ---- one model ----


@dataclass
class ModelResult:
    config: dict[str, Any]
    tensors: list[dict[str, Any]] = field(default_factory=list)  # report rows
    lora: str = "none"
    ignored: list[str] = field(default_factory=list)
    unknown_buffers: list[str] = field(default_factory=list)
    source_bytes: int = 0
    output_bytes: int = 0


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Linear weights and the embedding; norms and kv-quant scalars stay float32."""
    return name.endswith(".weight") and len(shape) == 2 and not name.endswith("norm.weight")


def _report_row(name: str, source: str, shape, packed: Packed) -> dict[str, Any]:
    return {
        "name": name, "source": source, "shape": list(shape), "storage": packed.method,
        "bits": packed.bits, "group_size": packed.group_size, "exact": packed.exact,
        "max_abs_error": packed.max_abs_error, "relative_error": packed.relative_error,
        "bytes": packed.nbytes(), **({"notes": packed.notes} if packed.notes else {}),
    }


def _nbytes(tensor: Any) -> int:
    nbytes = getattr(tensor, "nbytes", None)
    return int(nbytes) if nbytes is not None else int(np.prod(tensor.shape, dtype=np.int64)) * 4


def convert_model(
    checkpoint: Mapping[str, Any],
    out_dir: Path,
    plan: QuantPlan,
    *,
    rope_theta: float = DEFAULT_ROPE_THETA,
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_tensor: Callable[[str, int, int], None] | None = None,
    check_config: Callable[[dict[str, Any]], None] | None = None,
) -> ModelResult:
    """Map, quantize and write one toolkit state dict into `out_dir` (config.json + safetensors + report).

    check_config(config) runs after the (cheap) mapping and before any tensor is converted."""
    mapped = map_toolkit_state_dict(checkpoint, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps)
    ModelArgs.from_dict(mapped.config)  # the inferred config is one the loader accepts, before any tensor work
    if check_config is not None:
        check_config(mapped.config)
    check_tied_output(checkpoint, mapped)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ModelResult(dict(mapped.config), ignored=list(mapped.ignored),
                         unknown_buffers=list(mapped.unknown_buffers))
    writer = ShardWriter(out_dir, shard_bytes)
    total = sum(_nbytes(checkpoint[source.key]) for source in mapped.weights.values())
    try:
        for name, source in mapped.weights.items():
            array = mapped.load(name, checkpoint)
            packed = _store(name, array, plan)
            module = name.removesuffix(".weight")
            for suffix, value in packed.arrays.items():
                writer.add(f"{module}.{suffix}" if packed.quantized else name, value)
            result.tensors.append(_report_row(name, source.key, array.shape, packed))
            size = _nbytes(checkpoint[source.key])
            result.source_bytes += size
            del array, packed
            mx.clear_cache()  # MLX keeps freed buffers for reuse; one tensor's worth is all we need
            if on_tensor is not None:
                on_tensor(name, size, total)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    result.output_bytes = writer.total_bytes
    result.config.update(_quantization_block(result.tensors, plan))
    result.lora = _write_lora_if_nonzero(checkpoint, mapped, out_dir)
    (out_dir / "config.json").write_text(json.dumps(result.config, indent=2) + "\n")
    return result


def _store(name: str, array: np.ndarray, plan: QuantPlan) -> Packed:
    if not _is_quantizable(name, array.shape):
        return store_float(array, 32) if array.ndim else _scalar(array)
    setting, recipe = plan.setting_for(name.removesuffix(".weight"))
    return quantize_tensor(array, setting, recipe)


def _scalar(array: np.ndarray) -> Packed:
    return Packed({"weight": np.asarray(array, dtype=np.float32)}, 32, None, True, "float32")


def _quantization_block(rows: list[dict[str, Any]], plan: QuantPlan) -> dict[str, Any]:
    """mlx-lm's `quantization` (mirrored as `quantization_config`): a default and per-module entries."""
    stored = {r["name"].removesuffix(".weight"): r for r in rows if len(r["shape"]) == 2 and "norm" not in r["name"]}
    quantized = {m: (r["bits"], r["group_size"]) for m, r in stored.items() if r["group_size"] is not None}
    if not quantized:
        return {}
    requested = (plan.linear.bits, plan.linear.group_size)
    if requested not in quantized.values():
        requested = max(set(quantized.values()), key=list(quantized.values()).count)
    block: dict[str, Any] = {"group_size": requested[1], "bits": requested[0], "mode": "affine"}
    for module, r in stored.items():
        setting = quantized.get(module)
        if setting is None:
            block[module] = False
        elif setting != requested:
            block[module] = {"group_size": setting[1], "bits": setting[0]}
    return {"quantization": block, "quantization_config": block}


def _write_lora_if_nonzero(checkpoint, mapped: MappedCheckpoint, out_dir: Path) -> str:
    """The base file's `base_adapter` LoRA is inert when every B is zero (as shipped): then nothing is written."""
    if not mapped.lora:
        return "none"
    b_names = [n for n in mapped.lora if ".lora_b" in n]
    if not any(np.any(mapped.load(n, checkpoint)) for n in b_names):
        return f"{len(mapped.lora)} base_adapter tensors, all B = 0 (inert): not written"
    adapter_dir = out_dir / "base_adapter"
    adapter_dir.mkdir()
    writer = ShardWriter(adapter_dir, prefix="adapters")
    rank = None
    for name in mapped.lora:
        array = mapped.load(name, checkpoint).astype(np.float32)
        rank = rank or (array.shape[1] if ".lora_a" in name else None)
        writer.add(name, array)
    writer.close()
    config = {"fine_tune_type": "lora", "num_layers": mapped.config["num_layers"],
              "lora_parameters": {"rank": rank, "scale": LORA_SCALE, "dropout": 0.0}}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return f"{len(mapped.lora)} base_adapter tensors with non-zero B: written to base_adapter/"


# ---- tokenizer ----


@dataclass
class ToolkitTokenizer:
    """tokenizer.model as the toolkit loads it: extended by a tokenizer-config.json next to it, when there is one."""

    sp: Any  # sentencepiece.SentencePieceProcessor
    path: Path
    config: Path | None = None
    extension: TokenizerExtension | None = None
    base_size: int = 0  # pieces in tokenizer.model itself

    @property
    def added_pieces(self) -> int:
        return self.sp.get_piece_size() - self.base_size


def _load_sentencepiece(tokenizer: Path) -> ToolkitTokenizer:
    """The SentencePiece model (extended as tamm does), its AFM special pieces checked before any weight is
    converted."""
    import sentencepiece as spm

    from afm_mlx.tokenizer import special_token_ids

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tokenizer))
    except (OSError, RuntimeError) as err:
        raise AFMError(f"{tokenizer}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
    loaded = ToolkitTokenizer(sp, tokenizer, base_size=sp.get_piece_size())
    config = tokenizer.parent / TOKENIZER_CONFIG_NAME
    if config.is_file():
        loaded.config, loaded.extension = config, read_tokenizer_extension(config)
        loaded.sp = extend_tokenizer(sp, loaded.extension, str(config))
        check_eot(loaded.sp, loaded.extension, str(config))
    try:
        special_token_ids(loaded.sp)
    except AFMError as err:
        where = f" (after {config.name})" if loaded.config else f" (and no {TOKENIZER_CONFIG_NAME} next to it)"
        raise AFMError(f"{tokenizer}{where}: {err}") from None
    return loaded


def _check_vocab(tok: ToolkitTokenizer | None, label: str) -> Callable[[dict[str, Any]], None]:
    def check(config: dict[str, Any]) -> None:
        if tok is not None and tok.sp.get_piece_size() > config["vocab_size"]:
            raise AFMError(f"{tok.path} has {tok.sp.get_piece_size()} pieces but the {label} model's vocabulary is "
                           f"{config['vocab_size']}: wrong tokenizer or checkpoint")
    return check


def _write_tokenizer(tok: ToolkitTokenizer, out_dir: Path) -> dict[str, int]:
    """tokenizer.model (the toolkit's bytes, or the extended model) and tokenizer_config.json with its special
    ids (and the toolkit's eot_id, when its configuration sets one)."""
    from afm_mlx.tokenizer import special_token_ids, write_tokenizer_config

    if tok.added_pieces:
        (out_dir / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    else:
        shutil.copyfile(tok.path, out_dir / "tokenizer.model")
    write_tokenizer_config(out_dir, tok.sp, eot_id=tok.extension.eot_id if tok.extension else None)
    return special_token_ids(tok.sp).as_dict()


# ---- the whole conversion ----


@dataclass
class ConversionResult:
    out: Path
    base: ModelResult
    draft: ModelResult | None
    special_tokens: dict[str, int] | None
    seconds: float
    report: dict[str, Any]


def convert(
    source: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    base: str | os.PathLike | None = None,
    draft: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
    bits: int = 2,
    group_size: int = 128,
    embedding_bits: int = 4,
    embedding_group_size: int = 32,
    draft_bits: int | None = None,
    draft_group_size: int | None = None,
    draft_embedding_bits: int | None = None,
    draft_embedding_group_size: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    draft_overrides: list[str] | tuple[str, ...] = (),
    recipe: str = "auto",
    rope_theta: float = DEFAULT_ROPE_THETA,
    draft_rope_theta: float | None = None,
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Any = None,
) -> ConversionResult:
    """Convert Apple adapter-toolkit checkpoints into an MLX model directory `out` (see the module docstring).

    source: TOOLKIT_DIR (assets/base-model.pt, draft-model.pt, tokenizer.model; or those files at its top
    level) or a base .pt file; `base`/`draft`/`tokenizer` name files explicitly. bits/group_size: requested
    storage for linear weights (2/3/4/8 affine, 16 = float16, 32 = float32); embedding_*: for the tied
    embedding; draft_*: the same for the draft (default: the base's). overrides: `PATTERN=BITS[:GROUP]` per
    module (glob over names like `model.layers.*.mlp.down_proj`). recipe `auto` stores each weight at the lowest
    bit width / largest group that reproduces it exactly and falls back to the requested setting; `lossy`
    uses the requested setting everywhere. progress: a callable(label, name, nbytes, total) or None.
    """
    if out is None:
        raise AFMError("no output directory given")
    if recipe not in ("auto", "lossy"):
        raise AFMError(f"recipe must be 'auto' or 'lossy', got {recipe!r}")
    for name, value in (("rope_theta", rope_theta), ("rope_theta", draft_rope_theta), ("rms_norm_eps", rms_norm_eps)):
        if value is not None:
            check_config_value(name, value)  # what config.json will say must load again
    sources = resolve_sources(source, base, draft, tokenizer)
    out = Path(out)
    if out.exists() and not force:
        raise AFMError(f"{out} already exists; pass --force to replace it")
    plans = _plans(bits, group_size, embedding_bits, embedding_group_size, overrides, recipe,
                   draft_bits, draft_group_size, draft_embedding_bits, draft_embedding_group_size, draft_overrides)
    start = time.perf_counter()

    def fill(tmp: Path) -> ConversionResult:
        result = _convert_into(tmp, sources, plans, rope_theta, draft_rope_theta, rms_norm_eps, shard_bytes, progress)
        result.seconds = time.perf_counter() - start
        result.report["seconds"] = round(result.seconds, 3)
        (tmp / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")
        return result

    # the existence check holds at the final rename too: of two conversions to one OUT, the second fails
    result = write_folder(out, fill, replace=force, tag="converting")
    result.out = out
    return result


# The draft's fewest bits where its weights lie on no grid (unless --draft-bits says otherwise): Apple's
# draft-model.pt is float, not QAT-trained, and 2-bit would cost acceptance; Apple's own draft export stores
# 4-bit weights (docs/format.md 3.4). A --bits of 4 or more (or float) applies to the draft as given.
DRAFT_MIN_BITS = 4


def _plans(bits, group_size, embedding_bits, embedding_group_size, overrides, recipe,
           draft_bits, draft_group_size, draft_embedding_bits, draft_embedding_group_size, draft_overrides):
    base = QuantPlan(QuantSetting(bits, group_size), QuantSetting(embedding_bits, embedding_group_size),
                     tuple(parse_override(o, group_size) for o in overrides), recipe)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    draft_group = pick(draft_group_size, group_size)
    draft = QuantPlan(
        QuantSetting(pick(draft_bits, max(bits, DRAFT_MIN_BITS)), draft_group),
        QuantSetting(pick(draft_embedding_bits, embedding_bits), pick(draft_embedding_group_size, embedding_group_size)),
        tuple(parse_override(o, draft_group) for o in draft_overrides) or base.overrides,
        recipe,
    )
    return base, draft


def _convert_into(tmp: Path, sources: Sources, plans, rope_theta, draft_rope_theta, rms_norm_eps, shard_bytes,
                  progress) -> ConversionResult:
    models = [("base", sources.base, tmp, plans[0], rope_theta)]
    if sources.draft is not None:
        theta = rope_theta if draft_rope_theta is None else draft_rope_theta
        models.append(("draft", sources.draft, tmp / "draft", plans[1], theta))
    tok = _load_sentencepiece(sources.tokenizer) if sources.tokenizer is not None else None
    results: dict[str, ModelResult] = {}
    for label, path, out_dir, plan, theta in models:
        with open_checkpoint(path) as checkpoint:

            def on_tensor(name, nbytes, total, label=label):
                if progress is not None:
                    progress(label, name, nbytes, total)

            try:
                results[label] = convert_model(
                    checkpoint, out_dir, plan, rope_theta=theta, rms_norm_eps=rms_norm_eps, shard_bytes=shard_bytes,
                    on_tensor=on_tensor, check_config=_check_vocab(tok, label))
            except AFMError as err:
                if path.name in str(err):
                    raise
                raise AFMError(f"{path.name} ({label}): {err}") from None
    base, draft_result = results["base"], results.get("draft")
    if draft_result is not None and draft_result.config["vocab_size"] != base.config["vocab_size"]:
        raise AFMError(f"draft vocabulary {draft_result.config['vocab_size']} != base vocabulary "
                       f"{base.config['vocab_size']}: they cannot share a tokenizer")
    special = None
    if tok is not None:
        special = _write_tokenizer(tok, tmp)
        if draft_result is not None:
            _write_tokenizer(tok, tmp / "draft")
    report = _report(sources, base, draft_result, special, tok)
    if draft_result is not None:
        (tmp / "draft" / REPORT_FILE).write_text(json.dumps(report["draft"], indent=2) + "\n")
    return ConversionResult(tmp, base, draft_result, special, 0.0, report)


def _model_report(path: Path, result: ModelResult) -> dict[str, Any]:
    rows = result.tensors
    return {
        "source": str(path), "config": result.config,
        "source_bytes": result.source_bytes, "output_bytes": result.output_bytes,
        "tensors_exact": sum(r["exact"] for r in rows), "tensors_lossy": sum(not r["exact"] for r in rows),
        "max_abs_error": max((r["max_abs_error"] for r in rows), default=0.0),
        "lora": result.lora, "ignored": result.ignored,
        "ignored_unknown_buffers": result.unknown_buffers,  # kv-quantizer state not in tamm's observer we read
        "tensors": rows,
    }


def _report(sources: Sources, base: ModelResult, draft: ModelResult | None, special,
            tok: ToolkitTokenizer | None) -> dict[str, Any]:
    tokenizer = None
    if special:
        tokenizer = {"source": str(sources.tokenizer), "special_ids": special,
                     "toolkit_config": str(tok.config) if tok.config else None, "added_pieces": tok.added_pieces}
    return {
        "base": _model_report(sources.base, base),
        "draft": _model_report(sources.draft, draft) if draft is not None else None,
        "tokenizer": tokenizer,
    }
