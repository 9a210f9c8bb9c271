"""Cost of the custom kernels at M / L = 1..8 rows, against what MLX does without them.

    python benchmarks/kernels_bench.py --quick        # < 1 minute on a GPU: M / L in 1, 2, 4, 8, no sweep
    python benchmarks/kernels_bench.py                # more context lengths and repetitions

- qmm_small vs mx.quantized_matmul: x[M, 2048] @ W[6656, 2048]^T (AFM's FFN up/gate shape), 2- and 4-bit, group 128
  (plus group 64 without --quick), M = 1..8. The question (performance-anchors 3d): does M = 4 cost <= 1.3x M = 1
  at 2 bits? MLX's own ratio is ~2.3x (mlx #3852).
- kv_attention vs dequantize + mx.fast.scaled_dot_product_attention (the model's path without the kernel), and
  SDPA over a float cache (the dequantization left out), for AFM base (16 / 2 heads, head dim 128) and draft
  (8 / 4 heads, head dim 32) shapes, L = 1, 2, 4, 8 queries, several cache lengths.
- On a GPU, a small sweep of launch shapes (qmm rows per SIMD-group / SIMD-groups, attention split target) to
  pick defaults from measurements.

Each timing is the median over repeats of a batch of calls evaluated together (so launch latency is included but
one host sync is spread over the batch), after warm-up (which also runs the kernels' first-use self-check).
Results go to benchmarks/results/<backend>-<device>/kernels.{json,md}. On a machine without Metal or CUDA the
"kernel" column times the pure-MLX reference the CPU path uses, which shows nothing about the kernels: the
Markdown says so. Metal timings need an Apple GPU and cannot be taken on the project's Linux machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx

from afm_mlx.kernels import attention, dispatch, kv_attention, qmm, qmm_small
from afm_mlx.kernels.reference import dequantize_codes

K, N = 2048, 6656
ATTENTION_SHAPES = [("base", 16, 2, 128), ("draft", 8, 4, 32)]  # (name, heads, kv heads, head dim)
QUICK_LENGTHS, FULL_LENGTHS = [1024, 4096], [512, 2048, 8192, 32768]
# Every M (qmm) and L (attention) is its own template instance, compiled at first use (NVRTC: seconds each).
QUICK_ROWS, FULL_ROWS = (1, 2, 4, 8), tuple(range(1, 9))
SWEEP_LENGTH = 4096
TIMING = {"quick": (0.15, 10), "full": (1.0, 20)}  # (seconds per measurement, calls per eval)
RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn, budget: float, batch: int) -> float:
    """Median seconds per call of fn(): batches of `batch` calls, one mx.eval each, for about `budget` seconds."""
    mx.eval(fn())  # warm-up: compile / self-check
    mx.eval([fn() for _ in range(batch)])
    samples, start = [], time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < budget and len(samples) < 200):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(batch)])
        samples.append((time.perf_counter() - t0) / batch)
    return statistics.median(samples)


def time_qmm(x, w, scales, biases, bits: int, group_size: int, budget: float, batch: int) -> tuple[float, float]:
    """(qmm_small, mx.quantized_matmul) seconds per call."""
    q = dict(group_size=group_size, bits=bits)
    ours = median_seconds(lambda: qmm_small(x, w, scales, biases, **q), budget, batch)
    theirs = median_seconds(lambda: mx.quantized_matmul(x, w, scales, biases, transpose=True, **q), budget, batch)
    return ours, theirs


def bench_qmm(dtype, groups: list[int], ms: tuple[int, ...], budget: float, batch: int) -> list[dict]:
    rows = []
    for bits in (2, 4):
        for group_size in groups:
            w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size=group_size, bits=bits)
            for m in ms:
                x = mx.random.normal((m, K)).astype(dtype)
                ours, theirs = time_qmm(x, w, scales, biases, bits, group_size, budget, batch)
                rows.append(dict(bits=bits, group_size=group_size, M=m, kernel_us=ours * 1e6, mlx_us=theirs * 1e6))
                print(f"qmm  {bits}-bit g{group_size} M={m}: kernel {ours * 1e6:8.1f} us   "
                      f"mlx {theirs * 1e6:8.1f} us", flush=True)  # fmt: skip
    return rows


def time_attention(q, codes, kv_len: int, scales, budget: float, batch: int, dtype) -> tuple[float, float, float]:
    """(kv_attention, dequantize + SDPA, SDPA over an already-float cache) seconds per call."""
    (k_codes, v_codes), (k_scale, v_scale) = codes, scales
    scale, mask = q.shape[-1] ** -0.5, "causal" if q.shape[2] > 1 else None
    k_float, v_float = (dequantize_codes(c[:, :, :kv_len], s, dtype) for c, s in zip(codes, scales))
    mx.eval(k_float, v_float)

    def dequant_sdpa():
        k, v = (dequantize_codes(c[:, :, :kv_len], s, dtype) for c, s in zip(codes, scales))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def float_sdpa():
        return mx.fast.scaled_dot_product_attention(q, k_float, v_float, scale=scale, mask=mask)

    def kernel():
        return kv_attention(q, k_codes, v_codes, k_scale, v_scale, scale=scale, kv_len=kv_len)

    return tuple(median_seconds(fn, budget, batch) for fn in (kernel, dequant_sdpa, float_sdpa))


def bench_attention(dtype, lengths: list[int], budget: float, batch: int) -> list[dict]:
    rows = []
    for name, heads, kv_heads, head_dim in ATTENTION_SHAPES:
        for kv_len in lengths:
            s_alloc = (kv_len + 255) // 256 * 256
            shape = (1, kv_heads, s_alloc, head_dim)
            codes = [mx.random.randint(-128, 128, shape).astype(mx.int8) for _ in range(2)]
            scales = mx.array(0.02), mx.array(0.01)
            for l in (1, 2, 4, 8):
                q = mx.random.normal((1, heads, l, head_dim)).astype(dtype)
                ours, base, floats = time_attention(q, codes, kv_len, scales, budget, batch, dtype)
                times = dict(kernel_us=ours * 1e6, dequant_sdpa_us=base * 1e6, float_sdpa_us=floats * 1e6)
                rows.append(dict(model=name, heads=heads, kv_heads=kv_heads, head_dim=head_dim, kv_len=kv_len, L=l,
                                 **times))  # fmt: skip
                print(f"attn {name} S={kv_len} L={l}: kernel {ours * 1e6:8.1f} us   dequant+sdpa {base * 1e6:8.1f} "
                      f"us   float sdpa {floats * 1e6:8.1f} us", flush=True)  # fmt: skip
    return rows


def sweep_qmm(dtype, budget: float, batch: int) -> list[dict]:
    """qmm_small's rows per SIMD-group x SIMD-groups per threadgroup, 2-bit g128 (each (R, M) is one JIT compile)."""
    rows = []
    w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size=128, bits=2)
    saved = qmm.ROWS_PER_SIMDGROUP, qmm.SIMDGROUPS
    try:
        for r, nsg in [(4, 2), (8, 2), (2, 4), (4, 4)]:
            qmm.ROWS_PER_SIMDGROUP, qmm.SIMDGROUPS = r, nsg
            for m in (1, 8):
                x = mx.random.normal((m, K)).astype(dtype)
                t = median_seconds(lambda: qmm_small(x, w, scales, biases, bits=2, group_size=128), budget, batch)
                rows.append(dict(kernel="qmm_small", setting=f"R={r} simdgroups={nsg}", case=f"2-bit g128 M={m}",
                                 us=t * 1e6))  # fmt: skip
                print(f"sweep qmm R={r} nsg={nsg} M={m}: {t * 1e6:8.1f} us", flush=True)
    finally:
        qmm.ROWS_PER_SIMDGROUP, qmm.SIMDGROUPS = saved
    return rows


