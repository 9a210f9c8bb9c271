"""PNG plots of a benchmark results file (afm_mlx.bench JSON): acceptance by draft position, tokens/s vs k, and
afm-mlx vs mlx-lm side by side.

    python benchmarks/plots.py benchmarks/results/cpu-amd-epyc/demo.json [OUT_DIR]

matplotlib is a dev dependency (`pip install -e '.[dev]'`); without it the plots are skipped with a message and
nothing else changes. `plot_results(results, out_dir)` is what `afm-mlx bench` and run_bench.py call.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ENGINE_STYLE = {"afm-mlx": {"color": "tab:blue", "marker": "o"}, "mlx-lm": {"color": "tab:orange", "marker": "s"}}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _title(results: dict, what: str) -> str:
    m = results["machine"]
    return f"{results['workload']['name']}: {what}\n{m['backend']} / {m['device']}"


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")  # atomic: a reader never sees half a PNG
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def plot_acceptance(plt, results: dict, path: Path) -> Path | None:
    """Acceptance rate at each draft position, one line per k, per engine and temperature."""
    series = [(name, key, specs) for name, r in results["engines"].items()
              for key, specs in r["speculative"].items() if specs]
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), sharey=True, squeeze=False)
    for ax, (name, key, specs) in zip(axes[0], series):
        cmap = plt.get_cmap("viridis")
        for i, s in enumerate(specs):
            positions = range(1, len(s["acceptance_by_position"]) + 1)
            ax.plot(positions, s["acceptance_by_position"], marker=".", color=cmap(i / max(len(specs) - 1, 1)),
                    label=f"k={s['k']}")
        ax.set_title(f"{name}, {key}")
        ax.set_xlabel("draft position")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("acceptance rate")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(_title(results, "acceptance by draft position"), fontsize=9)
    return _save(fig, path)


def plot_tps_vs_k(plt, results: dict, path: Path) -> Path | None:
    """Speculative tokens/s against k for both engines, plain decode as dashed horizontal lines."""
    keys = [k for k in next(iter(results["engines"].values()))["speculative"] if
            any(r["speculative"].get(k) for r in results["engines"].values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, r in results["engines"].items():
            specs, style = r["speculative"][key], ENGINE_STYLE.get(name, {})
            ax.plot([s["k"] for s in specs], [s["tps"] for s in specs], label=f"{name} speculative", **style)
            ax.axhline(r["decode"][key]["tps"], linestyle="--", color=style.get("color"), label=f"{name} plain")
        ax.set_title(key)
        ax.set_xlabel("draft tokens k")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(results, "decode tokens/s vs draft length"), fontsize=9)
    return _save(fig, path)


def plot_engines(plt, results: dict, path: Path) -> Path | None:
    """Grouped bars: prefill tok/s at each prompt length, plain decode and best speculative decode per temperature."""
    engines = results["engines"]
    first = next(iter(engines.values()))
    labels = [f"prefill\n{p['prompt_tokens']} tok" for p in first["prefill"]]
    values = {name: [p["prefill_tps"] for p in r["prefill"]] for name, r in engines.items()}
    for key in first["decode"]:
        labels.append(f"decode\n{key}")
        for name, r in engines.items():
            values[name].append(r["decode"][key]["tps"])
        if first["speculative"].get(key):
            labels.append(f"best spec.\n{key}")
            for name, r in engines.items():
                values[name].append(max(s["tps"] for s in r["speculative"][key]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 3.8))
    width = 0.8 / len(engines)
    for i, (name, vals) in enumerate(values.items()):
        xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, vals, width, label=name, color=ENGINE_STYLE.get(name, {}).get("color"))
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(_title(results, "afm-mlx vs mlx-lm afm7, same weights"), fontsize=9)
    return _save(fig, path)


def plot_results(results: dict, out_dir: str | Path) -> list[Path]:
    """Write `<workload>-acceptance.png`, `<workload>-tps-vs-k.png`, `<workload>-engines.png`; [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        print("plots skipped: matplotlib is not installed (it is a dev dependency: pip install -e '.[dev]')")
        return []
    out, name = Path(out_dir), results["workload"]["name"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, plot in (("acceptance", plot_acceptance), ("tps-vs-k", plot_tps_vs_k), ("engines", plot_engines)):
        path = plot(plt, results, out / f"{name}-{suffix}.png")
        plt.close("all")
        if path is not None:
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    source = Path(argv[0])
    if not source.is_file():
        print(f"error: results file not found: {source}", file=sys.stderr)
        return 1
    try:
        results = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        print(f"error: {source}: invalid JSON ({err.msg} at line {err.lineno})", file=sys.stderr)
        return 1
    for path in plot_results(results, Path(argv[1]) if len(argv) > 1 else source.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
