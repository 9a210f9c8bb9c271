"""Load model directories: config.json + model*.safetensors (+ tokenizer.model, + draft/).

The format is mlx-lm's: `config["quantization"]` holds the default `bits`/`group_size` and per-module
overrides (`"model.embedding": {"bits": 4, "group_size": 32}`, or `false` for unquantized); a module is
quantized only when its `.scales` tensor is present, so mixed directories load without per-path entries.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import cpu, kernels
from .dtypes import compute_dtype
from .errors import AFMError
from .jsonfile import read_json
from .model import Model, ModelArgs

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise AFMError(f"model directory not found: {path}")
    if not config_file.is_file():
        raise AFMError(f"{path} is not a model directory: config.json is missing (convert toolkit checkpoints "
                       "with `afm-mlx convert` first)")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise AFMError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    check_quantization(config.get("quantization"), config_file)
    return config


_QUANT_BITS, _QUANT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)


def check_quantization(quantization, where: Path) -> None:
    """mlx-lm's `quantization` block: absent/null, or default bits/group_size plus per-module dicts or false."""
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise AFMError(f"{where}: `quantization` must be an object, got {type(quantization).__name__}")
    _check_setting(quantization, where, "quantization", defaults=True)
    for key, value in quantization.items():
        if isinstance(value, dict):
            _check_setting(value, where, f"quantization.{key}")
        elif key not in ("bits", "group_size") and not isinstance(value, str) and value is not False:
            raise AFMError(f"{where}: quantization.{key} must be an object or false, got {repr(value)[:40]}")


def _check_setting(setting: dict, where: Path, label: str, defaults: bool = False) -> None:
    for key, allowed in (("bits", _QUANT_BITS), ("group_size", _QUANT_GROUPS)):
        value = setting.get(key)
        if (value is None and not defaults) or (value is not None and (type(value) is not int or value not in allowed)):
            raise AFMError(f"{where}: {label}.{key} must be one of {', '.join(map(str, allowed))}, "
                           f"got {repr(value)[:40]}")


def read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise AFMError(f"{path}: no model*.safetensors weight files")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as err:
            raise AFMError(f"{f}: unreadable safetensors file ({err})") from None
    return weights


def apply_quantization(model: nn.Module, quantization: dict | None, weights: dict) -> None:
    """Swap Linear/Embedding modules for quantized ones where the weights are quantized (mlx-lm's rule)."""
    if not quantization:
        return

    def predicate(path: str, module: nn.Module):
        override = quantization.get(path)
        if override is False or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return {"group_size": override["group_size"], "bits": override["bits"], "mode": "affine"}
        return hasattr(module, "to_quantized")

    nn.quantize(model, group_size=quantization.get("group_size", 64), bits=quantization.get("bits", 4),
                class_predicate=predicate)


def tune_for_device(model: nn.Module) -> None:
    """Module classes for the device the model runs on (parameters untouched; before adapters wrap): on the CPU,
    row-parallel large matmuls and fused norms (afm_mlx.cpu); on GPUs, few-row matmuls that read each weight
    byte once where that pays (kernels.SmallBatchQuantizedLinear)."""
    if cpu.on_cpu():
        cpu.tune_for_cpu(model)
    else:
        kernels.use_small_batch_kernels(model)


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast float parameters (weights, norms, quantization scales/biases) to the compute dtype.

    The kv-quant scales stay float32: tamm computes the K/V fake-quant in fp32.
    """
    def cast(path: str, a: mx.array):
        if path.endswith(("quant_key_scale", "quant_value_scale")) or not mx.issubdtype(a.dtype, mx.floating):
            return a
        return a.astype(dtype)

    from mlx.utils import tree_flatten, tree_unflatten
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, cast(k, v)) for k, v in params]))


def build_model(config: dict, weights: dict[str, mx.array], dtype: mx.Dtype | None = None) -> Model:
    args = ModelArgs.from_dict(config)
    model = Model(args)
    apply_quantization(model, config.get("quantization"), weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise AFMError(f"weights do not match the config: {str(err).splitlines()[0]}") from None
    cast_floats(model, dtype or compute_dtype())
    tune_for_device(model)
    mx.eval(model.parameters())
    model.eval()
    return model


def load_model(path: str | Path | None = None, dtype: mx.Dtype | None = None) -> tuple[Model, dict]:
    """(model, config) from a model directory; the embedded demo model when `path` is None."""
    path = Path(path).expanduser() if path is not None else DEMO_MODEL_DIR
    config = read_config(path)
    if "kv_quant" not in config:  # an mlx-lm afm7 directory: kv-quant scales are always present there
        config["kv_quant"] = True
    return build_model(config, read_weights(path), dtype), config


def load(path: str | Path | None = None, draft: str | Path | bool | None = None, adapter: str | Path | None = None,
         dtype: mx.Dtype | None = None):
    """(model, tokenizer) from a converted model directory, or the embedded demo family when `path` is None.

    draft: None (default) attaches the `draft/` directory inside `path` when there is one, as the CLI does;
    True requires it; a path names another draft directory; False loads none. The draft is attached as
    `model.draft` (generation uses it when no `draft_model` is passed).
    adapter: an adapter (toolkit .pt, .fmadapter, or mlx-lm adapter dir) made active on the model.
    """
    from .tokenizer import load_tokenizer

    root = Path(path).expanduser() if path is not None else DEMO_MODEL_DIR
    model, _ = load_model(root, dtype)
    tokenizer = load_tokenizer(root)
    draft_model = None
    if draft is True or (draft is None and (root / "draft" / "config.json").is_file()):
        draft = root / "draft"
    if draft:
        draft_model, _ = load_model(draft, dtype)
        check_draft_compatible(model, draft_model)
    # A plain attribute, not a child module: the draft's weights are not the base's parameters (saving,
    # counting, quantizing or wrapping adapters on the base must not reach into the draft).
    object.__setattr__(model, "draft", draft_model)
    if adapter is not None:
        from .adapters import load_adapter

        load_adapter(model, adapter, activate=True)
    return model, tokenizer


def check_draft_compatible(model: Model, draft: Model) -> None:
    if draft.args.vocab_size != model.args.vocab_size:
        raise AFMError(f"draft vocabulary ({draft.args.vocab_size}) differs from the base's "
                       f"({model.args.vocab_size}): a draft must share the base's tokenizer")