def sweep_attention(dtype, budget: float, batch: int) -> list[dict]:
    """kv_attention's target number of threadgroups (it sets the split length), AFM base shape."""
    rows = []
    codes = [mx.random.randint(-128, 128, (1, 2, SWEEP_LENGTH, 128)).astype(mx.int8) for _ in range(2)]
    saved = attention.TARGET_GROUPS
    try:
        for target in (32, 128, 512):
            attention.TARGET_GROUPS = target
            for l in (1, 4, 8):
                q = mx.random.normal((1, 16, l, 128)).astype(dtype)
                t = median_seconds(lambda: kv_attention(q, *codes, 0.02, 0.01, scale=128**-0.5), budget, batch)
                rows.append(dict(kernel="kv_attention", setting=f"target groups={target}",
                                 case=f"base S={SWEEP_LENGTH} L={l}", us=t * 1e6))  # fmt: skip
                print(f"sweep attn target={target} L={l}: {t * 1e6:8.1f} us", flush=True)
    finally:
        attention.TARGET_GROUPS = saved
    return rows


def device_label() -> tuple[str, str]:
    backend = dispatch.backend()
    name = mx.device_info().get("device_name", platform.processor() or "unknown")
    return backend, re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")


def header_lines(meta: dict) -> list[str]:
    lines = [f"# Kernel benchmark: {meta['backend']} on {meta['device']}", "",
             f"mlx {meta['mlx']}, activations {meta['dtype']}, {meta['date']}, mode {meta['mode']}. "
             "Median microseconds per call (batches of calls, one eval per batch).", ""]  # fmt: skip
    if meta["backend"] == "cpu":
        lines += ["**No Metal or CUDA here: the 'kernel' columns time the pure-MLX reference (the CPU path), "
                  "not a custom kernel.**", ""]  # fmt: skip
    if meta.get("note"):
        lines += [meta["note"], ""]
    failed = [k for k, ok in meta["verdicts"].items() if not ok]
    passed = len(meta["verdicts"]) - len(failed)
    outcome = "." if not failed else f"; FAILED (their rows time the MLX fallback): {', '.join(failed)}."
    return lines + [f"Kernel self-checks: {passed} of {len(meta['verdicts'])} shape classes agreed with the "
                    f"reference{outcome}", ""]  # fmt: skip


