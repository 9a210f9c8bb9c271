"""AFMTextV7 in MLX against the float64 NumPy reference (tests/reference.py) and mlx-lm's afm7."""

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.cache import KVCache
from afm_mlx.errors import AFMError
from afm_mlx.model import ModelArgs
from afm_mlx.presets import tiny_base, tiny_draft
from reference import reference_forward
from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights

CONFIGS = {
    "reuse-kvquant-gqa2": tiny_base(),
    "reuse-kvquant-gqa4": tiny_base(num_heads=8, num_kv_heads=2),
    "reuse-float-kv": tiny_base(kv_quant=False),
    "no-reuse-kvquant": tiny_base(num_kv_reuse_layers=0),
    "draft-gqa2-float-kv": tiny_draft(),
}
TOKENS = np.array([3, 17, 200, 5, 5, 99, 42, 7, 128, 1, 250, 64])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_float64_reference(name):
    args = CONFIGS[name]
    sd = toolkit_weights(args, seed=1)
    model = mlx_model_from_toolkit(sd)
    assert model.args.kv_quant == args.kv_quant
    ours = np.array(model(mx.array(TOKENS)[None])[0])
    ref = reference_forward(sd, TOKENS, args.to_dict(), kv_quant=args.kv_quant)
    assert np.abs(ours - ref).max() <= 1e-4


def test_kv_quant_changes_logits():
    # Guards the test above: with realistic scales the fake-quant must matter, or it tests nothing.
    args = CONFIGS["reuse-kvquant-gqa2"]
    sd = toolkit_weights(args, seed=1)
    with_q = reference_forward(sd, TOKENS, args.to_dict(), kv_quant=True)
    without = reference_forward(sd, TOKENS, args.to_dict(), kv_quant=False)
    assert np.abs(with_q - without).max() > 1e-3


def _mlx_lm_model(args, model):
    from mlx_lm.models import afm7

    theirs = afm7.Model(afm7.ModelArgs.from_dict(args.to_dict()))
    theirs.load_weights(list(dict(_flat(model.parameters())).items()), strict=True)
    return theirs


def _flat(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


@pytest.mark.parametrize("name", ["reuse-kvquant-gqa2", "reuse-kvquant-gqa4"])
def test_parity_with_mlx_lm_afm7(name):
    args = CONFIGS[name]
    model = mlx_model_from_toolkit(toolkit_weights(args, seed=2))
    theirs = _mlx_lm_model(args, model)
    tokens = mx.array(TOKENS)[None]
    ours, ref = model(tokens), theirs(tokens)
    assert np.array_equal(np.array(ours.argmax(-1)), np.array(ref.argmax(-1)))
    assert mx.abs(ours - ref).max().item() <= 1e-3


def _decode_one_by_one(model, tokens, cache):
    return mx.concatenate([model(tokens[:, i:i + 1], cache) for i in range(tokens.shape[1])], axis=1)


@pytest.mark.parametrize("name", ["reuse-kvquant-gqa2", "draft-gqa2-float-kv"])
def test_cached_decode_equals_full_forward(name):
    model = mlx_model_from_toolkit(toolkit_weights(CONFIGS[name], seed=3))
    tokens = mx.array(TOKENS)[None]
    full = model(tokens)
    stepped = _decode_one_by_one(model, tokens, model.make_cache())
    assert mx.abs(full - stepped).max().item() <= 1e-4
    cache = model.make_cache()
    model.prefill(tokens[:, :9], cache, chunk_size=4)  # chunks of 4, 4, 1
    rest = model(tokens[:, 9:], cache)
    assert mx.abs(full[:, 9:] - rest).max().item() <= 1e-4
    assert all(c.offset == len(TOKENS) for c in cache)


def test_num_logits_runs_head_only_for_last_positions():
    model = mlx_model_from_toolkit(toolkit_weights(CONFIGS["reuse-kvquant-gqa2"], seed=4))
    tokens = mx.array(TOKENS)[None]
    last = model(tokens, num_logits=3)
    assert last.shape == (1, 3, model.args.vocab_size)
    assert mx.abs(model(tokens)[:, -3:] - last).max().item() <= 1e-5


def test_prefill_never_runs_the_vocab_head(monkeypatch):
    model = mlx_model_from_toolkit(toolkit_weights(CONFIGS["reuse-kvquant-gqa2"], seed=4))
    def boom(*a, **k):
        raise AssertionError("prefill must not run the head or the reuse layers")
    monkeypatch.setattr(model.model, "reuse", boom)
    model.prefill(mx.array(TOKENS)[None], model.make_cache(), chunk_size=5)


@pytest.mark.parametrize("name", ["reuse-kvquant-gqa2", "draft-gqa2-float-kv"])
def test_trim_then_redecode_equals_fresh_prefill(name):
    model = mlx_model_from_toolkit(toolkit_weights(CONFIGS[name], seed=5))
    tokens = mx.array(TOKENS)[None]
    cache = model.make_cache()
    model.prefill(tokens, cache)
    assert all(c.trim(4) == 4 for c in cache)
    other = mx.array([[11, 12]])
    after_trim = model(other, cache)
    fresh_cache = model.make_cache()
    model.prefill(tokens[:, :-4], fresh_cache)
    fresh = model(other, fresh_cache)
    assert mx.abs(after_trim - fresh).max().item() == 0.0
    for a, b in zip(cache, fresh_cache):
        assert all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state))


def test_int8_cache_holds_codes():
    model = mlx_model_from_toolkit(toolkit_weights(CONFIGS["reuse-kvquant-gqa2"], seed=6))
    cache = model.make_cache()
    model.prefill(mx.array(TOKENS)[None], cache)
    args = model.args
    assert cache[0].keys.dtype == mx.int8
    assert cache[0].nbytes == 2 * args.num_kv_heads * args.head_dim * len(TOKENS)
    assert len(cache) == args.num_regular_layers


def test_cache_grows_in_steps_and_trims():
    cache = KVCache()
    k = mx.ones((1, 2, 300, 8), mx.int8)
    cache.update_and_fetch(k, k)
    assert cache.keys.shape[2] == 512 and cache.offset == 300
    assert cache.trim(1000) == 300 and cache.offset == 0


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=5), "must divide hidden_dim"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(num_kv_reuse_layers=4), "num_kv_reuse_layers"),
    (dict(model_type="llama"), "model_type"),
])
def test_config_validation(bad, message):
    config = {**tiny_base().to_dict(), **bad}
    with pytest.raises(AFMError, match=message):
        ModelArgs.from_dict(config)


def test_config_requires_fields_and_defaults_theta():
    config = tiny_base().to_dict()
    del config["rope_theta"]
    assert ModelArgs.from_dict(config).rope_theta == 500000.0
    del config["num_heads"]
    with pytest.raises(AFMError, match="num_heads"):
        ModelArgs.from_dict(config)
