"""Backend choice, lazy kernel construction, and the first-use self-check with fallback to the reference.

- `backend()` is "metal" on Apple GPUs, "cuda" on NVIDIA GPUs, else "cpu" (also when the default device is the
  CPU, AFM_MLX_KERNELS=0 or `set_enabled(False)`): on "cpu" every entry point returns the pure-MLX reference.
- Kernels are built on first use: `mx.fast.cuda_kernel` raises on a machine without CUDA, and building a Metal
  kernel JITs a library, so neither happens at import.
- The first call for each shape class (kernel, dtype, template arguments) also runs the float32 reference and
  compares with the tolerance table (float32 kernels: float16's row while MLX may run that reference in TF32,
  see tolerances.self_check_dtype); a kernel that disagrees or fails is replaced by the reference for the rest
  of the process, with one warning. Tests route "metal" through the CPU emulator by replacing `FACTORIES["metal"]`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .tolerances import self_check_dtype, within_tolerance

HERE = Path(__file__).resolve().parent

# name -> callable with mx.fast.metal_kernel's / cuda_kernel's keyword arguments; looked up at build time
FACTORIES: dict[str, Callable] = {
    "metal": lambda **kw: mx.fast.metal_kernel(**kw),
    "cuda": lambda **kw: mx.fast.cuda_kernel(**kw),
}
SOURCE_SUFFIX = {"metal": ".metal", "cuda": ".cu"}

# Backends on which the model routes through each kernel; elsewhere it uses MLX's own ops (mx.quantized_matmul,
# dequantise + SDPA). Neither on CUDA, where both measured slower in the model:
# - qmm_small: 57.8 us vs MLX's 17.9 us at M = 1 on an H200, slower up to M = 5 (2-bit g128, K = 2048,
#   N = 6656, bf16; benchmarks/results/cuda-nvidia-h200/gpu_run.log); the demo decoded at 243 tok/s with it, 722
#   without.
# - kv_attention: the demo decoded at 724 tok/s with it, 858 with dequantise + SDPA on an H100 (5 paired
#   trials, benchmarks/results/cuda-nvidia-h100-80gb-hbm3/gpu_run-1.log): its two launches and their scalar
#   inputs cost ~30 us of host time per call, more than reading int8 instead of bf16 K/V saves at those lengths.
# Metal is unmeasured (no Apple GPU here); the kernels are kept there for the verification rows.
MODEL_BACKENDS: dict[str, tuple[str, ...]] = {"qmm_small": ("metal",), "kv_attention": ("metal",)}

_enabled = os.environ.get("AFM_MLX_KERNELS", "1") not in ("0", "false", "off")
_forced_backend: str | None = None
_built: dict[tuple[str, str], object] = {}
_verdicts: dict[tuple, bool] = {}


def backend() -> str:
    """'metal', 'cuda' or 'cpu': which kernel family the entry points use now."""
    if not _enabled:
        return "cpu"
    if _forced_backend is not None:
        return _forced_backend
    if mx.default_device() == mx.cpu:  # the model runs on the CPU: no GPU kernels
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


def model_uses(kernel: str) -> bool:
    """Whether the model routes through `kernel` ("qmm_small", "kv_attention") on the current backend."""
    return backend() in MODEL_BACKENDS[kernel]


def set_enabled(enabled: bool) -> None:
    """Turn the custom kernels on or off for this process (off: the pure-MLX reference everywhere)."""
    global _enabled
    _enabled = enabled


def force_backend(name: str | None) -> None:
    """Pretend to run on `name` ('metal', 'cuda', 'cpu'), or None to detect again. For tests and benchmarks."""
    global _forced_backend
    if name not in (None, "metal", "cuda", "cpu"):
        raise ValueError(f"unknown backend {name!r}")
    _forced_backend = name
    reset()


def reset() -> None:
    """Forget built kernels and self-check verdicts (after swapping a factory)."""
    _built.clear()
    _verdicts.clear()


def verdicts() -> dict[tuple, bool]:
    """Self-check results so far: shape class -> kernel agreed with the reference."""
    return dict(_verdicts)


def body(stem: str, which: str) -> str:
    """The kernel body in kernels/<stem>.metal or .cu (the file's leading // comment block is kept)."""
    return (HERE / f"{stem}{SOURCE_SUFFIX[which]}").read_text()


def header(which: str) -> str:
    """Helpers the bodies share: CUDA conversions and warp reductions; Metal needs none beyond MLX's own."""
    return (HERE / "cuda_helpers.h").read_text() if which == "cuda" else ""


def kernel(stem: str, which: str, input_names: list[str], output_names: list[str]):
    """The kernel object for kernels/<stem> on backend `which`, built once per process."""
    key = (stem, which)
    if key not in _built:
        _built[key] = FACTORIES[which](
            name=f"afm_{stem}", input_names=input_names, output_names=output_names,
            source=body(stem, which), header=header(which),
        )  # fmt: skip
    return _built[key]


def checked(shape_class: tuple, run_kernel: Callable[[], mx.array], run_oracle: Callable[[], mx.array],
            run_fallback: Callable[[], mx.array], dtype: mx.Dtype) -> mx.array:  # fmt: skip
    """run_kernel(), verified against run_oracle() (float32 reference) the first time `shape_class` is seen.

    A kernel that raises or disagrees is retired for that shape class: run_fallback() from then on.
    """
    verdict = _verdicts.get(shape_class)
    if verdict is False:
        return run_fallback()
    if verdict is True:
        return run_kernel()
    try:
        out = run_kernel()
        mx.eval(out)
        ok, detail = within_tolerance(out, run_oracle(), self_check_dtype(dtype, backend()))
    except Exception as err:  # a kernel that does not build or run must not take the model down
        if "transformations" in str(err):  # inside mx.compile / vmap: cannot check now, check on an eager call
            return run_fallback()
        ok, detail = False, f"{type(err).__name__}: {err}"
    _verdicts[shape_class] = ok
    if ok:
        return out
    warnings.warn(f"afm_mlx.kernels: {shape_class} failed its self-check ({detail}); using the MLX reference",
                  RuntimeWarning, stacklevel=3)  # fmt: skip
    return run_fallback()
