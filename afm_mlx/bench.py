"""Benchmarks: afm-mlx and mlx-lm's `afm7` on the same weights, side by side in one run.

    workload = demo_workload()                    # or full_workload(), model_dir_workload(path), tiny_workload()
    results = run_benchmark(workload, default_config(workload.name))
    write_results(results, Path("benchmarks/results") / machine_slug(results["machine"]))

Measurement (both engines are timed the same way, from outside, with `time.perf_counter`):
- TTFT: from the call to the first generated token on the host; prefill tok/s = prompt tokens / TTFT
  (mlx-lm's `prompt_tps` definition). Measured with max_tokens=1 at each prompt length.
- decode tok/s: (generated - 1) / (time of the last token - time of the first), so the prompt is excluded and
  plain and speculative decoding are compared on the same footing. Generation never stops early: the stop ids are
  switched off (afm-mlx gets a tokenizer without stop ids; mlx-lm's generate_step never stops by itself).
- Every setting runs `warmup` untimed runs, then `trials` timed runs over different prompts; the report gives
  medians. Acceptance counts are summed over the trials. Peak memory is `mx.get_peak_memory()` after
  `mx.reset_peak_memory()` before each run (it includes everything resident: the weights, shared by both engines).

mlx-lm side: the same parameter arrays are loaded into `mlx_lm.models.afm7.Model` (identical names, no copy).
Inside the harness only, and said so in the report: `FusedLinear.to_quantized` is patched to accept `mode` (mlx-lm
0.32 lacks it, so quantized afm7 models cannot be built otherwise), a draft without kv-quant scales skips
`fake_8bit_quant` (mlx-lm always fake-quantises, with scale 1.0), and the speculative path gets
`prompt_cache=None` (it splits a given cache at len(model.layers) = 56, not at the 35 caches afm7 makes).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import cpu
from .dtypes import backend_name, compute_dtype
from .errors import AFMError
from .loading import cast_floats, tune_for_device
from .model import Model, ModelArgs

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
GB = 1e9  # decimal, as bandwidth figures are quoted

# ---- the machine

# Memory bandwidth in GB/s, from ../shared/docs/performance-anchors.md section 2a (llama.cpp discussion #4167 and
# Apple's announcements) and NVIDIA's data sheets (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Longer names first.
# Max chips are listed at their 16-core-CPU bandwidth; the binned 14-core variants have less (M3 Max 300, M4 Max 410).
BANDWIDTH_GBPS = [
    ("M2 Ultra", 800.0), ("M4 Max", 546.0), ("M3 Max", 400.0), ("M2 Max", 400.0), ("M1 Max", 400.0),
    ("M4 Pro", 273.0), ("M2 Pro", 200.0), ("M1 Pro", 200.0), ("M3 Pro", 150.0),
    ("M5", 153.0), ("M4", 120.0), ("M3", 100.0), ("M2", 100.0), ("M1", 68.0),
    ("H200", 4800.0), ("H100 80GB HBM3", 3350.0), ("H100 SXM", 3350.0),
]


def memory_bandwidth(device: str) -> float | None:
    """GB/s of a known device name (None: unknown, e.g. any CPU or an H100 PCIe/NVL, whose figures differ)."""
    for name, gbps in BANDWIDTH_GBPS:
        if re.search(rf"\b{re.escape(name)}\b", device):
            return gbps
    return None


def _command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(backend: str | None = None) -> str:
    """A human name for the device MLX runs on: the GPU for CUDA, the chip on macOS, the CPU model otherwise."""
    backend = backend or backend_name()
    info = mx.device_info()
    if backend == "cuda":
        names = _command_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
        return names[0].strip() if names else str(info.get("device_name", "NVIDIA GPU"))
    if platform.system() == "Darwin":
        return _command_output(["sysctl", "-n", "machdep.cpu.brand_string"]) or str(info.get("device_name", "Apple"))
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return str(info.get("device_name", platform.processor() or "CPU"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> dict[str, Any]:
    if not (REPO_ROOT / ".git").exists():
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    commit = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]) or "unknown"
    dirty = bool(_command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]))
    return {"commit": commit, "dirty": dirty}


def machine_info() -> dict[str, Any]:
    backend = backend_name()
    device = device_name(backend)
    bandwidth = memory_bandwidth(device) if backend != "cpu" else None
    return {
        "backend": backend, "device": device, "device_info": {k: str(v) for k, v in mx.device_info().items()},
        "bandwidth_gbps": bandwidth,
        "bandwidth_note": "known device" if bandwidth else "unknown for this device: roofline fractions omitted",
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_streams": cpu.stream_count() if backend == "cpu" else None,  # afm-mlx's matmul split (afm_mlx.cpu)
        "compute_dtype": str(compute_dtype()).replace("mlx.core.", ""),
        "versions": {p: _version(p) for p in ("afm-mlx", "mlx", "mlx-lm", "numpy")},
        "git": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_slug(machine: dict[str, Any]) -> str:
    """`<backend>-<device>` for the results directory, e.g. `cpu-amd-epyc`, `cuda-nvidia-h100-80gb-hbm3`."""
    device = re.sub(r"[^a-z0-9]+", "-", machine["device"].lower()).strip("-")
    return f"{machine['backend']}-{device or 'unknown'}"


# ---- workloads


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
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise AFMError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
        groups = _groups(data)
    else:
        groups = [[p.strip() for p in re.split(r"\n\s*\n", path.read_text()) if p.strip()]]
    groups = [g for g in groups if g]
    if not groups:
        raise AFMError(f"{path}: no prompt texts found")
    return groups


def _groups(data) -> list[list[str]]:
    if isinstance(data, dict):
        for key in ("held_out", "prompts", "texts"):
            if key in data:
                return _groups(data[key])
        return [g for value in data.values() for g in _groups(value)]
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return [data]
    if isinstance(data, list):
        return [[x.get("text", "") if isinstance(x, dict) else str(x) for x in data]]
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
    from .loading import DEMO_MODEL_DIR, load

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
                    vocab_size=tokenizer.vocab_size)


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
    from .presets import BASE_3B, DRAFT_48M

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
    from .presets import tiny_base, tiny_draft

    base = synthetic_model(tiny_base(), bits=bits, group_size=32, embedding_group_size=32, seed=seed)
    draft = synthetic_model(tiny_draft(), bits=bits, group_size=32, embedding_group_size=32, seed=seed + 1)
    return Workload(name="tiny", description="tiny random base + draft (smoke test)", model=base, draft=draft,
                    passages=random_passages(base.args.vocab_size, count, prompt_length, seed),
                    prompt_source="random token ids", vocab_size=base.args.vocab_size,
                    notes=["Tiny random models: checks the harness, says nothing about speed."])


# ---- one generation, timed from outside


@dataclass
class Run:
    """One timed generation. decode_s runs from the first generated token to the last one, on the host."""

    prompt_tokens: int
    tokens: list[int]
    ttft_s: float
    decode_s: float
    peak_memory: int
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    rounds: int = 0
    draft_s: float | None = None
    verify_s: float | None = None

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0


def timed(token_batches: Iterator[list[int]]) -> tuple[list[int], float, float]:
    """(tokens, ttft_s, decode_s) of a generator of token lists (empty lists: no token, e.g. the final stats).

    The generator is exhausted; the clock of the last token stops when that token arrives.
    """
    tokens: list[int] = []
    start = time.perf_counter()
    first = last = start
    for batch in token_batches:
        if not batch:
            continue
        if not tokens:
            first = time.perf_counter()
        tokens += batch
        last = time.perf_counter()
    return tokens, first - start, last - first


class _NoStopTokenizer:
    """What afm_mlx.stream_generate needs from a tokenizer, without stop ids or text: runs of fixed length."""

    stop_ids = frozenset()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def detokenizer(self):
        return self

    def add(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


class AfmEngine:
    """afm-mlx: `afm_mlx.stream_generate` on token ids (int8 KV, explicit reuse/head skipping, rejection sampling)."""

    name = "afm-mlx"

    def __init__(self, model: Model, draft: Model | None, vocab_size: int):
        self.model, self.draft, self.tokenizer = model, draft, _NoStopTokenizer(vocab_size)

    def run(self, prompt: list[int], max_tokens: int, temperature: float, k: int | None, seed: int) -> Run:
        from .generation import stream_generate

        stats: list = []

        def batches():
            for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                            temperature=temperature, seed=seed, num_draft_tokens=k or 1,
                                            draft_model=self.draft if k else False, max_context=1 << 30):
                if response.stats is not None:
                    stats.append(response.stats)
                yield response.tokens

        mx.reset_peak_memory()
        tokens, ttft, decode = timed(batches())
        run = Run(len(prompt), tokens, ttft, decode, mx.get_peak_memory())
        spec = stats[-1].speculative if stats else None
        if spec is not None:
            run.proposed_by_position, run.accepted_by_position = spec.proposed_by_position, spec.accepted_by_position
            run.rounds, run.draft_s, run.verify_s = spec.rounds, spec.draft_s, spec.verify_s
        return run

    def kv_bytes_per_token(self, prompt: list[int], model: Model | None = None) -> float:
        model = model or self.model
        cache = model.make_cache()
        model.prefill(mx.array([prompt]), cache)
        return sum(c.nbytes for c in cache) / cache[0].offset


# ---- mlx-lm's afm7 on the same weights


@contextmanager
def mlx_lm_patches() -> Iterator[None]:
    """The harness-only patches mlx-lm 0.32's afm7 needs (undone on exit):

    - FusedLinear.to_quantized(group_size, bits) lacks `mode`, which nn.quantize passes: accept it (affine only);
    - fake_8bit_quant: a layer whose quant scale is None (a draft without kv-quant) is not quantised.
    """
    from mlx_lm.models import afm7

    original_to_quantized, original_fake_quant = afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **kwargs):
        if mode != "affine":
            raise AFMError(f"mlx-lm's afm7 FusedLinear supports affine quantization only, not {mode}")
        return original_to_quantized(self, group_size, bits)

    def fake_quant(x, scale):
        return x if scale is None else original_fake_quant(x, scale)

    afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant = to_quantized, fake_quant
    try:
        yield
    finally:
        afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant = original_to_quantized, original_fake_quant


def mlx_lm_mirror(model: Model) -> nn.Module:
    """mlx_lm.models.afm7.Model holding the very same parameter arrays as `model` (nothing copied)."""
    from mlx_lm.models import afm7

    theirs = afm7.Model(afm7.ModelArgs.from_dict(model.args.to_dict()))
    ours = dict(model.named_modules())

    def same_quantization(path: str, module: nn.Module):
        mine = ours.get(path)
        if isinstance(mine, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": mine.group_size, "bits": mine.bits, "mode": "affine"}
        return False

    with mlx_lm_patches():
        nn.quantize(theirs, class_predicate=same_quantization)
    if not model.args.kv_quant:
        for layer in theirs.model.layers:
            for name in ("quant_key_scale", "quant_value_scale"):
                layer.self_attn.pop(name)
                setattr(layer.self_attn, name, None)
    theirs.load_weights(tree_flatten(model.parameters()), strict=True)
    theirs.eval()
    return theirs


class MlxLmEngine:
    """mlx-lm 0.32's generate_step / speculative_generate_step on mlx_lm.models.afm7 (exact-match acceptance)."""

    name = "mlx-lm"

    def __init__(self, model: Model, draft: Model | None):
        self.model = mlx_lm_mirror(model)
        self.draft = mlx_lm_mirror(draft) if draft is not None else None

    def run(self, prompt: list[int], max_tokens: int, temperature: float, k: int | None, seed: int) -> Run:
        from mlx_lm.generate import generate_step, speculative_generate_step
        from mlx_lm.sample_utils import make_sampler

        mx.random.seed(seed)
        ids, sampler, flags = mx.array(prompt, dtype=mx.uint32), make_sampler(temp=temperature), []
        with mlx_lm_patches():
            if k:
                # prompt_cache=None: given a cache, mlx-lm splits it at len(model.layers) (56), not 35 (bug 2).
                steps = speculative_generate_step(ids, self.model, self.draft, num_draft_tokens=k,
                                                  max_tokens=max_tokens, sampler=sampler, prompt_cache=None)
            else:
                steps = generate_step(ids, self.model, max_tokens=max_tokens, sampler=sampler)

            def batches():
                for step in steps:
                    flags.append(bool(step[2]) if k else False)
                    yield [int(step[0])]

            mx.reset_peak_memory()
            tokens, ttft, decode = timed(batches())
            peak = mx.get_peak_memory()
        run = Run(len(prompt), tokens, ttft, decode, peak)
        if k:
            run.proposed_by_position, run.accepted_by_position, run.rounds = rounds_from_flags(flags, k, max_tokens)
        return run

    def kv_bytes_per_token(self, prompt: list[int], model: nn.Module | None = None) -> float:
        from mlx_lm.models.cache import make_prompt_cache

        model = model or self.model
        cache = make_prompt_cache(model)
        with mlx_lm_patches():
            mx.eval(model(mx.array([prompt]), cache=cache))
        return sum(a.nbytes for c in cache for a in c.keys_and_values()) / cache[0].offset


