"""Probe (GPU session): where the demo model's plain decode loses to mlx-lm's on a launch-bound GPU.

On the H200 afm-mlx decoded the demo model at 722 tok/s against mlx-lm's 1,283. This measures, on the same
weights and prompts, interleaved trial by trial, afm-mlx's plain greedy decode under variants that each remove
one suspect, next to mlx-lm; counts the graph nodes of one decode step (a launch-bound GPU pays per node) and
times its graph construction on the host (Python + MLX op creation, no evaluation) and one step evaluated alone
(no pipelining: host build + device execution):

    default          afm-mlx as shipped
    kv-kernel        int8 attention through the kv_attention kernel on this backend too (CUDA: off by default,
                     kernels/dispatch.py MODEL_BACKENDS)
    kernels-off      AFM_MLX_KERNELS=0: no custom kernel anywhere
    plain-kv         the K/V quantise / dequantise helpers uncompiled

The H100 run that chose today's defaults (kv_attention off on CUDA, compiled K/V helpers) measured variants of
the then default; its log is benchmarks/results/cuda-nvidia-h100-80gb-hbm3/gpu_run-1.log.

    python benchmarks/probe/decode_probe.py [--trials 5] [--tokens 64] [--variants default,kv-kernel]
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import time
from contextlib import contextmanager

import mlx.core as mx

import afm_mlx.kv as KV
import afm_mlx.model as M
from afm_mlx import bench, kernels
from afm_mlx.kernels import dispatch
from afm_mlx.kernels.reference import dequantize_codes, quantize_codes


VARIANTS = ["default", "kv-kernel", "kernels-off", "plain-kv"]


@contextmanager
def variant(name: str):
    int8, dequantize, backends = M.int8_codes, KV.dequantize_int8, dict(dispatch.MODEL_BACKENDS)
    try:
        if name == "kv-kernel":
            dispatch.MODEL_BACKENDS["kv_attention"] = ("metal", "cuda")
        elif name == "kernels-off":
            kernels.set_enabled(False)
        elif name == "plain-kv":
            M.int8_codes, KV.dequantize_int8 = quantize_codes, dequantize_codes
        yield
    finally:
        kernels.set_enabled(True)
        M.int8_codes, KV.dequantize_int8 = int8, dequantize
        dispatch.MODEL_BACKENDS.update(backends)


def step_profile(forward, cache_factory, prompt: list[int], steps: int = 64) -> tuple[int, float, float]:
    """(graph nodes of one decode step (mx.export_to_dot), median µs to build a step's graph, median µs for a
    step built and evaluated alone), after a prefill of `prompt`; greedy, each step feeding the next."""
    cache = cache_factory()
    y = mx.argmax(forward(mx.array([prompt]), cache)[:, -1], axis=-1)
    mx.eval(y)
    dot = io.StringIO()
    mx.export_to_dot(dot, mx.argmax(forward(y[:, None], cache)[:, -1], axis=-1))
    nodes = len(re.findall(r"label ?=\"", dot.getvalue()))
    build, whole = [], []
    for _ in range(steps):
        start = time.perf_counter()
        y = mx.argmax(forward(y[:, None], cache)[:, -1], axis=-1)
        built = time.perf_counter()
        mx.eval(y)
        build.append(built - start)
        whole.append(time.perf_counter() - start)
    return nodes, 1e6 * statistics.median(build), 1e6 * statistics.median(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    args = parser.parse_args()
    workload = bench.demo_workload(None, None, 128, args.trials)
    ours = bench.AfmEngine(workload.model, None, workload.vocab_size)
    theirs = bench.MlxLmEngine(workload.model, None)
    names = [n.strip() for n in args.variants.split(",")]
    if set(names) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(set(names) - set(VARIANTS))}; known: {VARIANTS}")
    tps: dict[str, list[float]] = {n: [] for n in names + ["mlx-lm"]}
    failed: dict[str, str] = {}
    for trial in range(-1, args.trials):  # trial -1: warm-up (kernel builds, compiles)
        prompt = workload.prompt(128, max(trial, 0))
        for name in [n for n in names if n not in failed]:
            try:
                with variant(name):
                    run = ours.run(prompt, args.tokens, 0.0, None, 0)
            except RuntimeError as err:  # an MLX backend error in one variant must not cost the others
                failed[name] = str(err).splitlines()[0][:200]
                print(f"{name}: failed: {failed[name]}", flush=True)
                continue
            if trial >= 0:
                tps[name].append(run.decode_tps)
        run = theirs.run(prompt, args.tokens, 0.0, None, 0)
        if trial >= 0:
            tps["mlx-lm"].append(run.decode_tps)
            print(f"trial {trial}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in tps.items() if v), flush=True)
    print(f"{mx.default_device()}, mlx {mx.__version__}: demo plain greedy decode, {args.tokens} tokens after 128, "
          f"{args.trials} interleaved trials")
    prompt = workload.prompt(128, 0)
    for name in [n for n in names if n not in failed] + ["mlx-lm"]:
        if name == "mlx-lm":
            with bench.mlx_lm_patches():
                from mlx_lm.models.cache import make_prompt_cache
                nodes, build, whole = step_profile(lambda t, c: theirs.model(t, cache=c),
                                                   lambda: make_prompt_cache(theirs.model), prompt)
        else:
            with variant(name):
                nodes, build, whole = step_profile(lambda t, c: workload.model(t, c, num_logits=1),
                                                   workload.model.make_cache, prompt)
        ratio = statistics.median(a / b for a, b in zip(tps[name], tps["mlx-lm"]))
        print(f"{name:>14}: {statistics.median(tps[name]):8.1f} tok/s  ({ratio:.2f}x mlx-lm, paired)  "
              f"{nodes} nodes/step, build {build:.0f} µs, build+eval alone {whole:.0f} µs", flush=True)

if __name__ == "__main__":
    main()
