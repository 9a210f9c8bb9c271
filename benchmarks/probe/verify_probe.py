"""Probe (GPU session): what a speculative verify forward costs as the K/V length grows, with few-row attention
over the valid prefix ("prefix", MLX's cuDNN path: a graph per new K/V length) or over the whole cache buffer with
an explicit mask ("padded", afm_mlx.kv.PADDED_ATTENTION_BACKENDS: one graph per 256 positions).

Each round verifies k + 1 rows at a length one longer than the last (a round that accepted nothing), evaluated
alone; the two variants alternate round by round on their own caches. Demo base, then the full-size 3B with --full.

    python benchmarks/probe/verify_probe.py [--rounds 40] [--k 2] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

import afm_mlx.kv as KV
from afm_mlx import bench
from afm_mlx.dtypes import backend_name


def verify_ms(model, cache, tokens: mx.array, padded: bool) -> float:
    """One verify forward of `tokens` [1, k+1], evaluated alone; then the cache keeps only its first row."""
    saved = KV.PADDED_ATTENTION_BACKENDS
    KV.PADDED_ATTENTION_BACKENDS = (backend_name(),) if padded else ()
    try:
        start = time.perf_counter()
        mx.eval(model(tokens, cache, num_logits=tokens.shape[1]))
        elapsed = time.perf_counter() - start
    finally:
        KV.PADDED_ATTENTION_BACKENDS = saved
    for c in cache:
        c.trim(tokens.shape[1] - 1)
    return 1e3 * elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="the full-size 3B (synthetic weights) as well")
    args = parser.parse_args()
    models = [("demo", bench.demo_workload(None, None, 128, 1).model)]
    if args.full:
        models.append(("full", bench.full_workload(count=1).model))
    for name, model in models:
        caches = {v: model.make_cache() for v in ("prefix", "padded")}
        for cache in caches.values():
            model.prefill(mx.array([list(range(1, 129))]), cache)
        times: dict[str, list[float]] = {v: [] for v in caches}
        for r in range(args.rounds):
            tokens = mx.array([[(r * 7 + i) % 1000 + 1 for i in range(args.k + 1)]])
            for variant, cache in caches.items():
                times[variant].append(verify_ms(model, cache, tokens, variant == "padded"))
        medians = {v: statistics.median(t[2:]) for v, t in times.items()}  # the first rounds build kernels
        print(f"{name}: verify of {args.k + 1} rows at lengths 129..{128 + args.rounds}, {mx.default_device()}: "
              + ", ".join(f"{v} {m:.2f} ms" for v, m in medians.items()), flush=True)


if __name__ == "__main__":
    main()