def rounds_from_flags(from_draft: list[bool], k: int, max_tokens: int) -> tuple[list[int], list[int], int]:
    """(proposed, accepted) per draft position and the round count, from mlx-lm's per-token `from_draft` flags.

    Every token mlx-lm's speculative loop yields belongs to a round: its accepted drafts (True), then the target's
    token (False). A round proposes min(k, tokens still allowed); the last round may end at max_tokens before its
    target token.
    """
    proposed, accepted = [0] * k, [0] * k
    rounds = emitted = run = 0

    def close_round():
        nonlocal rounds
        for i in range(min(k, max_tokens - emitted)):
            proposed[i] += 1
            accepted[i] += i < run
        rounds += 1

    for flag in from_draft:
        if flag:
            run += 1
            continue
        close_round()
        emitted, run = emitted + run + 1, 0
    if run:
        close_round()
    return proposed, accepted, rounds


# ---- the suite


@dataclass
class BenchConfig:
    prompt_lengths: list[int]  # prefill / TTFT, one setting each
    decode_prompt_length: int
    max_tokens: int  # generated tokens per decode run
    ks: list[int]  # draft lengths for speculative decoding
    temperatures: list[float]
    trials: int = 3
    warmup: int = 1  # untimed runs before each setting
    warmup_tokens: int = 8  # tokens a warm-up run generates
    warmup_prompt_length: int | None = None  # None: the setting's own prompt length (same shapes as measured)
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    adapter: bool = True  # afm-mlx decode with a random runtime LoRA adapter vs without
    adapter_rank: int = 32
    seed: int = 0
    time_budget_s: float | None = None  # settings that would end past it are skipped (and listed): Budget

    def validate(self) -> None:
        checks = [
            (min(self.prompt_lengths + [self.decode_prompt_length]) >= 2, "prompt lengths must be >= 2"),
            (self.max_tokens >= 2, "max_tokens must be >= 2 (decode speed needs two tokens)"),
            (all(1 <= k <= 16 for k in self.ks), "draft lengths k must be in 1..16"),
            (all(t >= 0 for t in self.temperatures) and self.temperatures, "temperatures must be >= 0"),
            (self.trials >= 1 and self.warmup >= 0 and self.warmup_tokens >= 1, "trials >= 1, warmup >= 0"),
            (self.time_budget_s is None or self.time_budget_s > 0, "the time budget must be > 0 seconds"),
            (set(self.engines) <= set(ENGINES) and self.engines, f"engines must be among {', '.join(ENGINES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise AFMError(f"invalid benchmark settings: {message}")


ENGINES = ("afm-mlx", "mlx-lm")


def default_config(workload: str, backend: str | None = None) -> BenchConfig:
    """Settings sized for the workload and backend (the 3B base decodes at ~2-6 s/token on a 2-core CPU)."""
    gpu = (backend or backend_name()) != "cpu"
    if workload == "tiny":
        return BenchConfig([8, 16], 16, 12, [1, 2], [0.0], trials=1, warmup=1, warmup_tokens=2, adapter_rank=4)
    if workload == "full" and not gpu:
        # ~2.5-3 s per token and per prompt token on 2 shared cores: short prompts, 4 tokens, and warm-ups of one
        # token after a 2-token prompt (the CPU backend compiles nothing per shape; the first run pays allocation).
        return BenchConfig([4], 2, 4, [2], [0.0], trials=2, warmup=1, warmup_tokens=1, warmup_prompt_length=2)
    if workload == "full":
        return BenchConfig([128, 1024], 128, 64, [2, 3, 4], [0.0], trials=3, warmup=1, warmup_tokens=4)
    return BenchConfig([32, 128, 512], 128, 128, list(range(1, 9)), [0.0, 0.7], trials=5,
                       adapter_rank=8)


def make_engines(workload: Workload, names: list[str]) -> list:
    factories = {"afm-mlx": lambda: AfmEngine(workload.model, workload.draft, workload.vocab_size),
                 "mlx-lm": lambda: MlxLmEngine(workload.model, workload.draft)}
    return [factories[n]() for n in names]


Tick = Callable[[str], None]


def measure(engines: list, workload: Workload, config: BenchConfig, tick: Tick, *, prompt_length: int,
            max_tokens: int, temperature: float, k: int | None) -> dict[str, list[Run]]:
    """Warm-up runs, then the trials with the engines interleaved (a shared, noisy machine drifts over time)."""
    warmup_length = min(prompt_length, config.warmup_prompt_length or prompt_length)
    for engine in engines:
        for w in range(config.warmup):
            engine.run(workload.prompt(warmup_length, w), min(max_tokens, config.warmup_tokens), temperature, k,
                       config.seed)
            tick(engine.name)
    runs: dict[str, list[Run]] = {e.name: [] for e in engines}
    for trial in range(config.trials):
        for engine in engines:
            prompt = workload.prompt(prompt_length, trial)
            runs[engine.name].append(engine.run(prompt, max_tokens, temperature, k, config.seed + trial))
            tick(engine.name)
    return runs


def count_runs(config: BenchConfig, has_draft: bool, engines: int) -> int:
    per_setting = (config.warmup + config.trials) * engines
    settings = len(config.prompt_lengths) + len(config.temperatures) * (1 + (len(config.ks) if has_draft else 0))
    adapter = 2 * (config.warmup + config.trials) if config.adapter and "afm-mlx" in config.engines else 0
    return settings * per_setting + adapter


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def prefill_summary(runs: list[Run]) -> dict[str, Any]:
    length = runs[0].prompt_tokens
    return {"prompt_tokens": length, "ttft_s": _median([r.ttft_s for r in runs]),
            "prefill_tps": _median([length / r.ttft_s for r in runs if r.ttft_s > 0]),
            "ttft_s_trials": [r.ttft_s for r in runs]}


def decode_summary(runs: list[Run]) -> dict[str, Any]:
    return {"prompt_tokens": runs[0].prompt_tokens, "generated": len(runs[0].tokens),
            "tps": _median([r.decode_tps for r in runs]), "tps_trials": [r.decode_tps for r in runs],
            "ttft_s": _median([r.ttft_s for r in runs]), "peak_memory_bytes": max(r.peak_memory for r in runs)}


def speculative_summary(runs: list[Run], k: int, plain: dict[str, Any], plain_runs: list[Run] | None) -> dict:
    proposed = np.sum([r.proposed_by_position[:k] + [0] * (k - len(r.proposed_by_position)) for r in runs], axis=0)
    accepted = np.sum([r.accepted_by_position[:k] + [0] * (k - len(r.accepted_by_position)) for r in runs], axis=0)
    rounds = sum(r.rounds for r in runs)
    tps = _median([r.decode_tps for r in runs])
    summary = {
        "k": k, "tps": tps, "tps_trials": [r.decode_tps for r in runs],
        "speedup": tps / plain["tps"] if plain["tps"] else 0.0,
        "acceptance": float(accepted.sum() / proposed.sum()) if proposed.sum() else 0.0,
        "acceptance_by_position": [float(a / p) if p else 0.0 for a, p in zip(accepted, proposed)],
        "proposed": int(proposed.sum()), "accepted": int(accepted.sum()), "rounds": rounds,
        "tokens_per_step": sum(len(r.tokens) for r in runs) / rounds if rounds else 0.0,
        "peak_memory_bytes": max(r.peak_memory for r in runs),
    }
    if runs[0].draft_s is not None:
        summary["draft_s"] = sum(r.draft_s for r in runs)
        summary["verify_s"] = sum(r.verify_s for r in runs)
    if plain_runs is not None:  # greedy: speculative output must equal plain greedy output
        summary["greedy_matches_plain"] = sum(r.tokens == p.tokens for r, p in zip(runs, plain_runs)) / len(runs)
    return summary


def temperature_key(t: float) -> str:
    return f"T={t:g}"


class Budget:
    """A wall-clock budget for a whole benchmark: settings that would end after it are skipped, and listed.

    A setting is expected to take as long as the last one timed with `timed` (a fresh GPU machine spends much
    of its first settings compiling kernels, so a deadline checked only at the start of each was overrun).
    """

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.skipped: list[str] = []
        self.last_s = 0.0

    def allows(self, setting: str) -> bool:
        if self.deadline is not None and time.perf_counter() + self.last_s > self.deadline:
            self.skipped.append(setting)
            return False
        return True

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.last_s = time.perf_counter() - start


def bench_speeds(engines: list, workload: Workload, config: BenchConfig, tick: Tick,
                 budget: Budget) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prefill, plain and speculative decode for every engine; returns {engine: {...}} plus plain-run agreement.

    Prefill and plain decode always run (every later number is relative to them); speculative settings only
    while the budget lasts.
    """
    out: dict[str, Any] = {e.name: {"prefill": [], "decode": {}, "speculative": {}} for e in engines}
    agreement = {}
    for length in config.prompt_lengths:
        runs = measure(engines, workload, config, tick, prompt_length=length, max_tokens=1, temperature=0.0, k=None)
        for name, r in runs.items():
            out[name]["prefill"].append(prefill_summary(r))
    for t in config.temperatures:
        key = temperature_key(t)
        with budget.timed():  # the first estimate of a speculative setting's cost
            plain = measure(engines, workload, config, tick, prompt_length=config.decode_prompt_length,
                            max_tokens=config.max_tokens, temperature=t, k=None)
        for name, r in plain.items():
            out[name]["decode"][key] = decode_summary(r)
            out[name]["speculative"][key] = []
        if t == 0.0 and len(engines) == 2:
            agreement = token_agreement(*plain.values())
        for k in config.ks if workload.draft is not None else []:
            if not budget.allows(f"speculative {key} k={k}"):
                continue
            with budget.timed():
                spec = measure(engines, workload, config, tick, prompt_length=config.decode_prompt_length,
                               max_tokens=config.max_tokens, temperature=t, k=k)
            for name, r in spec.items():
                out[name]["speculative"][key].append(
                    speculative_summary(r, k, out[name]["decode"][key], plain[name] if t == 0.0 else None))
    return out, agreement


def token_agreement(a: list[Run], b: list[Run]) -> dict[str, Any]:
    """How far two engines' greedy outputs agree on the same prompts (fp32: should be all of it)."""
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x.tokens), len(y.tokens)) and x.tokens[n] == y.tokens[n]:
            n += 1
        prefixes.append(n)
    generated = len(a[0].tokens)
    return {"identical_runs": sum(p == generated for p in prefixes), "runs": len(prefixes),
            "common_prefix_tokens": prefixes, "generated": generated}


