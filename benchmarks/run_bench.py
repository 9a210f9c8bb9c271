"""Run the benchmark suite, or rebuild the README table from the results on disk.

    python benchmarks/run_bench.py                      # demo family on held-out text (same as `afm-mlx bench`)
    python benchmarks/run_bench.py --full               # + the full-size 3B base + draft, synthetic on-grid weights
    python benchmarks/run_bench.py --model DIR          # a converted model directory (+ its draft/)
    python benchmarks/run_bench.py --help               # every option (they are afm-mlx bench's)
    python benchmarks/run_bench.py readme               # benchmarks/results/README.md from results/*/*.json
                                                        # (and each <workload>.md re-rendered from its JSON)

Results go to benchmarks/results/<backend>-<device>/<workload>.{json,md} plus PNG plots.
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

README_HEAD = """# Benchmark results

Reproduce: `afm-mlx bench` (demo family; `--full` adds the full-size 3B base + draft, `--model DIR` benchmarks a
converted model; `--help` for the settings), then `python benchmarks/run_bench.py readme`. On an NVIDIA GPU:
`bash benchmarks/gpu_run.sh` (about 5 minutes; see its header for installing MLX's CUDA build there).

Written by `python benchmarks/run_bench.py readme` from the `*/<workload>.json` files beside this one; each
directory is one machine (`<backend>-<device>`), each file one workload, with its full table in `<workload>.md`
and plots in `<workload>-*.png`. Plain decode compares afm-mlx with mlx-lm's `afm7` on the very same weight
arrays in the same run; speculative decoding is at T = 0 on the best k. "full" uses synthetic on-grid weights
(speed and memory only: its draft is unrelated to the base, so acceptance is ~0 there). The CPU rows come from
MLX's CPU backend on 2 cores shared with other jobs: absolute numbers there are low and noisy (the engines' trials
are interleaved, so their ratios are fairer than the absolutes), and verifying k + 1 tokens costs about k + 1
single steps on a CPU, so speculative decoding cannot pay off there.

"""


def write_readme(results_dir: Path = RESULTS) -> Path:
    """The summary table over every machine's results; each `<workload>.md` is re-rendered from its JSON too."""
    import json

    from afm_mlx.bench import readme_table, results_markdown

    # tiny: smoke runs only; kernels: benchmarks/kernels_bench.py's own schema, linked below the table
    files = sorted(p for p in results_dir.glob("*/*.json") if p.stem not in ("tiny", "kernels"))
    if not files:
        raise SystemExit(f"error: no results in {results_dir}/*/ (run a benchmark first)")
    notes = []
    for path in files:
        md = path.with_suffix(".md")
        tmp = md.with_name(f".{md.name}.tmp")
        tmp.write_text(results_markdown(json.loads(path.read_text())))
        tmp.replace(md)
        notes.append(f"- [{path.parent.name}/{md.name}]({path.parent.name}/{md.name})")
    kernels = sorted(results_dir.glob("*/kernels.md"))
    notes += [f"- [{p.parent.name}/{p.name}]({p.parent.name}/{p.name}) (benchmarks/kernels_bench.py)" for p in kernels]
    text = README_HEAD + readme_table(files) + "\nFull tables:\n\n" + "\n".join(notes) + "\n"
    out = results_dir / "README.md"
    tmp = out.with_name(".README.md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["readme"]:
        print(write_readme())
        return 0
    from afm_mlx.cli import app

    app(["bench", *argv], prog_name="run_bench.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
