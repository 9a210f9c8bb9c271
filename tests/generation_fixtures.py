"""Tiny base/draft models for generation tests, with logits peaked enough for greedy text to vary.

Synthetic toolkit weights (std 0.02) give near-uniform logits and greedy decoding that repeats one token;
multiplying every matrix by `scale` gives varied, confident predictions, like a trained model's.
"""

import mlx.core as mx
from mlx.utils import tree_map

from afm_mlx.cache import KVCache
from afm_mlx.presets import tiny_base, tiny_draft
from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights

SCALE = 15.0


def scaled(model, scale=SCALE):
    model.update(tree_map(lambda w: w * scale if w.ndim == 2 else w, model.parameters()))
    mx.eval(model.parameters())
    return model


def base_model(vocab_size=256, seed=1, scale=SCALE, **config):
    return scaled(mlx_model_from_toolkit(toolkit_weights(tiny_base(vocab_size=vocab_size, **config), seed=seed)),
                  scale)


def draft_model(vocab_size=256, seed=2, scale=SCALE, **config):
    """A separately drawn draft: it agrees with the base no more than chance (many rejections)."""
    return scaled(mlx_model_from_toolkit(toolkit_weights(tiny_draft(vocab_size=vocab_size, **config), seed=seed)),
                  scale)


def noisy_copy(model, noise=0.03, seed=3):
    """The base with relative Gaussian noise on every matrix: a draft that is right some of the time."""
    copy = type(model)(model.args)
    mx.random.seed(seed)
    copy.update(tree_map(lambda w: w * (1 + noise * mx.random.normal(w.shape)) if w.ndim == 2 else w,
                         model.parameters()))
    mx.eval(copy.parameters())
    return copy


def fresh_cache(model, ids) -> list[KVCache]:
    """Caches holding `ids`, filled by one prefill from scratch."""
    cache = model.make_cache()
    if ids:
        model.prefill(mx.array([ids], dtype=mx.int32), cache)
    return cache
