#!/usr/bin/env bash
# The benchmark on an NVIDIA GPU with MLX's CUDA backend, sized for ~8 minutes of device time (the default stages'
# limits add up to 450 s, 495 s when the prefill probe runs; one device call may run 600 s, and the tarball is made
# at the end). On a fresh machine MLX compiles every kernel on first use (NVRTC, seconds each): carry the PTX cache.
#   0. "kernels": the CUDA kernels' GPU tests, one process each, all at once (70 s on an H200, 10 of 10 passed);
#      "kernel-bench": benchmarks/kernels_bench.py --quick ($KERNEL_BENCH_ARGS, e.g. --only attention). Neither is
#      in the default STAGES any more: both have run (benchmarks/results/cuda-nvidia-h200/).
#   1. demo family: prefill at 32/128/512, 64-token decode, k = 1, 2, 4 at T = 0, adapter, 3 trials;
#   1b. benchmarks/probe/decode_probe.py: demo plain decode as shipped (the compiled step), built op by op as
#       before it ("eager"), and with an adapter, interleaved with mlx-lm, plus graph nodes and host time per
#       decode step (stage "probe"; "probe-full", not in the default stages: the same on the full-size 3B);
#   1c. benchmarks/probe/verify_probe.py: demo verify forwards at growing K/V lengths, attention over the valid
#       prefix (MLX's cuDNN: a graph per length) vs over the padded buffer (afm_mlx.kv, CUDA default);
#   2. full-size 3B base + 48.8M draft, synthetic on-grid weights: prefill at 128/1024, plain decode and k = 2 at
#      T = 0, then speculative decoding at controlled acceptance (alpha 0.6-0.9 x k 2-6: the real draft and
#      verify forwards, proposals set to the base's own greedy tokens with probability alpha) and its cost model
#      (draft step, verify by rows, decode step), adapter, 2 trials; if it fails,
#      benchmarks/probe/full_prefill_probe.py names the failing op.
#   3. opt-in (not in the default STAGES): "batchspec", benchmarks/batch_speculative_bench.py (the batch engine at
#      1 / 4 / 16 rows, k = 0 / 2 / 4: does speculation inside the batch pay where verify rows are nearly free?),
#      and "serve", benchmarks/serve_bench.py without mlx_lm.server at 1 and 16 clients (#17's GPU goal: >= 6x
#      single-stream aggregate at 16 clients).
# Results: $OUT/gpu_results.tar.gz (benchmarks/results/<backend>-<device>/...: JSON, markdown, PNGs), plus the
# two markdown tables and the log as loose files (the device tool returns at most 8 files from $OUT).
# Unpack here with:  tar xzf gpu_results.tar.gz -C benchmarks/results && python benchmarks/run_bench.py readme
#
# MLX's CUDA build is not on the device image and its wheel (90 MB) is larger than one call may carry, so it
# travels split, as the git-ignored folders .whl1/ (mlx, mlx-lm, part_aa) and .whl2/ (part_ab, part_ac):
#   call 1: carry [".whl1"], command `bash benchmarks/gpu_run.sh`  -> stashes the parts in /tmp/afm_whl, exits 3
#   call 2: carry [".whl2"], same command, right away (a machine stays warm only ~30 s after a call; /tmp/afm_whl
#           is gone on a fresh one)                                 -> joins, installs, benchmarks
# Make the folders here with `bash benchmarks/gpu_run.sh --fetch-wheels` (pip download + split).
# MLX's compiled kernels (PTX, MLX_PTX_CACHE_DIR) come back as $OUT/ptx_cache.tar.gz: put that file into .whl2/
# (21 MB unpacked: .whl2 and .ptx_cache together exceed one call's carry) and it is unpacked into .ptx_cache, so
# a fresh machine skips compiling MLX's own JIT kernels (fused elementwise etc.; not our custom kernels, which
# MLX compiles afresh in every process).
# Every stage has its own time limit, so a slow stage costs its result, not the whole run.
# STAGES (default "demo probe verify full") picks stages, e.g. STAGES="kernels kernel-bench".
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STASH=/tmp/afm_whl
CUDA_WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
CUDA_SHA256=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee
OUT_DIR=${OUT:-benchmarks/results/gpu-run}
# Hard limits per stage; the --time-budget inside each skips speculative settings that would end past it, so a
# stage normally ends well before its hard limit and always writes what it measured.
DEMO_LIMIT=${DEMO_LIMIT:-120}
FULL_LIMIT=${FULL_LIMIT:-240}  # 130 s before the controlled-acceptance grid (20 settings x 2 trials)
KERNEL_TEST_LIMIT=${KERNEL_TEST_LIMIT:-120}  # per test, all tests at once; the H100 finished 2 in 60 s run serially
KERNEL_BENCH_LIMIT=${KERNEL_BENCH_LIMIT:-100}  # qmm then attention: 16 NVRTC compiles of a few seconds
DECODE_PROBE_LIMIT=${DECODE_PROBE_LIMIT:-50}
FULL_PROBE_LIMIT=${FULL_PROBE_LIMIT:-90}
PROBE_LIMIT=${PROBE_LIMIT:-45}
VERIFY_LIMIT=${VERIFY_LIMIT:-40}
BATCHSPEC_LIMIT=${BATCHSPEC_LIMIT:-60}
SERVE_LIMIT=${SERVE_LIMIT:-90}
DEMO_ARGS=${DEMO_ARGS:---trials 3 --max-tokens 64 --ks 1,2,4 --temperatures 0 --time-budget 80}
FULL_ARGS=${FULL_ARGS:---no-demo --full --trials 2 --ks 2 --time-budget 180}
KERNEL_BENCH_ARGS=${KERNEL_BENCH_ARGS:-}  # e.g. --only attention
PROBE_ARGS=${PROBE_ARGS:---trials 3 --variants default,eager,adapter}
STAGES=" ${STAGES:-demo probe verify full} "
stage() { [[ "$STAGES" == *" $1 "* ]]; }

