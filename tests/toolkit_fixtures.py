"""Toolkit-format weights for tiny configs, and the MLX model built from them (through the converter's mapping)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from afm_mlx.converters.mapping import toolkit_to_mlx_arrays
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.loading import build_model


def toolkit_weights(args, seed=0, **options):
    """A toolkit (tamm-named) float32 state dict; draft layout when the config has no reuse layers."""
    draft = args.num_kv_reuse_layers == 0
    return synthetic_dict(args, seed=seed, draft=draft, kv_quant=args.kv_quant, **options)


def mlx_model_from_toolkit(state_dict, dtype=mx.float32):
    config, arrays = toolkit_to_mlx_arrays(state_dict)
    return build_model(config, {k: mx.array(v) for k, v in arrays.items()}, dtype)


STEP_TOKENS = [3, 17, 200, 5, 5, 99, 42, 7, 128, 1, 250, 64, 9, 33, 180, 2, 77, 140, 12, 201, 4]


def quantize_tiny(model):
    """2-bit g32 linears and a 4-bit g32 embedding (the production layout, at tiny sizes)."""
    nn.quantize(model, group_size=32, bits=2, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Embedding))
    return model


def decode_verify_logits(model) -> list[np.ndarray]:
    """Prefill 9 of STEP_TOKENS, then decode 1, verify 4 (num_logits=4), roll back 2, verify 8: each call's logits."""
    cache = model.make_cache()
    tokens = mx.array(STEP_TOKENS)[None]
    model.prefill(tokens[:, :9], cache)
    logits = [model(tokens[:, 9:10], cache), model(tokens[:, 10:14], cache, num_logits=4)]
    for c in cache:
        c.trim(2)
    logits.append(model(tokens[:, 12:20], cache))
    return [np.array(x.astype(mx.float32)) for x in logits]
