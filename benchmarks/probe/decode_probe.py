"""Probe (GPU session): where afm-mlx's plain decode loses to mlx-lm's on a launch-bound GPU.

On the same weights and prompts, interleaved trial by trial, afm-mlx's plain greedy decode under variants that each
change one suspect, next to mlx-lm; counts the graph nodes of one decode step (a launch-bound GPU pays per node)
and times its graph construction on the host (Python + MLX op creation, no evaluation) and one step evaluated alone
(no pipelining: host build + device execution):

    default           afm-mlx as shipped (decode through the compiled step, afm_mlx.step)
    eager             the step built op by op, as before the compiled step (afm_mlx.step.ENABLED off)
    kv-kernel         int8 attention through the kv_attention kernel on this backend too (CUDA: off by default,
                      kernels/dispatch.py MODEL_BACKENDS; it reads codes, so they are cached)
    kernels-off       AFM_MLX_KERNELS=0: no custom kernel anywhere
    plain-kv          the K/V quantise / dequantise helpers uncompiled
    adapter           a random full rank-32 LoRA adapter active (as shipped: a block-diagonal B for Q|K|V)
    adapter-per-part  the same adapter applied per Q / K / V part (3 slices, 3 matmuls, a concat: the form before)
    adapter-gemv      the same adapter with A and B stored transposed (the linear layout [out, in], scale folded into
                      A) and y + (x A) B as two matmuls and an add: for one row MLX's CUDA backend then runs its
                      gemv kernel (mlx/backend/cuda/gemms/gemv.cu: M == 1 with b transposed) instead of two
                      cuBLASLt calls (x @ A with A [in, r], and addmm); on an H200 an adapter cost 56-58% of decode

The H100 run that chose the earlier defaults (kv_attention off on CUDA, compiled K/V helpers) measured variants
of the then default; its log is benchmarks/results/cuda-nvidia-h100-80gb-hbm3/gpu_run-1.log.

    python benchmarks/probe/decode_probe.py [--workload demo|full] [--trials 5] [--tokens 64] [--variants a,b]
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import time
from contextlib import ExitStack, contextmanager

import mlx.core as mx

import afm_mlx.kv as KV
import afm_mlx.model as M
from afm_mlx import adapters, bench, kernels, step
from afm_mlx.kernels import dispatch
from afm_mlx.kernels.reference import dequantize_codes, quantize_codes


VARIANTS = ["default", "eager", "kv-kernel", "kernels-off", "plain-kv", "adapter", "adapter-per-part",
            "adapter-gemv"]
ADAPTER = "probe-random-adapter"


def per_part_lora(self, x):
    """LoRALinear.__call__ as it was: each part's A slice times its own B, concatenated."""
    y, lora = self.linear(x), self.lora
    if lora is None:
        return y
    z = mx.concatenate([(x @ a) @ b for a, b in lora.parts()], axis=-1)
    return y + lora.scale * z


GEMV_LAYOUT: dict[int, tuple[mx.array, mx.array]] = {}  # id(LoRA) -> (scale * A^T [r, in], B^T [out, r])


def gemv_layout(model) -> None:
    for lora in adapters._registry(model).adapters[ADAPTER].loras.values():
        GEMV_LAYOUT[id(lora)] = (mx.contiguous((lora.a * lora.scale).T), mx.contiguous(lora.b.T))
    mx.eval(list(GEMV_LAYOUT.values()))


def gemv_lora(self, x):
    """LoRALinear.__call__ over the transposed layout: x @ (sA^T)^T then @ (B^T)^T, both gemv for one row."""
    y, lora = self.linear(x), self.lora
    if lora is None:
        return y
    a_t, b_t = GEMV_LAYOUT[id(lora)]
    return y + (x @ a_t.T) @ b_t.T


@contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextmanager
def variant(name: str, model):
    with ExitStack() as stack:
        if name == "kv-kernel":
            stack.enter_context(patched(dispatch, "MODEL_BACKENDS", {**dispatch.MODEL_BACKENDS,
                                                                     "kv_attention": ("metal", "cuda")}))
        if name == "eager":
            stack.enter_context(patched(step, "ENABLED", False))
        if name == "kernels-off":
            kernels.set_enabled(False)
            stack.callback(kernels.set_enabled, True)
        if name == "plain-kv":
            stack.enter_context(patched(M, "int8_codes", quantize_codes))
            stack.enter_context(patched(KV, "dequantize_int8", dequantize_codes))
        if name.startswith("adapter"):
            adapters.set_active_adapter(model, ADAPTER)
            stack.callback(adapters.set_active_adapter, model, None)
        if name == "adapter-per-part":
            stack.enter_context(patched(adapters.LoRALinear, "__call__", per_part_lora))
        if name == "adapter-gemv":
            stack.enter_context(patched(adapters.LoRALinear, "__call__", gemv_lora))
        yield


def step_profile(forward, cache_factory, prompt: list[int], steps: int) -> tuple[int, float, float]:
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
    parser.add_argument("--workload", choices=["demo", "full"], default="demo")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",")]
    if set(names) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(set(names) - set(VARIANTS))}; known: {VARIANTS}")
    workload = (bench.full_workload(0, 128, args.trials) if args.workload == "full"
                else bench.demo_workload(None, None, 128, args.trials))
    model = workload.model
    if any(n.startswith("adapter") for n in names):
        adapters.add_adapter(model, bench.random_adapter(model.args, 32, 0), ADAPTER)
        if "adapter-gemv" in names:
            gemv_layout(model)
    ours = bench.AfmEngine(model, None, workload.vocab_size)
    theirs = bench.MlxLmEngine(model, None)
    tps: dict[str, list[float]] = {n: [] for n in names + ["mlx-lm"]}
    failed: dict[str, str] = {}
    for trial in range(-1, args.trials):  # trial -1: warm-up (kernel builds, compiles)
        prompt = workload.prompt(128, max(trial, 0))
        for name in [n for n in names if n not in failed]:
            try:
                with variant(name, model):
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
    print(f"{mx.default_device()}, mlx {mx.__version__}: {args.workload} plain greedy decode, {args.tokens} tokens "
          f"after 128, {args.trials} interleaved trials")
    prompt = workload.prompt(128, 0)
    for name in [n for n in names if n not in failed] + ["mlx-lm"]:
        if name == "mlx-lm":
            with bench.mlx_lm_patches():
                from mlx_lm.models.cache import make_prompt_cache
                nodes, build, whole = step_profile(lambda t, c: theirs.model(t, cache=c),
                                                   lambda: make_prompt_cache(theirs.model), prompt,
                                                   args.tokens)
        else:
            with variant(name, model):
                nodes, build, whole = step_profile(lambda t, c: model(t, c, num_logits=1), model.make_cache, prompt,
                                                   args.tokens)
        ratio = statistics.median(a / b for a, b in zip(tps[name], tps["mlx-lm"]))
        print(f"{name:>16}: {statistics.median(tps[name]):8.1f} tok/s  ({ratio:.2f}x mlx-lm, paired)  "
              f"{nodes} nodes/step, build {build:.0f} µs, build+eval alone {whole:.0f} µs", flush=True)


if __name__ == "__main__":
    main()