fetch_wheels() {  # run on the development machine: python 3.12 manylinux wheels, the CUDA one split in 40 MiB parts
  local tmp; tmp=$(mktemp -d)
  local platforms="--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$tmp" mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 || exit 1
  mkdir -p .whl1 .whl2
  cp "$tmp"/mlx-0.32.4-*.whl "$tmp"/mlx_lm-0.32.2-*.whl .whl1/
  (cd "$tmp" && split -b 40M "$CUDA_WHEEL" part_)
  mv "$tmp"/part_aa .whl1/ && mv "$tmp"/part_a[b-z] .whl2/
  grep -qx '/.whl1/' .git/info/exclude || printf '/.whl1/\n/.whl2/\n' >> .git/info/exclude
  rm -rf "$tmp"
  du -sh .whl1 .whl2
}

install_mlx_cuda() {
  mkdir -p "$STASH"
  cp -n .whl1/* .whl2/* "$STASH"/ 2>/dev/null
  local missing=""
  for f in part_aa part_ab part_ac; do [ -f "$STASH/$f" ] || missing="$missing $f"; done
  ls "$STASH"/mlx-0.32.4-*.whl "$STASH"/mlx_lm-0.32.2-*.whl >/dev/null 2>&1 || missing="$missing mlx/mlx-lm wheels"
  if [ -n "$missing" ]; then
    echo "MLX CUDA wheel parts stashed in $STASH; still missing:$missing -> run again carrying the other .whl folder"
    exit 3
  fi
  cat "$STASH"/part_a? > "$STASH/$CUDA_WHEEL"
  echo "$CUDA_SHA256  $STASH/$CUDA_WHEEL" | sha256sum -c --quiet || { echo "joined wheel is corrupt"; exit 4; }
  # One pip call for all three: mlx and mlx-cuda-13 both fill the mlx/ package directory.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$STASH"/mlx-0.32.4-*.whl "$STASH/$CUDA_WHEEL" "$STASH"/mlx_lm-0.32.2-*.whl || exit 4
}

use_repo_package() {  # afm_mlx.kernels / afm_mlx.converters live at the top of the repo (pyproject maps them)
  if [ -z "${AFM_GPU_RUN_REHEARSAL:-}" ] && ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1; then
    ln -sfn ../kernels afm_mlx/kernels && ln -sfn ../converters afm_mlx/converters
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

# One process per test, all at once: each test compiles its template instances with NVRTC (seconds each, one core),
# so run one after another they did not finish in 60 s on an H100 (all at once: 70 s on an H200). MLX never
# disk-caches custom kernels (custom_kernel.cpp: use_disk_cache false), only its own JIT kernels; each process
# keeps its own PTX cache (MLX writes the files in place, not atomically), merged into .ptx_cache afterwards.
run_kernel_tests_in_parallel() {
  local dir; dir=$(mktemp -d)
  local ids; ids=$($PY -m pytest --collect-only -p no:cacheprovider tests/test_kernels_cuda.py | grep '::')
  local i=0
  for id in $ids; do
    mkdir -p "$dir/ptx$i"
    (echo "$id"; MLX_PTX_CACHE_DIR="$dir/ptx$i" timeout "$KERNEL_TEST_LIMIT" \
      $PY -m pytest -p no:cacheprovider -rs "$id" 2>&1; echo "exit $?") > "$dir/test$i.log" &
    i=$((i + 1))
  done
  wait
  for log in "$dir"/test*.log; do
    if grep -q '^exit 0$' "$log"; then echo "$(head -1 "$log"): $(tail -2 "$log" | head -1)"
    else echo "---- $(head -1 "$log") FAILED:"; tail -40 "$log"; fi
  done
  cp -rn "$dir"/ptx*/. .ptx_cache/ 2>/dev/null
  rm -rf "$dir"
}