# ---- adapter, memory, bytes and goals


def random_adapter(args: ModelArgs, rank: int, seed: int):
    """A full runtime-LoRA adapter (every projection the toolkit adapts) with random A and B, scale 0.5."""
    from .converters.adapter_formats import AdapterWeights, lora_layout

    rng = np.random.default_rng(seed)
    tensors = {s.name: rng.normal(0.0, 0.02, size=s.shape).astype(np.float32) for s in lora_layout(args, rank)}
    return AdapterWeights(tensors, rank, 0.5, "memory", source="random adapter (benchmark)")


def bench_adapter(engine: AfmEngine, workload: Workload, config: BenchConfig, tick: Tick) -> dict[str, Any]:
    """afm-mlx plain greedy decode with a random rank-r adapter active vs none, interleaved trial by trial."""
    try:
        from .adapters import add_adapter, set_active_adapter, unload_adapter
    except ImportError as err:
        return {"status": "n/a", "reason": f"afm_mlx.adapters is not available ({err})"}
    model, rank = workload.model, config.adapter_rank
    adapter = random_adapter(model.args, rank, config.seed)
    name = add_adapter(model, adapter, "bench-random-adapter")
    runs: dict[str, list[Run]] = {"without": [], "with": []}
    try:
        for trial in range(-config.warmup, config.trials):
            for state in ("without", "with"):
                set_active_adapter(model, name if state == "with" else None)
                warm = trial < 0
                length = min(config.decode_prompt_length, config.warmup_prompt_length or config.decode_prompt_length)
                prompt = workload.prompt(length if warm else config.decode_prompt_length, max(trial, 0))
                tokens = min(config.max_tokens, config.warmup_tokens) if warm else config.max_tokens
                run = engine.run(prompt, tokens, 0.0, None, config.seed)
                tick(f"{engine.name} adapter")
                if trial >= 0:
                    runs[state].append(run)
    finally:
        set_active_adapter(model, None)
        unload_adapter(model, name)
    without, with_ = ([r.decode_tps for r in runs[s]] for s in ("without", "with"))
    return {"status": "measured", "rank": rank, "adapter_parameters": adapter.num_parameters,
            "tps_without": _median(without), "tps_with": _median(with_),
            "slowdown": 1 - (paired_ratio(with_, without) or 1.0),  # trials interleaved, as between engines
            "note": "random weights, every projection adapted (Q/K/V, out, gate, up, down; q/out in reuse layers)"}


