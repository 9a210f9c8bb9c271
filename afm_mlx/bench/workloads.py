"""Benchmark workloads: the demo family, a converted model directory, the full-size 3B and tiny models with
synthetic on-grid weights, and their prompts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..dtypes import compute_dtype
from ..errors import AFMError
from ..jsonfile import read_json
from ..loading import cast_floats, tune_for_device
from ..model import Model, ModelArgs
from .machine import REPO_ROOT


@dataclass
class Workload:
    name: str
    description: str
    model: Model
    draft: Model | None
    passages: list[list[int]]  # token ids of real (or random) text, each long enough for the longest prompt
    prompt_source: str
    vocab_size: int
    notes: list[str] = field(default_factory=list)
    tokenizer: Any = None  # the real tokenizer where there is one (guided generation needs it)

    def prompt(self, length: int, index: int) -> list[int]:
        """A prompt of exactly `length` ids: a window of passage `index` (cycled), starting at a passage start."""
        passage = self.passages[index % len(self.passages)]
        if len(passage) < length:
            raise AFMError(f"workload {self.name}: passage {index} has {len(passage)} tokens, {length} needed; "
                           "use shorter prompt lengths or longer prompt texts")
        return passage[:length]


def parameter_bytes(model: nn.Module) -> int:
    """Resident bytes of a model's parameters (quantized codes, scales and biases, norms, kv scales)."""
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def parameter_bytes_16bit(model: nn.Module) -> int:
    """Resident bytes if every float parameter were 16-bit (the GPU dtype policy; the CPU keeps float32 scales)."""
    total = 0
    for name, a in tree_flatten(model.parameters()):
        half = mx.issubdtype(a.dtype, mx.floating) and not name.endswith(("quant_key_scale", "quant_value_scale"))
        total += a.size * 2 if half else a.nbytes
    return total


def describe_weights(model: Model) -> dict[str, Any]:
    quantized = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized[f"{module.bits}-bit g{module.group_size}"] = quantized.get(
                f"{module.bits}-bit g{module.group_size}", 0) + 1
    dtypes = sorted({str(a.dtype).replace("mlx.core.", "") for _, a in tree_flatten(model.parameters())})
    return {"config": model.args.to_dict(), "resident_bytes": parameter_bytes(model),
            "quantized_modules": quantized or "none (float weights)", "dtypes": dtypes}


def random_passages(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """Random token ids (for synthetic weights, where text would mean nothing); ids 0-2 (pad/eos/unk) avoided."""
    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)
    return [rng.integers(low, vocab_size, size=length).tolist() for _ in range(count)]


def text_passages(tokenizer, groups: list[list[str]], min_length: int, count: int) -> list[list[int]]:
    """Prompts from real text: `[eos] + ids` of consecutive paragraphs of one group (e.g. one novel), joined until
    min_length tokens; passages never overlap and are taken round-robin over the groups (trial i, i+1 differ)."""
    per_group = []
    for texts in groups:
        passages, current = [], [tokenizer.eos_id]
        for text in texts:
            current += tokenizer.encode(text.strip() + "\n", dummy_prefix=False)
            if len(current) >= min_length:
                passages.append(current)
                current = [tokenizer.eos_id]
        per_group.append(passages)
    ordered = [p for i in range(max(map(len, per_group), default=0)) for g in per_group if i < len(g) for p in [g[i]]]
    if not ordered:
        raise AFMError(f"the prompt texts hold no passage of {min_length} tokens: give longer texts (--prompts)")
    return ordered[:count]


def read_prompt_texts(path: str | Path) -> list[list[str]]:
    """Groups of paragraphs from a .txt file (paragraphs separated by blank lines: one group) or a .json file (a
    list of strings: one group; a dict of lists, e.g. {"held_out": {"emma": [...], ...}}: one group per list)."""
    path = Path(path)
    if not path.is_file():
        raise AFMError(f"prompt file not found: {path}")
    if path.suffix == ".json":
        groups = _groups(read_json(path))
    else:
        groups = [[p.strip() for p in re.split(r"\n\s*\n", _read_text(path)) if p.strip()]]
    groups = [g for g in groups if g]
    if not groups:
        raise AFMError(f"{path}: no prompt texts found")
    return groups


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AFMError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise AFMError(f"{path}: cannot read ({err.strerror or err})") from None


