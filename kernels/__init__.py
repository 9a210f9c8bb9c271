"""Custom Metal / CUDA kernels for AFM decode and speculative verification (imported as afm_mlx.kernels).

- qmm_small / quantized_linear_small: x[M, K] @ dequant(W)^T for M = 1..8, affine 2/4-bit, optional fused LoRA.
- kv_attention / attention_int8: causal GQA attention of L = 1..8 queries over int8 K/V codes.
Each dispatches by backend (dispatch.backend()): the kernel on Metal or CUDA after a first-use self-check against
the pure-MLX reference, the reference itself on the CPU. Tolerances: tolerances.TOLERANCES.
"""

from .attention import attention_int8, kv_attention
from .dispatch import backend, force_backend, model_uses, set_enabled, verdicts
from .qmm import (SmallBatchQuantizedLinear, add_lora, lora_block_diagonal, qmm_small, quantized_linear_small,
                  use_small_batch_kernels)
from .reference import kv_attention_reference, qmm_small_reference
from .tolerances import TOLERANCES, Tolerance, within_tolerance

__all__ = [
    "TOLERANCES", "Tolerance", "attention_int8", "backend", "force_backend", "kv_attention", "lora_block_diagonal",
    "kv_attention_reference", "qmm_small", "qmm_small_reference", "quantized_linear_small", "set_enabled",
    "verdicts", "within_tolerance", "model_uses", "SmallBatchQuantizedLinear", "use_small_batch_kernels", "add_lora",
]  # fmt: skip
