"""afm-mlx: Apple's on-device foundation model (AFMTextV7), its draft model and adapters on MLX.

    model, tokenizer = afm_mlx.load()            # the embedded demo family (or a converted model dir)
    result = afm_mlx.generate(model, tokenizer, "Tell me about the sea.", max_tokens=64)

Public names are imported lazily so `import afm_mlx` stays cheap for the CLI.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load": "afm_mlx.loading",
    "load_model": "afm_mlx.loading",
    "Model": "afm_mlx.model",
    "ModelArgs": "afm_mlx.model",
    "KVCache": "afm_mlx.cache",
    "AFMError": "afm_mlx.errors",
    "convert": "afm_mlx.converters",
    "generate": "afm_mlx.generation",
    "stream_generate": "afm_mlx.generation",
    "batch_generate": "afm_mlx.batch",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'afm_mlx' has no attribute {name!r}")


__all__ = list(_EXPORTS)