def _groups(data, depth: int = 0) -> list[list[str]]:
    """Lists of strings found in `data`, at most three objects deep (the held-out file's layout is two)."""
    if isinstance(data, dict) and depth < 3:
        for key in ("held_out", "prompts", "texts"):
            if key in data:
                return _groups(data[key], depth + 1)
        return [g for value in data.values() for g in _groups(value, depth + 1)]
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return [data]
    if isinstance(data, list):
        texts = [x.get("text") if isinstance(x, dict) else x for x in data]
        return [[t for t in texts if isinstance(t, str)]]  # numbers, nulls, nested lists: not prompts
    return [[data]] if isinstance(data, str) else []


# Real text the demo family never trained on: the demo build's own held-out file if it writes one, else the
# committed extract of the same split (benchmarks/prompts_held_out.json), else the build's corpus.
HELD_OUT_CANDIDATES = ["benchmarks/prompts_held_out.json", "benchmarks/demo/work/corpus.json",
                       "benchmarks/demo/work/smoke/corpus.json"]


def find_held_out_texts() -> tuple[list[list[str]], str]:
    found = sorted(REPO_ROOT.glob("benchmarks/demo/held_out*"))
    for path in found + [REPO_ROOT / c for c in HELD_OUT_CANDIDATES]:
        if path.is_file():
            return read_prompt_texts(path), str(path.relative_to(REPO_ROOT))
    raise AFMError("no held-out demo text found (benchmarks/prompts_held_out.json); pass --prompts FILE")


def demo_workload(path: str | Path | None = None, prompts: str | Path | None = None, max_length: int = 512,
                  count: int = 12) -> Workload:
    """The embedded demo family (or a converted model directory with draft/), prompts from real held-out text."""
    from ..loading import DEMO_MODEL_DIR, load

    root = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (root / "config.json").is_file():
        raise AFMError(f"model directory not found or incomplete: {root} (the demo model ships in "
                       "afm_mlx/demo_model once built; or pass --model DIR)")
    model, tokenizer = load(root)  # with root/draft when there is one
    groups, source = (read_prompt_texts(prompts), str(prompts)) if prompts else find_held_out_texts()
    passages = text_passages(tokenizer, groups, max_length, count)
    name = "demo" if path is None else root.name
    return Workload(name=name, description=f"{'demo family' if path is None else root}: base + draft, real text",
                    model=model, draft=model.draft, passages=passages, prompt_source=source,
                    vocab_size=tokenizer.vocab_size, tokenizer=tokenizer)


def model_dir_workload(path: str | Path, prompts: str | Path | None = None, max_length: int = 512) -> Workload:
    workload = demo_workload(path, prompts, max_length)
    workload.description = f"model directory {path}" + (" + draft/" if workload.draft is not None else "")
    return workload


# ---- synthetic on-grid weights


def synthetic_model(args: ModelArgs, bits: int | None = 2, group_size: int = 128, embedding_bits: int = 4,
                    embedding_group_size: int = 32, seed: int = 0, dtype: mx.Dtype | None = None) -> Model:
    """A model with random weights that lie exactly on an affine grid (bits=None: random float weights).

    Quantized layers get random codes and random per-group scales/biases directly (no float weight is ever
    materialised, so the 3B base builds in seconds and ~1.2 GB): any affine-quantized weight is "on grid", which
    is what Apple's QAT weights are after conversion. The scale of each group is drawn so the dequantized
    weights fall in +-1/sqrt(fan_in) like a default init; kv-quant scales are 0.03 (int8 grid of unit-RMS K/V).
    """
    dtype = dtype or compute_dtype()
    mx.random.seed(seed)
    model = Model(args)  # lazy random init; replaced below before anything is evaluated
    if bits is not None:
        embedding = {"group_size": embedding_group_size, "bits": embedding_bits, "mode": "affine"}
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: embedding if p == "model.embedding" else isinstance(m, nn.Linear))
    rng = np.random.default_rng(seed)
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            _random_grid(module, rng, dtype)
            mx.eval(module.parameters())  # leaves only: evaluating a parent would build its lazy float init
    cast_floats(model, dtype)  # norms too: a float32 norm weight would turn every activation float32
    _set_kv_scales(model)
    tune_for_device(model)
    mx.eval(model.parameters())
    model.eval()
    return model