if [ "${1:-}" = "--fetch-wheels" ]; then fetch_wheels; exit 0; fi
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# AFM_GPU_RUN_REHEARSAL=1: run the same flow with whatever MLX is installed (e.g. the CPU backend, here).
if [ -z "${AFM_GPU_RUN_REHEARSAL:-}" ] && ! $PY -c "import mlx.core as mx, mlx_lm; assert mx.cuda.is_available()" 2>/dev/null; then
  install_mlx_cuda
fi
use_repo_package
mkdir -p "$OUT_DIR" .ptx_cache
for carried in .whl1/ptx_cache.tar.gz .whl2/ptx_cache.tar.gz; do [ -f "$carried" ] && tar xzf "$carried" -C .ptx_cache; done
export MLX_PTX_CACHE_DIR="$PWD/.ptx_cache"
echo "PTX cache: $(find .ptx_cache -name '*.ptx' | wc -l) kernels carried in"
LOG="$OUT_DIR/gpu_run.log"
RESULTS=$(mktemp -d)/results
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv
  $PY -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device(), mx.device_info())" || exit 5
  if stage kernels; then
    echo "== CUDA kernels: tests vs the float64 oracle, one process each (limit ${KERNEL_TEST_LIMIT}s)"
    run_kernel_tests_in_parallel
  fi
  if stage kernel-bench; then
    echo "== CUDA kernels: timings against MLX's own ops (limit ${KERNEL_BENCH_LIMIT}s)"
    timeout "$KERNEL_BENCH_LIMIT" $PY benchmarks/kernels_bench.py --quick $KERNEL_BENCH_ARGS --out "$RESULTS/_machine_"
  fi
  if [ ! -f afm_mlx/demo_model/config.json ]; then
    echo "== demo family skipped: afm_mlx/demo_model is not in this checkout"
  else
    if stage demo; then
      echo "== demo family (limit ${DEMO_LIMIT}s)"
      timeout "$DEMO_LIMIT" $PY benchmarks/run_bench.py $DEMO_ARGS --out "$RESULTS/_machine_"
    fi
    if stage probe; then
      echo "== demo decode variants next to mlx-lm (limit ${DECODE_PROBE_LIMIT}s)"
      timeout "$DECODE_PROBE_LIMIT" $PY benchmarks/probe/decode_probe.py $PROBE_ARGS
    fi
    if stage verify; then
      echo "== verify cost at growing K/V lengths, prefix vs padded attention (limit ${VERIFY_LIMIT}s)"
      timeout "$VERIFY_LIMIT" $PY benchmarks/probe/verify_probe.py --rounds 40
    fi
    if stage batchspec; then
      echo "== speculative decoding inside the batch engine (limit ${BATCHSPEC_LIMIT}s)"
      timeout "$BATCHSPEC_LIMIT" $PY benchmarks/batch_speculative_bench.py --trials 2 --out "$RESULTS/_machine_/serve"
    fi
    if stage serve; then
      echo "== afm-mlx serve vs the bare batched forward at 1 and 16 clients (limit ${SERVE_LIMIT}s)"
      timeout "$SERVE_LIMIT" $PY benchmarks/serve_bench.py --no-mlx-lm --clients 1,16 --trials 1 \
        --out "$RESULTS/_machine_/serve"
    fi
  fi
  if stage probe-full; then
    echo "== full-size decode variants next to mlx-lm (limit ${FULL_PROBE_LIMIT}s)"
    timeout "$FULL_PROBE_LIMIT" $PY benchmarks/probe/decode_probe.py --workload full $PROBE_ARGS
  fi
  if stage full; then
    echo "== full size, synthetic weights (limit ${FULL_LIMIT}s)"
    if ! timeout "$FULL_LIMIT" $PY benchmarks/run_bench.py $FULL_ARGS --out "$RESULTS/_machine_"; then
      echo "== the full-size stage failed: probing its prefill op by op (limit ${PROBE_LIMIT}s)"
      timeout "$PROBE_LIMIT" $PY benchmarks/probe/full_prefill_probe.py
    fi
  fi
} 2>&1 | tee "$LOG"
# Name the results folder after the machine, as afm-mlx bench would by default.
SLUG=$($PY -c "from afm_mlx.bench import machine_info, machine_slug; print(machine_slug(machine_info()))")
if [ -d "$RESULTS/_machine_" ]; then
  mv "$RESULTS/_machine_" "$RESULTS/$SLUG"
  tar czf "$OUT_DIR/gpu_results.tar.gz" -C "$RESULTS" "$SLUG"
  cp "$RESULTS/$SLUG"/*.md "$OUT_DIR"/ 2>/dev/null
fi
tar czf "$OUT_DIR/ptx_cache.tar.gz" -C .ptx_cache . 2>/dev/null
if [ "$(stat -c %s "$OUT_DIR/ptx_cache.tar.gz" 2>/dev/null || echo 0)" -gt 16000000 ]; then
  echo "PTX cache tarball over the 16 MB a returned file may have: not returned"; rm -f "$OUT_DIR/ptx_cache.tar.gz"
fi
ls -la "$OUT_DIR"