def decode_bytes(weight_bytes: int, kv_bytes_per_token: float, args: ModelArgs, context: float) -> dict[str, float]:
    """Bytes one plain decode step must read: every weight (the tied head reads the whole embedding) and the K/V
    history at the mean context, once per regular layer plus once per KV-reuse layer (they all read the last one).
    """
    per_layer = kv_bytes_per_token / args.num_regular_layers
    kv_read = context * per_layer * (args.num_regular_layers + args.num_kv_reuse_layers)
    return {"weights": weight_bytes, "kv": kv_read, "total": weight_bytes + kv_read, "context": context}


def add_roofline(engines: dict[str, Any], workload: Workload, config: BenchConfig, bandwidth: float | None) -> None:
    context = config.decode_prompt_length + config.max_tokens / 2
    weights = parameter_bytes(workload.model)
    for name, result in engines.items():
        moved = decode_bytes(weights, result["kv_bytes_per_token"], workload.model.args, context)
        for decode in result["decode"].values():
            decode["bytes_per_token"] = moved
            decode["achieved_gbps"] = decode["tps"] * moved["total"] / GB
            decode["roofline_fraction"] = decode["achieved_gbps"] / bandwidth if bandwidth else None


def memory_summary(workload: Workload, engines: dict[str, Any]) -> dict[str, Any]:
    models = [m for m in (workload.model, workload.draft) if m is not None]
    weights, weights_16 = sum(map(parameter_bytes, models)), sum(map(parameter_bytes_16bit, models))
    out = {"base_weight_bytes": parameter_bytes(workload.model),
           "draft_weight_bytes": parameter_bytes(workload.draft) if workload.draft is not None else 0,
           "weights_16bit_scales_bytes": weights_16, "weights_shared_between_engines": True}
    for name, result in engines.items():
        kv = 4096 * (result["kv_bytes_per_token"] + result.get("draft_kv_bytes_per_token", 0.0))
        out[f"{name}: weights + 4k-token KV bytes"] = weights + kv
        out[f"{name}: weights (16-bit scales) + 4k-token KV bytes"] = weights_16 + kv
    return out


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: not measurable here)."""
    engines, gpu, out = results["engines"], results["machine"]["backend"] != "cpu", []
    ours, theirs = engines.get("afm-mlx"), engines.get("mlx-lm")
    if ours and theirs:
        for key, ratio in results["ratios"]["decode_tps"].items():
            ratio = ratio or 0.0
            out.append({"goal": f"plain decode >= 1.1x mlx-lm ({key})", "value": ratio, "met": ratio >= 1.1})
    spec = (ours or {}).get("speculative", {}).get("T=0", [])
    if spec and results["workload"]["name"] != "full":
        best = max(spec, key=lambda s: s["speedup"])
        out.append({"goal": "speculative speedup >= 2x over plain on a GPU (T=0)", "value": best["speedup"],
                    "k": best["k"], "met": best["speedup"] >= 2 if gpu else None,
                    "note": None if gpu else "CPU backend: verifying k+1 tokens costs ~(k+1)x one token here"})
    if results["workload"]["name"] == "full" and ours:
        for label in ("weights", "weights (16-bit scales)"):
            total = results["memory"][f"afm-mlx: {label} + 4k-token KV bytes"]
            goal = f"3B base + draft + 4k-token KV as cached (int8; values on CUDA) <= 1.2 GB ({label}, arrays)"
            out.append({"goal": goal, "value": total / GB, "met": total <= 1.2 * GB})
    adapter = (ours or {}).get("adapter", {})
    if adapter.get("status") == "measured":
        out.append({"goal": "decode with an adapter <= 15% slower", "value": adapter["slowdown"],
                    "met": adapter["slowdown"] <= 0.15})
    return out


def paired_ratio(ours: list[float], theirs: list[float]) -> float | None:
    """Median over trials of ours[i] / theirs[i]: trial i of both engines ran back to back, so a slow spell of
    the shared machine divides out of each pair instead of landing on one engine's median."""
    pairs = [a / b for a, b in zip(ours, theirs) if b]
    return _median(pairs) if pairs else None


