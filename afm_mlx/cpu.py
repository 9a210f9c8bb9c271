"""MLX's CPU backend, made to use the machine: it runs each op on its stream's one thread, and runs rms_norm and
rope (GPU kernels elsewhere) as graphs of a dozen small ops. On the CPU, after loading:

- A matmul call with at least PARALLEL_MIN_MACS multiply-adds is split by output rows over one CPU stream per
  core (each stream has its own thread) and the parts concatenated. Each output element is computed by the same
  op from the same inputs, so results are bit-identical. On 2 cores: the demo head (8192 x 256, 4-bit, one row)
  1.9 -> 1.0 ms, a 3B 2048 x 6656 2-bit linear 11.9 -> 6.1 ms. Smaller calls stay whole: splitting the demo's
  one-row 256 x 768 calls too cost 2.3 ms a step in cross-stream waits. MLX's CPU matmuls cost rows x weights
  (float ones too), so verification (k + 1 rows) and prefill calls qualify where decode calls do not.
- rms_norm runs mx.compile'd, which fuses its fallback graph: 0.3 ms of the demo's 8 ms step, measured before
  decode steps ran compiled as a whole (afm_mlx.step). RoPE is model.rope, compiled on every backend.
AFM_MLX_CPU_STREAMS=1 turns the splitting off (default: one stream per core, at most MAX_STREAMS).
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

# rows x N x K. The demo's one-row calls (<= 0.2M) stay whole but its head (2.1M) splits; with 2 rows its
# 256 x 512 and 256 x 768 linears split too, which took a 2-row demo verify from 12.3 to 9.9 ms (1 << 20: no
# linear splits below 6 rows).
PARALLEL_MIN_MACS = 1 << 18
MAX_STREAMS = 4


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def stream_count() -> int:
    """Streams a split matmul uses: AFM_MLX_CPU_STREAMS, else the cores this process may run on (<= MAX_STREAMS)."""
    setting = os.environ.get("AFM_MLX_CPU_STREAMS")
    return max(1, int(setting)) if setting else min(_cores(), MAX_STREAMS)


@lru_cache(maxsize=1)
def _cores() -> int:  # a syscall (~50 us) on Linux: once per process
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache(maxsize=None)
def _streams(count: int) -> tuple[mx.Stream, ...]:  # thread-local: the server decodes on a thread of its own
    return tuple(mx.new_thread_local_stream(mx.cpu) for _ in range(count - 1))


def row_parallel(matmul, x: mx.array, module: nn.Module, names: tuple[str, ...]) -> mx.array:
    """matmul(x, *weights, stream) -> [..., N] for x [..., K] and module's `names` weights (all [N, ...]): when
    large enough, as row blocks of the weights on parallel CPU streams, concatenated (the first block on the
    default stream)."""
    weights = tuple(module[name] for name in names)
    n = weights[0].shape[0]
    parts = min(stream_count(), n) if x.size * n >= PARALLEL_MIN_MACS and on_cpu() else 1
    if parts < 2:
        return matmul(x, *weights, None)
    streams = (None, *_streams(parts))
    return mx.concatenate([matmul(x, *block, s) for block, s in zip(_row_blocks(module, weights, parts), streams)],
                          axis=-1)


def _row_blocks(module: nn.Module, weights: tuple[mx.array, ...], parts: int) -> list[tuple[mx.array, ...]]:
    """The weights cut into `parts` row blocks: evaluated views (no copy), kept on the module while its weights
    are these very arrays, so a decode step adds no slicing to the graph."""
    cached = module.__dict__.get("_row_blocks")
    if cached is None or cached[1] != parts or any(a is not b for a, b in zip(cached[0], weights)):
        n = weights[0].shape[0]
        bounds = [n * i // parts for i in range(parts + 1)]
        blocks = [tuple(w[lo:hi] for w in weights) for lo, hi in zip(bounds, bounds[1:])]
        try:
            mx.eval(blocks)
        except ValueError as err:  # traced weights (mx.compile with the model state as inputs): slice lazily
            if "transformations" not in str(err):
                raise
            return blocks
        cached = (weights, parts, blocks)
        object.__setattr__(module, "_row_blocks", cached)  # not a parameter
    return cached[2]


def _quantized(module: nn.Module):
    def matmul(x, w, scales, biases, stream):
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=module.group_size,
                                   bits=module.bits, mode=module.mode, stream=stream)
    return matmul


def _float(x: mx.array, w: mx.array, stream) -> mx.array:
    return mx.matmul(x, w.T, stream=stream)


QUANTIZED, FLOAT = ("weight", "scales", "biases"), ("weight",)


class ParallelQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = row_parallel(_quantized(self), x, self, QUANTIZED)
        return y + self["bias"] if "bias" in self else y


class ParallelLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        y = row_parallel(_float, x, self, FLOAT)
        return y + self["bias"] if "bias" in self else y


class ParallelQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:  # the tied head
        return row_parallel(_quantized(self), x, self, QUANTIZED)


class ParallelEmbedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return row_parallel(_float, x, self, FLOAT)


@lru_cache(maxsize=None)
def _fused_rms_norm(eps: float):
    return mx.compile(lambda x, weight=None: mx.fast.rms_norm(x, weight, eps))


class FusedRMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        return _fused_rms_norm(self.eps)(x, self["weight"]) if on_cpu() else super().__call__(x)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """mx.fast.rms_norm, compiled on the CPU (weight None: the norm alone, for a caller applying its own)."""
    if not on_cpu():
        return mx.fast.rms_norm(x, weight, eps)
    return _fused_rms_norm(eps)(x) if weight is None else _fused_rms_norm(eps)(x, weight)


PARALLEL_CLASSES = {nn.QuantizedLinear: ParallelQuantizedLinear, nn.Linear: ParallelLinear,
                    nn.QuantizedEmbedding: ParallelQuantizedEmbedding, nn.Embedding: ParallelEmbedding}


def tune_for_cpu(model: nn.Module) -> dict[str, int]:
    """Swap classes in place (parameters untouched): affine matmuls -> row-parallel, RMSNorm -> fused.

    Returns how many modules of each kind were swapped. Run after loading and before adapters wrap.
    """
    counts = {"parallel": 0, "fused_norms": 0}
    for _, module in model.named_modules():
        kind = PARALLEL_CLASSES.get(type(module))
        if kind is not None and getattr(module, "mode", "affine") == "affine":
            module.__class__ = kind
            counts["parallel"] += 1
        elif type(module) is nn.RMSNorm:
            module.__class__ = FusedRMSNorm
            counts["fused_norms"] += 1
    return counts
