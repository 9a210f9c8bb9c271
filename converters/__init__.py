"""Converters from Apple's adapter-toolkit checkpoints to MLX model directories (importable as afm_mlx.converters).

`convert(source, out, **options)` is the entry point (afm_mlx.converters.convert); the pieces are
torch_zip (reading .pt files without torch), mapping (toolkit names -> mlx-lm afm7 names), quantize
(exact-grid affine packing), writer (streaming safetensors) and synthetic (toolkit-format test checkpoints).
"""


def convert(*args, **kwargs):
    """See `afm_mlx.converters.pipeline.convert` (imported lazily: it pulls in MLX)."""
    from .pipeline import convert as _convert

    return _convert(*args, **kwargs)