def ratios(engines: dict[str, Any]) -> dict[str, Any]:
    """afm-mlx / mlx-lm for every speed both measured (paired_ratio of the interleaved trials)."""
    ours, theirs = engines.get("afm-mlx"), engines.get("mlx-lm")
    if not (ours and theirs):
        return {}
    prefill = {p["prompt_tokens"]: paired_ratio(q["ttft_s_trials"], p["ttft_s_trials"])  # tok/s ratio = TTFT ratio
               for p, q in zip(ours["prefill"], theirs["prefill"])}
    out = {"prefill_tps": prefill,
           "decode_tps": {k: paired_ratio(v["tps_trials"], theirs["decode"][k]["tps_trials"])
                          for k, v in ours["decode"].items()},
           "speculative_tps": {}}
    for key, specs in ours["speculative"].items():
        pairs = zip(specs, theirs["speculative"][key])
        out["speculative_tps"][key] = {s["k"]: paired_ratio(s["tps_trials"], t["tps_trials"]) for s, t in pairs}
    return out


def harness_notes(workload: Workload, config: BenchConfig) -> list[str]:
    notes = list(workload.notes)
    if "mlx-lm" in config.engines:
        notes.append("mlx-lm side: the same parameter arrays loaded into mlx_lm.models.afm7.Model; inside the harness "
                     "FusedLinear.to_quantized is patched to accept `mode` (mlx-lm 0.32 cannot build a quantized "
                     "afm7 otherwise), and its speculative path runs with prompt_cache=None (it splits a given "
                     "cache at len(model.layers) = all layers instead of the regular ones).")
        if workload.draft is not None and not workload.draft.args.kv_quant:
            notes.append("The draft has no kv-quant scales; mlx-lm's afm7 would fake-quantise its K/V with scale "
                         "1.0, so the harness skips fake_8bit_quant for that draft (as afm-mlx does).")
        notes.append("mlx-lm accepts a draft token only when the target's own sample equals it (exact match); "
                     "afm-mlx uses rejection sampling, so at T > 0 its acceptance is higher by design.")
    if backend_name() == "cpu":
        notes.append(f"CPU backend, {os.cpu_count()} cores shared with other jobs: absolute numbers are noisy "
                     "and low; the engines' trials are interleaved so ratios are fairer than absolutes.")
    return notes


