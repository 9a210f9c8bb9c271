"""The suite: settings, the interleaved measurements, the adapter, memory and roofline figures, the goals, and
`run_benchmark`, which gathers them into one results dict."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..dtypes import backend_name
from ..errors import AFMError
from ..model import ModelArgs
from .controlled import bench_controlled
from .engines import AfmEngine, MlxLmEngine, Run
from .machine import GB, machine_info
from .workloads import Workload, describe_weights, parameter_bytes, parameter_bytes_16bit

SCHEMA_VERSION = 1


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
    guided: bool = True  # afm-mlx decode under a JSON schema vs free, where the workload has a real tokenizer
    seed: int = 0
    time_budget_s: float | None = None  # settings that would end past it are skipped (and listed): Budget
    controlled_alphas: list[float] = field(default_factory=list)  # speculative at set acceptance (controlled.py)
    controlled_ks: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])

    def validate(self) -> None:
        checks = [
            (min(self.prompt_lengths + [self.decode_prompt_length]) >= 2, "prompt lengths must be >= 2"),
            (self.max_tokens >= 2, "max_tokens must be >= 2 (decode speed needs two tokens)"),
            (all(1 <= k <= 16 for k in self.ks), "draft lengths k must be in 1..16"),
            (all(t >= 0 for t in self.temperatures) and self.temperatures, "temperatures must be >= 0"),
            (self.trials >= 1 and self.warmup >= 0 and self.warmup_tokens >= 1, "trials >= 1, warmup >= 0"),
            (self.time_budget_s is None or self.time_budget_s > 0, "the time budget must be > 0 seconds"),
            (all(0 <= a <= 1 for a in self.controlled_alphas), "controlled acceptance rates must be in [0, 1]"),
            (self.controlled_ks and all(1 <= k <= 15 for k in self.controlled_ks), "controlled k must be in 1..15"),
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
        return BenchConfig([4], 2, 4, [2], [0.0], trials=2, warmup=1, warmup_tokens=1, warmup_prompt_length=2,
                           controlled_alphas=[0.8], controlled_ks=[2, 4])
    if workload == "full":
        return BenchConfig([128, 1024], 128, 64, [2, 3, 4], [0.0], trials=3, warmup=1, warmup_tokens=4,
                           controlled_alphas=[0.6, 0.7, 0.8, 0.9])
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
    guided = (4 if has_draft else 2) * (config.warmup + config.trials) if config.guided else 0
    controlled = len(config.controlled_alphas) * len(config.controlled_ks) + 1
    controlled = (config.trials + 1) * controlled if has_draft and config.controlled_alphas else 0
    return settings * per_setting + adapter + guided + controlled


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
    from ..converters.adapter_formats import AdapterWeights, lora_layout

    rng = np.random.default_rng(seed)
    tensors = {s.name: rng.normal(0.0, 0.02, size=s.shape).astype(np.float32) for s in lora_layout(args, rank)}
    return AdapterWeights(tensors, rank, 0.5, "memory", source="random adapter (benchmark)")


def bench_adapter(engine: AfmEngine, workload: Workload, config: BenchConfig, tick: Tick) -> dict[str, Any]:
    """afm-mlx plain greedy decode with a random rank-r adapter active vs none, interleaved trial by trial."""
    try:
        from ..adapters import add_adapter, set_active_adapter, unload_adapter
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
            goal = f"3B base + draft + 4k int8 KV <= 1.2 GB ({label}, arrays)"
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


def bench_guided_if_possible(engines: list, workload: Workload, config: BenchConfig, tick: Tick,
                             budget: Budget) -> dict[str, Any]:
    """Guided decoding (bench.guided) on afm-mlx where the workload has a real tokenizer; else why not."""
    if not config.guided:
        return {"status": "n/a", "reason": "switched off"}
    if workload.tokenizer is None or "afm-mlx" not in [e.name for e in engines]:
        return {"status": "n/a", "reason": "needs afm-mlx and a workload with a real tokenizer (demo, --model)"}
    if not budget.allows("guided"):
        return {"status": "n/a", "reason": "skipped: time budget spent"}
    from .guided import bench_guided

    return {"status": "measured", **bench_guided(workload.model, workload.draft, workload.tokenizer, config, tick)}


def run_benchmark(workload: Workload, config: BenchConfig, progress: Tick | None = None) -> dict[str, Any]:
    """Every metric for every engine on one workload; a JSON-ready dict (see write_results)."""
    config.validate()
    tick = progress or (lambda _: None)
    machine = machine_info()
    budget = Budget(config.time_budget_s)
    engines = make_engines(workload, config.engines)
    speeds, agreement = bench_speeds(engines, workload, config, tick, budget)
    controlled = None  # before the adapter runs: on a budget, the speculation economics come first
    if workload.draft is not None and config.controlled_alphas and "afm-mlx" in config.engines:
        controlled = bench_controlled(workload, config, tick, budget)
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
    guided = bench_guided_if_possible(engines, workload, config, tick, budget)
    add_roofline(speeds, workload, config, machine["bandwidth_gbps"])
    results = {
        "schema": SCHEMA_VERSION, "machine": machine,
        "workload": {"name": workload.name, "description": workload.description,
                     "prompt_source": workload.prompt_source, "base": describe_weights(workload.model),
                     "draft": describe_weights(workload.draft) if workload.draft is not None else None},
        "config": asdict(config), "engines": speeds, "agreement_greedy": agreement,
        "memory": memory_summary(workload, speeds), "ratios": ratios(speeds),
        "notes": harness_notes(workload, config), "skipped": budget.skipped, "guided": guided,
        "controlled": controlled,
    }
    results["goals"] = goals(results)
    return results