def _random_grid(module: nn.Module, rng: np.random.Generator, dtype: mx.Dtype) -> None:
    """Random codes (uint32-packed) and per-group scale/bias so w = s * q + b spans +-u/sqrt(fan_in), u ~ U(.5, 1.5).

    NumPy's generator, not mx.random: it fills the 0.7 GB of 3B codes in about a second on a CPU.
    """
    packed_shape = module.weight.shape
    fan_in = packed_shape[-1] * 32 // module.bits
    module.weight = mx.array(rng.integers(0, 2**32, size=packed_shape, dtype=np.uint32))
    limit = rng.uniform(0.5, 1.5, size=module.scales.shape).astype(np.float32) / math.sqrt(fan_in)
    module.scales = mx.array(2 * limit / (2**module.bits - 1)).astype(dtype)
    module.biases = mx.array(-limit).astype(dtype)


def _set_kv_scales(model: Model) -> None:
    for layer in model.model.layers:
        if "quant_key_scale" in layer.self_attn:
            layer.self_attn.quant_key_scale = mx.array(0.03, dtype=mx.float32)
            layer.self_attn.quant_value_scale = mx.array(0.03, dtype=mx.float32)


def full_workload(seed: int = 0, prompt_length: int = 2048, count: int = 8) -> Workload:
    """The full-size 3B base + 48.8M draft, synthetic on-grid weights: 2-bit g128 linears, 4-bit g32 embeddings."""
    from ..presets import BASE_3B, DRAFT_48M

    base = synthetic_model(BASE_3B, seed=seed)
    draft = synthetic_model(DRAFT_48M, seed=seed + 1)
    return Workload(
        name="full", description="3B base + 48.8M draft (full size), synthetic on-grid weights: 2-bit g128 "
                                 "linears, 4-bit g32 tied embeddings, int8 KV",
        model=base, draft=draft, passages=random_passages(BASE_3B.vocab_size, count, prompt_length, seed),
        prompt_source="random token ids", vocab_size=BASE_3B.vocab_size,
        notes=["Synthetic weights: random 2-bit codes with random per-group scales/biases (exactly on the affine "
               "grid; no float weights exist). Speed and memory only: the draft is unrelated to the base, so "
               "acceptance is ~0 and speculative numbers show the cost of a fully rejected round.",
               "Greedy outputs need not agree between engines, or between speculative and plain decoding, in "
               "16-bit arithmetic: a random model's top logits nearly tie, and a (k + 1)-row verify rounds "
               "differently from a 1-row step (the trained demo family: 100% equal on an H200)."])


def tiny_workload(seed: int = 0, bits: int | None = 4, prompt_length: int = 64, count: int = 4) -> Workload:
    """Tiny random base + draft (the CI smoke run); bits=4 uses g32 (the tiny widths are below 128)."""
    from ..presets import tiny_base, tiny_draft

    base = synthetic_model(tiny_base(), bits=bits, group_size=32, embedding_group_size=32, seed=seed)
    draft = synthetic_model(tiny_draft(), bits=bits, group_size=32, embedding_group_size=32, seed=seed + 1)
    return Workload(name="tiny", description="tiny random base + draft (smoke test)", model=base, draft=draft,
                    passages=random_passages(base.args.vocab_size, count, prompt_length, seed),
                    prompt_source="random token ids", vocab_size=base.args.vocab_size,
                    notes=["Tiny random models: checks the harness, says nothing about speed."])