def run_benchmark(workload: Workload, config: BenchConfig, progress: Tick | None = None) -> dict[str, Any]:
    """Every metric for every engine on one workload; a JSON-ready dict (see write_results)."""
    config.validate()
    tick = progress or (lambda _: None)
    machine = machine_info()
    budget = Budget(config.time_budget_s)
    engines = make_engines(workload, config.engines)
    speeds, agreement = bench_speeds(engines, workload, config, tick, budget)
    kv_prompt = workload.prompt(min(config.prompt_lengths + [config.decode_prompt_length]), 0)
    for engine in engines:
        speeds[engine.name]["kv_bytes_per_token"] = engine.kv_bytes_per_token(kv_prompt)
        if workload.draft is not None:
            speeds[engine.name]["draft_kv_bytes_per_token"] = engine.kv_bytes_per_token(
                kv_prompt, engine.draft if engine.name == "mlx-lm" else workload.draft)
        if engine.name == "afm-mlx" and not config.adapter:
            speeds[engine.name]["adapter"] = {"status": "n/a", "reason": "switched off (--no-adapter)"}
        elif engine.name == "afm-mlx":
            speeds[engine.name]["adapter"] = bench_adapter(engine, workload, config, tick) if \
                budget.allows("adapter") else {"status": "n/a", "reason": "skipped: time budget spent"}
        else:
            speeds[engine.name]["adapter"] = {"status": "n/a", "reason": "not run: the harness compares mlx-lm's "
                                              "afm7 without LoRA (its adapters fuse or wrap via tuner.lora)"}
    add_roofline(speeds, workload, config, machine["bandwidth_gbps"])
    results = {
        "schema": SCHEMA_VERSION, "machine": machine,
        "workload": {"name": workload.name, "description": workload.description,
                     "prompt_source": workload.prompt_source, "base": describe_weights(workload.model),
                     "draft": describe_weights(workload.draft) if workload.draft is not None else None},
        "config": asdict(config), "engines": speeds, "agreement_greedy": agreement,
        "memory": memory_summary(workload, speeds), "ratios": ratios(speeds),
        "notes": harness_notes(workload, config), "skipped": budget.skipped,
    }
    results["goals"] = goals(results)
    return results


# ---- reports


def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 1 else f"{x:.{digits + 2}f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _size(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GB:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,.0f} B"


