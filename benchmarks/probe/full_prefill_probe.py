"""Probe (GPU session): which operation of the full-size 3B prefill raises MLX's CUDA-graph error.

The 3B bench stopped in its first prefill with `cuGraphAddKernelNode(...) failed: invalid argument`
(benchmarks/results/cuda-nvidia-h200/gpu_run.log); MLX reports such errors at mx.eval, not at the op. Here every
module call and every model-level helper (rope, int8_codes, attend, the K/V dequantisation) evaluates its inputs
and its output at once, so the first failure names the function, its module path and the shapes it saw. Then it
runs plain prefill at several lengths, and the mlx-lm afm7 mirror on the same weights.

    python benchmarks/probe/full_prefill_probe.py            # full size (1.2 GB of synthetic on-grid weights)
    python benchmarks/probe/full_prefill_probe.py --tiny     # rehearsal on any machine
"""

from __future__ import annotations

import sys
import traceback

import mlx.core as mx
import mlx.nn as nn

import afm_mlx.kv as KV
import afm_mlx.model as M
from afm_mlx import bench
from afm_mlx.presets import BASE_3B, tiny_base


def shapes(arrays) -> str:
    return ", ".join(f"{tuple(a.shape)}:{a.dtype}" for a in arrays if isinstance(a, mx.array))


def checked(name: str, fn):
    """fn with its array inputs and outputs evaluated on the spot; a failure is reported with `name`."""
    def run(*args, **kwargs):
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]
        mx.eval(inputs)
        try:
            out = fn(*args, **kwargs)
            mx.eval([o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, mx.array)])
        except RuntimeError as err:
            raise RuntimeError(f"{name} [inputs {shapes(inputs)}] -> {str(err).splitlines()[0]}") from None
        return out
    return run


def instrument(model: nn.Module) -> int:
    """Wrap the model-level helpers and every linear / norm module; returns how many modules were wrapped."""
    for module, name in ((M, "rope"), (M, "int8_codes"), (M, "attend"), (KV, "dequantize_int8")):
        setattr(module, name, checked(name, getattr(module, name)))
    wrapped = 0
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear, nn.RMSNorm)):
            module.__call__ = checked(f"{path} ({type(module).__name__})", module.__call__)
            cls = type(module)
            module.__class__ = type(cls.__name__, (cls,), {"__call__": lambda self, x: self.__dict__["__call__"](x)})
            wrapped += 1
    return wrapped


def trial(label: str, fn) -> bool:
    try:
        fn()
        print(f"{label}: ok", flush=True)
        return True
    except Exception as err:  # noqa: BLE001 - a probe reports every failure
        print(f"{label}: FAIL {err}", flush=True)
        if "-v" in sys.argv:
            traceback.print_exc()
        return False


def prefill(model, length: int, chunk: int = 512) -> None:
    cache = model.make_cache()
    model.prefill(mx.array([[(7 * i) % model.args.vocab_size for i in range(length)]]), cache, chunk)
    mx.eval(model(mx.array([[5]]), cache))


def main() -> None:
    tiny = "--tiny" in sys.argv
    model = bench.synthetic_model(tiny_base() if tiny else BASE_3B, group_size=32 if tiny else 128)
    print(mx.default_device(), mx.__version__, flush=True)
    for length in (7, 129, 512, 2048):
        trial(f"prefill {length}", lambda: prefill(model, length))
    trial("mlx-lm afm7 prefill 512", lambda: mirror_prefill(model, 512))
    print(f"instrumented {instrument(model)} modules and 4 helpers", flush=True)
    for length in (512, 2048):
        trial(f"instrumented prefill {length}", lambda: prefill(model, length))


def mirror_prefill(model, length: int) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    theirs = bench.mlx_lm_mirror(model)
    with bench.mlx_lm_patches():
        mx.eval(theirs(mx.array([list(range(length))]), cache=make_prompt_cache(theirs)))


if __name__ == "__main__":
    main()
