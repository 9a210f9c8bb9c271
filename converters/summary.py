"""What `afm-mlx convert` shows: a progress bar while tensors stream through, then a summary table."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

ProgressCallback = Callable[[str, str, int, int], None]


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


@contextmanager
def conversion_progress(console: Console) -> Iterator[ProgressCallback]:
    """A callback for `convert(progress=...)` that drives one bar per model (bytes of the source read)."""
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=24), DownloadColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=False)
    tasks: dict[str, Any] = {}

    def update(label: str, name: str, nbytes: int, total: int) -> None:
        if not tasks:
            bar.start()  # only once there is work: a conversion refused up front prints its error line alone
        if label not in tasks:
            tasks[label] = bar.add_task(f"converting {label}", total=total)
        bar.update(tasks[label], advance=nbytes)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def _kind(row: dict[str, Any]) -> str:
    name = row["name"]
    if name == "model.embedding.weight":
        return "embedding (tied head)"
    if name.endswith(("quant_key_scale", "quant_value_scale")):
        return "kv-quant scale"
    return "norm" if name.endswith("norm.weight") else "linear"


def _storage(row: dict[str, Any]) -> str:
    if row["group_size"] is None:
        return row["storage"]
    how = "exact grid" if row["storage"] == "grid" else "lossy"
    return f"{row['bits']}-bit g{row['group_size']} ({how})"


def summary_table(report: dict[str, Any]) -> Table:
    """One row per (model, tensor kind, storage): counts, exactness, worst errors, output size."""
    table = Table(title="conversion summary")
    for column in ("model", "tensors", "kind", "stored as", "exact", "max abs err", "max rel err", "size"):
        table.add_column(column, justify="right" if column in ("tensors", "max abs err", "max rel err", "size") else "left")
    for label in ("base", "draft"):
        model = report.get(label)
        if not model:
            continue
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for row in model["tensors"]:
            groups[(_kind(row), _storage(row))].append(row)
        for (kind, storage), rows in groups.items():
            exact = sum(r["exact"] for r in rows)
            table.add_row(
                label, str(len(rows)), kind, storage,
                "yes" if exact == len(rows) else f"[yellow]{exact}/{len(rows)}",
                f"{max(r['max_abs_error'] for r in rows):.3g}", f"{max(r['relative_error'] for r in rows):.3g}",
                human_bytes(sum(r["bytes"] for r in rows)),
            )
    return table


def print_summary(result: Any, console: Console) -> None:
    """The table, then sizes, time, LoRA and tokenizer notes, and the output path."""
    report = result.report
    console.print(summary_table(report))
    for label in ("base", "draft"):
        model = report.get(label)
        if not model:
            continue
        lossy = model["tensors_lossy"]
        note = f"[yellow]{lossy} tensors stored lossy[/]" if lossy else "all tensors exact"
        console.print(f"{label}: {human_bytes(model['source_bytes'])} -> {human_bytes(model['output_bytes'])}, "
                      f"{note}; LoRA: {model['lora']}")
        if model.get("ignored_unknown_buffers"):
            console.print(f"[yellow]{label}: ignored {len(model['ignored_unknown_buffers'])} unknown kv-quantizer "
                          "buffers (listed in conversion_report.json)")
    tok = report.get("tokenizer")
    console.print(f"tokenizer: special ids {tok['special_ids']}" if tok else
                  "[yellow]no tokenizer.model given: the directory loads with load_model() but not load()")
    console.print(f"wrote {result.out} in {result.seconds:.1f} s (details: conversion_report.json)")