def _machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    git = m["git"]
    commit = git["commit"][:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    bandwidth = f"{m['bandwidth_gbps']:,.0f} GB/s" if m["bandwidth_gbps"] else "bandwidth unknown"
    v = m["versions"]
    streams = f", afm-mlx matmuls over {m['cpu_streams']} CPU stream(s)" if m.get("cpu_streams") else ""
    return (f"{m['backend']} backend on {m['device']} ({bandwidth}, {m['cpu_count']} CPU cores{streams}, "
            f"{m['compute_dtype']}); mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, afm-mlx {v['afm-mlx']}, "
            f"commit {commit}, {m['date']}")


def side_by_side_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    e, r = results["engines"], results["ratios"]
    names = list(e)
    cell = lambda name, f: f(e[name]) if name in e else "n/a"  # noqa: E731
    rows = []
    for i, p in enumerate(e[names[0]]["prefill"]):
        label = f"prefill tok/s, {p['prompt_tokens']}-token prompt (TTFT)"
        def fmt(x, i=i):
            return f"{_num(x['prefill'][i]['prefill_tps'])} ({x['prefill'][i]['ttft_s'] * 1e3:,.1f} ms)"
        rows.append((label, cell("afm-mlx", fmt), cell("mlx-lm", fmt),
                     _ratio(r.get("prefill_tps", {}).get(p["prompt_tokens"]))))
    for key in e[names[0]]["decode"]:
        fmt = lambda x, key=key: _num(x["decode"][key]["tps"])  # noqa: E731
        rows.append((f"plain decode tok/s, {key}", cell("afm-mlx", fmt), cell("mlx-lm", fmt),
                     _ratio(r.get("decode_tps", {}).get(key))))
        if e[names[0]]["speculative"].get(key):
            def best(x, key=key):
                s = max(x["speculative"][key], key=lambda s: s["tps"])
                return f"{_num(s['tps'])} (k={s['k']}, {s['speedup']:.2f}x, accept {s['acceptance']:.0%})"
            rows.append((f"best speculative tok/s, {key}", cell("afm-mlx", best), cell("mlx-lm", best), ""))
    first = next(iter(e[names[0]]["decode"]))
    rows += [
        ("peak memory, plain decode", *(cell(n, lambda x: _size(x["decode"][first]["peak_memory_bytes"]))
                                        for n in ENGINES), ""),
        ("KV cache bytes / token (base)", *(cell(n, lambda x: f"{x['kv_bytes_per_token']:,.0f}") for n in ENGINES),
         _ratio(e["afm-mlx"]["kv_bytes_per_token"] / e["mlx-lm"]["kv_bytes_per_token"])
         if len(e) == 2 else ""),
        ("bytes read / decoded token", *(cell(n, lambda x: _size(x["decode"][first]["bytes_per_token"]["total"]))
                                         for n in ENGINES), ""),
        ("achieved GB/s (fraction of roofline)", *(cell(n, lambda x: _roofline(x["decode"][first])) for n in ENGINES),
         ""),
        ("decode with adapter vs none", *(cell(n, _adapter_cell) for n in ENGINES), ""),
    ]
    return rows


def _roofline(decode: dict[str, Any]) -> str:
    fraction = decode.get("roofline_fraction")
    return f"{decode['achieved_gbps']:.2f}" + (f" ({fraction:.0%})" if fraction is not None else "")


def _adapter_cell(x: dict[str, Any]) -> str:
    a = x.get("adapter", {})
    if a.get("status") != "measured":
        return "n/a"
    return f"{_num(a['tps_with'])} vs {_num(a['tps_without'])} tok/s (rank {a['rank']}, {-a['slowdown']:+.0%})"


def speculative_rows(results: dict[str, Any], key: str) -> list[list[str]]:
    e = results["engines"]
    ours, theirs = e.get("afm-mlx", {}).get("speculative", {}).get(key, []), \
        e.get("mlx-lm", {}).get("speculative", {}).get(key, [])
    rows = []
    for i, s in enumerate(ours or theirs):
        row = [str(s["k"])]
        for spec in (ours, theirs):
            x = spec[i] if i < len(spec) else None
            row += [_num(x["tps"]), f"{x['speedup']:.2f}x", f"{x['acceptance']:.0%}", f"{x['tokens_per_step']:.2f}"] \
                if x else ["n/a"] * 4
        row.append(_ratio(results["ratios"].get("speculative_tps", {}).get(key, {}).get(s["k"])))
        rows.append(row)
    return rows


def _table(header: list[str], rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def results_markdown(results: dict[str, Any]) -> str:
    w = results["workload"]
    lines = [f"## {w['name']}: {w['description']}", "", _machine_line(results), "",
             f"Prompts: {w['prompt_source']}. Settings: {_settings_line(results['config'])}.", ""]
    lines += _table(["metric", "afm-mlx", "mlx-lm", "afm-mlx / mlx-lm"], side_by_side_rows(results))
    for key in results["engines"][next(iter(results["engines"]))]["speculative"]:
        rows = speculative_rows(results, key)
        if rows:
            lines += ["", f"Speculative decoding, {key} (speedup over the same engine's plain decode; tokens/step = "
                          "tokens per verify forward):", ""]
            lines += _table(["k", "afm-mlx tok/s", "speedup", "acceptance", "tokens/step",
                             "mlx-lm tok/s", "speedup", "acceptance", "tokens/step", "afm-mlx / mlx-lm"], rows)
    lines += _position_table(results) + _goal_lines(results) + _memory_lines(results) + _agreement_lines(results)
    lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    if results.get("skipped"):
        lines.append(f"- Time budget ({results['config']['time_budget_s']:g} s) spent; not measured: "
                     f"{', '.join(results['skipped'])}.")
    return "\n".join(lines) + "\n"


def _settings_line(c: dict[str, Any]) -> str:
    return (f"prefill at {', '.join(map(str, c['prompt_lengths']))} tokens; decode {c['max_tokens']} tokens after "
            f"{c['decode_prompt_length']}; k in {c['ks']}; T in {c['temperatures']}; {c['trials']} trial(s) "
            f"(medians) after {c['warmup']} warm-up run(s) per setting, the engines' trials interleaved; "
            "afm-mlx / mlx-lm is the median of the per-trial ratios")


def _position_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, result in results["engines"].items():
        for key, specs in result["speculative"].items():
            if not specs:
                continue
            width = max(s["k"] for s in specs)
            rows = [[s["k"]] + [f"{a:.2f}" for a in s["acceptance_by_position"]] + [""] * (width - s["k"])
                    for s in specs]
            lines += ["", f"Acceptance by draft position, {name}, {key} (share of rounds whose i-th draft token was "
                          "accepted; it needs every earlier one accepted too):", ""]
            lines += _table(["k"] + [f"pos {i + 1}" for i in range(width)], rows)
    return lines


def _goal_lines(results: dict[str, Any]) -> list[str]:
    if not results["goals"]:
        return []
    mark = {True: "met", False: "not met", None: "n/a here"}
    rows = [[g["goal"], f"{g['value']:.3f}" + (f" (k={g['k']})" if "k" in g else ""), mark[g["met"]]
             + (f": {g['note']}" if g.get("note") else "")] for g in results["goals"]]
    return ["", "Goals:", ""] + _table(["goal", "measured", "status"], rows)


def _memory_lines(results: dict[str, Any]) -> list[str]:
    m = results["memory"]
    items = [f"base weights {_size(m['base_weight_bytes'])}", f"draft weights {_size(m['draft_weight_bytes'])}"]
    items.append(f"all weights with 16-bit scales/biases (the GPU dtype) {_size(m['weights_16bit_scales_bytes'])}")
    items += [f"{k} {_size(v)}" for k, v in m.items() if k.endswith("KV bytes")]
    return ["", "Memory (resident arrays): " + "; ".join(items) + "."]


def _agreement_lines(results: dict[str, Any]) -> list[str]:
    """Sanity checks: both engines compute the same greedy tokens; speculative greedy equals plain greedy."""
    lines = []
    a = results.get("agreement_greedy")
    if a:
        lines.append(f"Same weights, same tokens: afm-mlx and mlx-lm greedy outputs identical in {a['identical_runs']}"
                     f"/{a['runs']} decode runs (common prefixes {a['common_prefix_tokens']} of {a['generated']}).")
    for name, result in results["engines"].items():
        matches = [s["greedy_matches_plain"] for s in result["speculative"].get("T=0", [])]
        if matches:
            lines.append(f"{name}: greedy speculative output equal to plain greedy output in "
                         f"{sum(matches) / len(matches):.0%} of the runs (k = {results['config']['ks']}).")
    return ["", *lines] if lines else []


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_results(results: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """`<workload>.json` and `<workload>.md` (and PNG plots when matplotlib is there) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = results["workload"]["name"]
    written = [out / f"{name}.json", out / f"{name}.md"]
    _atomic_write(written[0], (json.dumps(results, indent=1, default=_json_default) + "\n").encode())
    _atomic_write(written[1], results_markdown(results).encode())
    if plots:
        written += make_plots(results, out)
    return written


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return str(x)


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots via benchmarks/plots.py (a checkout's script; matplotlib is a dev dependency)."""
    script = REPO_ROOT / "benchmarks" / "plots.py"
    if not script.is_file():
        print(f"plots skipped: {script} not found (run from a checkout: python benchmarks/plots.py RESULTS.json)")
        return []
    import importlib.util

    spec = importlib.util.spec_from_file_location("afm_bench_plots", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plot_results(results, out_dir)


def readme_table(result_files: list[Path]) -> str:
    """One summary row per results file (machine x workload), for the README."""
    rows = []
    for path in sorted(result_files):
        r = json.loads(Path(path).read_text())
        e, m = r["engines"], r["machine"]
        ours, theirs = e.get("afm-mlx"), e.get("mlx-lm")
        key = "T=0" if "T=0" in ours["decode"] else next(iter(ours["decode"]))
        prefill = ours["prefill"][-1]
        spec = ours["speculative"].get(key) or []
        best = max(spec, key=lambda s: s["tps"]) if spec else None
        rows.append([
            f"{m['backend']} / {m['device']}", r["workload"]["name"],
            f"{_num(prefill['prefill_tps'])} ({prefill['prompt_tokens']} tok)",
            f"{_num(ours['decode'][key]['tps'])} / {_num(theirs['decode'][key]['tps'])} "
            f"({_ratio(r['ratios']['decode_tps'][key])})" if theirs else _num(ours["decode"][key]["tps"]),
            f"{_num(best['tps'])} (k={best['k']}, {best['speedup']:.2f}x, {best['acceptance']:.0%})" if best else "n/a",
            _size(ours["decode"][key]["peak_memory_bytes"]),
            m["git"]["commit"][:10],
        ])
    header = ["machine", "workload", "afm-mlx prefill tok/s", "plain decode tok/s, afm-mlx / mlx-lm (ratio)",
              "best speculative tok/s (k, speedup, acceptance)", "peak memory", "commit"]
    return "\n".join(_table(header, rows)) + "\n"


# ---- command-line driver (`afm-mlx bench`, benchmarks/run_bench.py)


def parse_ints(text: str, what: str) -> list[int]:
    """'1-8' or '1,2,4' -> [..]."""
    try:
        values = []
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise AFMError(f"{what}: expected integers like '1-8' or '32,128,512', got {text!r}") from None
    return values


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise AFMError(f"{what}: expected numbers like '0,0.7', got {text!r}") from None


def build_workload(name: str, model_dir: str | Path | None, prompts: str | Path | None,
                   config: BenchConfig) -> Workload:
    longest = max(config.prompt_lengths + [config.decode_prompt_length])
    count = max(config.trials, config.warmup, 1)
    if name == "full":
        return full_workload(config.seed, longest, count)
    if name == "tiny":
        return tiny_workload(config.seed, prompt_length=longest, count=count)
    if name == "model":
        return model_dir_workload(model_dir, prompts, longest)
    return demo_workload(None, prompts, longest, count)


def configure(name: str, overrides: dict[str, Any]) -> BenchConfig:
    """The workload's default settings with the given (non-None) overrides applied and validated."""
    config = default_config(name)
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(config, key):
                raise AFMError(f"unknown benchmark setting {key}")
            setattr(config, key, value)
    config.validate()
    return config


def run_workloads(names: list[str], *, model_dir: str | Path | None = None, prompts: str | Path | None = None,
                  out_dir: str | Path | None = None, plots: bool = True, overrides: dict[str, Any] | None = None,
                  console=None) -> list[Path]:
    """Benchmark each named workload (demo, full, model, tiny) and write its results; returns the files written."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    configs = {name: configure(name, overrides or {}) for name in names}  # bad settings fail before any work
    if model_dir is not None:
        from .loading import read_config

        read_config(Path(model_dir).expanduser())  # a bad --model fails with its one line before any work
    out = Path(out_dir) if out_dir is not None else Path("benchmarks/results") / machine_slug(machine_info())
    written: list[Path] = []
    failed: list[str] = []
    for name in names:
        config = configs[name]
        console.print(f"[bold]{name}[/]: building the workload ...")
        try:
            workload = build_workload(name, model_dir, prompts, config)
            total = count_runs(config, workload.draft is not None, len(config.engines))
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{name}: runs", total=total)
                results = run_benchmark(workload, config, lambda what: progress.advance(task))
        except RuntimeError as err:  # MLX's errors (a backend fault, out of memory): the next workload still runs
            failed.append(f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            console.print(f"[red]{failed[-1]}[/]; nothing written for {name}")
            continue
        finally:
            workload = None  # free the weights before the next workload
        written += write_results(results, out, plots=plots)
    for path in written:
        console.print(f"wrote {path}")
    if failed:
        raise AFMError(f"{len(failed)} workload(s) failed: " + "; ".join(failed))
    return written
