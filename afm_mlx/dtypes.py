"""Dtype policy, in one place.

- CPU backend: float32. MLX's CPU kernels do fp16/bf16 arithmetic in software (~50x / ~9x slower
  quantized matmuls than fp32 on x86, see mlx-notes section 4).
- Metal: float16 (native on every Apple GPU; bfloat16 is emulated on M1/M2).
- CUDA: bfloat16 (the toolkit's own compute dtype; native on sm80+).
KV-quant scales always stay float32: tamm computes the fake-quant in fp32.
"""

import mlx.core as mx

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def compute_dtype() -> mx.Dtype:
    if mx.default_device() == mx.cpu:
        return mx.float32
    if mx.metal.is_available():
        return mx.float16
    return mx.bfloat16


def backend_name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"
