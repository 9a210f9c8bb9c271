"""Peak memory and time of converting a full-size base checkpoint (issue 3: peak RSS <= 3 GB).

Writes a synthetic toolkit `base-model.pt` of the real size (3.18 B parameters, 12.7 GB float32, linears on a
2-bit grid, embedding on a 4-bit grid, tied head, LoRA B = 0, kv-quant buffers) with the streaming torch-zip
writer, then converts it in a fresh subprocess and reads that process's peak RSS (ru_maxrss). Needs ~16 GB of
free disk in --workdir.

    python benchmarks/convert_memory.py [--workdir /tmp] [--keep] [--draft]

Writes benchmarks/results/convert_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "convert_memory.json"

_GENERATE = """
import sys, time
from afm_mlx.converters.synthetic import synthetic_thunks
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.presets import BASE_3B, DRAFT_48M
path, which = sys.argv[1], sys.argv[2]
config, draft = (BASE_3B, False) if which == "base" else (DRAFT_48M, True)
t = time.perf_counter()
save_checkpoint(path, synthetic_thunks(config, seed=0, grid=True, draft=draft),
                tie={"output_transform.weight": "embedding.weight"})
print(time.perf_counter() - t)
"""

_CONVERT = """
import json, resource, sys, time
from afm_mlx.converters import convert
base, out = sys.argv[1], sys.argv[2]
draft = sys.argv[3] if len(sys.argv) > 3 else None
t = time.perf_counter()
result = convert(base=base, draft=draft, out=out)
seconds = time.perf_counter() - t
report = result.report["base"]
print(json.dumps({
    "seconds": seconds,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: kB
    "source_bytes": report["source_bytes"], "output_bytes": report["output_bytes"],
    "tensors_exact": report["tensors_exact"], "tensors_lossy": report["tensors_lossy"],
}))
"""


def run_python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"subprocess failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the 12.7 GB checkpoint goes")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    parser.add_argument("--draft", action="store_true", help="also write and convert a full-size draft")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="afm-convert-bench-", dir=args.workdir))
    try:
        base = work / "base-model.pt"
        gen_seconds = float(run_python(_GENERATE, str(base), "base"))
        file_bytes = base.stat().st_size
        print(f"wrote {base} ({file_bytes / 1e9:.2f} GB) in {gen_seconds:.0f} s", flush=True)
        convert_args = [str(base), str(work / "out")]
        if args.draft:
            draft = work / "draft-model.pt"
            run_python(_GENERATE, str(draft), "draft")
            convert_args.append(str(draft))
        measured = json.loads(run_python(_CONVERT, *convert_args))
        outputs = sorted(p.name for p in (work / "out").iterdir())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "convert full-size synthetic base (2-bit grid linears, 4-bit grid embedding)",
        "checkpoint_file_gb": round(file_bytes / 1e9, 3),
        "converted_tensor_gb": round(measured["source_bytes"] / 1e9, 3),  # without LoRA and kv buffers
        "generate_seconds": round(gen_seconds, 1),
        "convert_seconds": round(measured["seconds"], 1),
        "peak_rss_gb": round(measured["peak_rss_bytes"] / 1e9, 3),
        "goal_peak_rss_gb": 3.0,
        "output_gb": round(measured["output_bytes"] / 1e9, 3),
        "tensors_exact": measured["tensors_exact"],
        "tensors_lossy": measured["tensors_lossy"],
        "with_draft": args.draft,
        "outputs": outputs,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
