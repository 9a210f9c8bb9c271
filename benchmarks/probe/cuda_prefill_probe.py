"""Probe (GPU session): which part of the model's prefill breaks MLX's CUDA graph (cuGraphAddKernelNode)."""
import mlx.core as mx

import afm_mlx.model as M
from afm_mlx.loading import load_model

model, _ = load_model("afm_mlx/demo_model")


def trial(name, length=129):
    try:
        cache = model.make_cache()
        model.prefill(mx.array([list(range(1, length + 1))]), cache)
        mx.eval(model(mx.array([[5]]), cache))
        print(name, length, "ok", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports every failure
        print(name, length, "FAIL", str(e)[:120], flush=True)


trial("default")
trial("default", 7)
M.int8_codes = lambda x, s: mx.clip(mx.round(x.astype(mx.float32) / s), -128, 127).astype(mx.int8)
M._dequantize_int8 = lambda c, s: c.astype(mx.float32) * s
trial("uncompiled-kv-helpers")
trial("uncompiled-kv-helpers", 7)