def qmm_lines(meta: dict, rows: list[dict]) -> list[str]:
    lines = [f"## qmm_small vs mx.quantized_matmul (K = {meta['K']}, N = {meta['N']})", "",
             "| bits | group | M | kernel us | kernel / kernel M=1 | mlx us | mlx / mlx M=1 | kernel / mlx |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    first = {(r["bits"], r["group_size"]): r for r in rows if r["M"] == 1}
    for r in rows:
        one = first[(r["bits"], r["group_size"])]
        lines.append(f"| {r['bits']} | {r['group_size']} | {r['M']} | {r['kernel_us']:.1f} | "
                     f"{r['kernel_us'] / one['kernel_us']:.2f}x | {r['mlx_us']:.1f} | "
                     f"{r['mlx_us'] / one['mlx_us']:.2f}x | {r['kernel_us'] / r['mlx_us']:.2f} |")  # fmt: skip
    four = {r["group_size"]: r["kernel_us"] / first[(2, r["group_size"])]["kernel_us"]
            for r in rows if r["bits"] == 2 and r["M"] == 4}  # fmt: skip
    if four:
        ratios = ", ".join(f"g{g}: {ratio:.2f}x" for g, ratio in four.items())
        lines += ["", f"Goal (2-bit, kernel M = 4 <= 1.3x M = 1): {ratios}."]
    return lines


def attention_lines(rows: list[dict]) -> list[str]:
    lines = ["## kv_attention vs dequantize + SDPA", "",
             "| model | heads / kv | head dim | S | L | kernel us | dequant+SDPA us | float-cache SDPA us | "
             "kernel / dequant+SDPA |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['heads']} / {r['kv_heads']} | {r['head_dim']} | {r['kv_len']} | {r['L']} | "
                     f"{r['kernel_us']:.1f} | {r['dequant_sdpa_us']:.1f} | {r['float_sdpa_us']:.1f} | "
                     f"{r['kernel_us'] / r['dequant_sdpa_us']:.2f} |")  # fmt: skip
    return lines


def markdown(meta: dict, qmm_rows: list[dict], attn_rows: list[dict], sweep_rows: list[dict]) -> str:
    lines = header_lines(meta) + qmm_lines(meta, qmm_rows) + [""] + attention_lines(attn_rows)
    if sweep_rows:
        lines += ["", "## Launch-shape sweep (defaults: qmm R=4 simdgroups=2, attention target groups=128)", "",
                  "| kernel | setting | case | us |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['kernel']} | {r['setting']} | {r['case']} | {r['us']:.1f} |" for r in sweep_rows]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="M = 1, 2, 4, 8, fewer cache lengths, group 128 only, short timings, no sweep")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="activation dtype (default: the model's compute dtype for this backend)")  # fmt: skip
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep (GPU only)")
    parser.add_argument("--only", choices=["qmm", "attention"], default=None,
                        help="time one kernel only (on CUDA each M / L is an NVRTC compile of seconds per process)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/<backend>-<device>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from afm_mlx.dtypes import compute_dtype

    dtype = getattr(mx, args.dtype) if args.dtype else compute_dtype()
    backend, device = device_label()
    budget, batch = TIMING["quick" if args.quick else "full"]
    groups = [128] if args.quick else [128, 64]
    lengths = QUICK_LENGTHS if args.quick else FULL_LENGTHS
    mx.random.seed(0)
    print(f"backend {backend}, device {device}, dtype {dtype}", flush=True)
    start = time.perf_counter()
    qmm_rows = bench_qmm(dtype, groups, QUICK_ROWS if args.quick else FULL_ROWS, budget, batch) \
        if args.only != "attention" else []
    attn_rows = bench_attention(dtype, lengths, budget, batch) if args.only != "qmm" else []
    sweep = backend != "cpu" and not args.no_sweep and not args.quick
    sweep_rows = sweep_qmm(dtype, budget, batch) + sweep_attention(dtype, budget, batch) if sweep else []
    meta = dict(backend=backend, device=device, dtype=str(dtype).removeprefix("mlx.core."), mlx=mx.__version__,
                K=K, N=N, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                mode="quick" if args.quick else "full",
                seconds=round(time.perf_counter() - start, 1),
                verdicts={str(k): v for k, v in dispatch.verdicts().items()})  # fmt: skip
    out = args.out or RESULTS / f"{backend}-{device}"
    result = dict(meta=meta, qmm=qmm_rows, attention=attn_rows, sweep=sweep_rows)
    write_atomically(out / "kernels.json", json.dumps(result, indent=1))
    write_atomically(out / "kernels.md", markdown(meta, qmm_rows, attn_rows, sweep_rows))
    print(f"wrote {out}/kernels.json and kernels.md ({meta['seconds']} s)")
    if any(v is False for v in meta["verdicts"].values()):
        print("warning: some kernels failed their self-check; their rows time the MLX fallback", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
