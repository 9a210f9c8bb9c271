"""Toolkit-format weights for tiny configs, and the MLX model built from them (through the converter's mapping)."""

import mlx.core as mx

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
