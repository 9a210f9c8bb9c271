"""The command-line driver behind `afm-mlx bench` and benchmarks/run_bench.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ..errors import AFMError
from .machine import machine_info, machine_slug
from .report import write_results
from .suite import BenchConfig, count_runs, default_config, run_benchmark
from .workloads import (Workload, demo_workload, full_workload, model_dir_workload, read_prompt_texts,
                        tiny_workload)


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


def _check_prompts(names: list[str], prompts: str | Path) -> None:
    """--prompts must feed some workload, and be readable, before any work starts."""
    if not {"demo", "model"} & set(names):
        raise AFMError(f"--prompts feeds the demo and --model workloads only, not {', '.join(names)}")
    read_prompt_texts(prompts)


def run_workloads(names: list[str], *, model_dir: str | Path | None = None, prompts: str | Path | None = None,
                  out_dir: str | Path | None = None, plots: bool = True, overrides: dict[str, Any] | None = None,
                  console=None) -> list[Path]:
    """Benchmark each named workload (demo, full, model, tiny) and write its results; returns the files written."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    configs = {name: configure(name, overrides or {}) for name in names}  # bad settings fail before any work
    if model_dir is not None:
        from ..loading import read_config

        read_config(Path(model_dir).expanduser())  # a bad --model fails with its one line before any work
    if prompts is not None:
        _check_prompts(names, prompts)
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
