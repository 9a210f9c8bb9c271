"""Speculative decoding inside the batch engine, against plain batched decoding, on the demo family.

    python benchmarks/batch_speculative_bench.py              # rows 1, 4, 16; k 0, 2, 4 -> results/serve/batch_speculative.*
    python benchmarks/batch_speculative_bench.py --rows 1,4 --ks 0,2 --trials 1

Per trial, for every row count and k (interleaved, so slow phases of a shared machine hit every setting alike):
the BatchGenerator with that many rows of held-out prompts (raw continuation, greedy), every row at that k
(0: the pipelined plain step), decode tokens/s after admission; with k > 0 also the draft acceptance of the
rows. speedup: tokens/s over k = 0's at the same row count, median of the per-trial ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import afm_mlx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ROOT, engine_tps, machine  # noqa: E402


def run(opts) -> dict:
    model, tokenizer = afm_mlx.load()
    for rows in opts.rows:  # trace the shapes (mx.compile) before timing
        for k in opts.ks:
            engine_tps(model, tokenizer, rows, [None], 8, k)
    runs = {(r, k): [] for r in opts.rows for k in opts.ks}
    accepted = {key: [0, 0] for key in runs}
    for _ in range(opts.trials):
        for rows in opts.rows:
            for k in opts.ks:
                stats = []
                runs[rows, k].append(engine_tps(model, tokenizer, rows, [None], opts.max_tokens, k, stats))
                for s in stats:
                    if s.speculative is not None:
                        accepted[rows, k][0] += s.speculative.accepted
                        accepted[rows, k][1] += s.speculative.proposed
    table = []
    for (rows, k), tps in runs.items():
        base = runs[rows, opts.ks[0]]
        a, p = accepted[rows, k]
        table.append({"rows": rows, "k": k, "tps": statistics.median(tps), "trials": tps,
                      "speedup": statistics.median(t / b for t, b in zip(tps, base)),
                      "acceptance": a / p if p else None})
    return {"machine": machine(), "options": {k: str(v) for k, v in vars(opts).items()}, "table": table}


def markdown(result: dict) -> str:
    o, m = result["options"], result["machine"]
    lines = [f"# Speculative decoding inside the batch (demo family, {m['device']})", "",
             f"{o['max_tokens']} greedy tokens per row, held-out prompts; medians of {o['trials']} interleaved "
             f"trials; commit {m['commit']}, {m['cpus']} CPUs, load average "
             f"{', '.join(f'{x:.1f}' for x in m['load_avg'])}.", "",
             "| rows | k | tok/s | vs k = 0 | acceptance |", "|---|---|---|---|---|"]
    for r in result["table"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"| {r['rows']} | {r['k']} | {r['tps']:.1f} | {r['speedup']:.2f}x | {acc} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=ints, default=[1, 4, 16])
    parser.add_argument("--ks", type=ints, default=[0, 2, 4], help="the first is the baseline (0: plain)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve")
    opts = parser.parse_args()
    result = run(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "batch_speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    (opts.out / "batch_speculative.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
