"""Tests for mutations that survived the suite before (issue #16, section 5): each would fail if the named line
changed the way the comment says."""

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.generation import PromptCache, generate
from afm_mlx.loading import build_model
from afm_mlx.presets import tiny_base
from afm_mlx.speculative import RoundTimer
from afm_mlx.stats import GenerationStats
from afm_mlx.tokenizer import load_tokenizer
from generation_fixtures import base_model, fresh_cache, noisy_copy
from reference import reference_forward
from tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (session fixture)
from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights

TOKENS = np.array([3, 17, 200, 5, 5, 99, 42, 7, 128, 1, 250, 64])


# ---- loading.cast_floats: kv-quant scales stay float32 in a half-precision model


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_kv_scales_stay_float32_when_the_model_is_cast(dtype):
    from afm_mlx.converters.mapping import toolkit_to_mlx_arrays

    config, arrays = toolkit_to_mlx_arrays(toolkit_weights(tiny_base(), seed=1))
    model = build_model(config, {k: mx.array(v) for k, v in arrays.items()}, dtype)
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == dtype  # the cast did happen
    for i, layer in enumerate(model.model.layers):
        for kind in ("key", "value"):
            scale = getattr(layer.self_attn, f"quant_{kind}_scale")
            assert scale.dtype == mx.float32  # tamm's fake-quant runs in fp32 (casting it rounds the scale)
            assert scale.item() == float(arrays[f"model.layers.{i}.self_attn.quant_{kind}_scale"])


# ---- the draft cache (and the base's) after prompt-cache reuse


def _assert_cache_holds(cache, model, ids):
    """`cache` holds exactly what one prefill of `ids` from scratch gives (codes within one rounding step)."""
    fresh = fresh_cache(model, ids)
    for ours, theirs in zip(cache, fresh):
        assert ours.offset == theirs.offset == len(ids)
        for a, b in zip(ours.state, theirs.state):
            diff = np.abs(np.array(a.astype(mx.float32)) - np.array(b.astype(mx.float32)))
            assert diff.max() <= 1.0 and diff.mean() < 0.05  # a shifted position would differ everywhere


@pytest.fixture(scope="module")
def family(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = base_model(vocab_size=tok.vocab_size, seed=4)
    return tok, model, noisy_copy(model)


def test_prompt_cache_keeps_base_and_draft_caches_aligned_across_calls(family):
    tok, model, draft = family
    cache = PromptCache(model, draft)
    prompt = tok.encode_prompt("Hello, how are you today?")
    for turn in range(3):
        result = generate(model, tok, prompt, max_tokens=10, draft_model=draft, prompt_cache=cache)
        assert result.stats.speculative.rounds > 0
        _assert_cache_holds(cache.base, model, cache.tokens)
        held = cache.draft[0].offset  # the draft may lag the base by the tokens it never saw, never lead it
        assert held <= len(cache.tokens)
        _assert_cache_holds(cache.draft, draft, cache.tokens[:held])
        prompt = prompt + result.tokens + tok.encode(f" turn {turn}", dummy_prefix=False)
        reused = cache.prefill(prompt)  # what the next call starts with: both caches hold prompt[:-1]
        assert reused > 0
        _assert_cache_holds(cache.base, model, prompt[:-1])
        _assert_cache_holds(cache.draft, draft, prompt[:-1])
    edited = prompt[:5] + [prompt[5] + 1] + prompt[6:]  # a shorter common prefix: both caches roll back first
    assert cache.prefill(edited) == 5
    _assert_cache_holds(cache.base, model, edited[:-1])
    _assert_cache_holds(cache.draft, draft, edited[:-1])


# ---- converters.quantize.pack_exact: the dequantize check is what makes "exact" true


def test_pack_exact_refuses_when_mlx_dequantize_disagrees(monkeypatch):
    from afm_mlx.converters import quantize
    from afm_mlx.converters.synthetic import grid_tensor

    w = grid_tensor(np.random.default_rng(0), (64, 128), bits=2, group=64, step=0.01)
    assert quantize.pack_exact(w, 2, 64) is not None
    real = quantize._dequantize_mx

    def one_ulp_off(*args):  # MLX's arithmetic disagreeing in the last bit of one value
        out = real(*args)
        out[0, 0] = np.nextafter(out[0, 0], np.float32(np.inf))
        return out

    monkeypatch.setattr(quantize, "_dequantize_mx", one_ulp_off)
    assert quantize.pack_exact(w, 2, 64) is None


# ---- statistics: exact values, not just positive ones


def test_round_timer_splits_by_the_measured_shares():
    timer = RoundTimer(every=4)
    assert [timer.is_timed(i) for i in range(6)] == [False, True, False, False, False, True]
    assert timer.split(10.0) == (None, None) and timer.cost_ratio is None
    timer.record(draft_s=0.3, verify_s=0.1, k=3)
    timer.record(draft_s=0.1, verify_s=0.5, k=2)
    draft_s, verify_s = timer.split(10.0)
    assert draft_s == pytest.approx(4.0) and verify_s == pytest.approx(6.0)  # 0.4 / 1.0 of the total
    assert timer.cost_ratio == pytest.approx(0.05 / 0.5)  # last timed round: draft per token / verify


def test_prefill_and_decode_rates_count_the_right_tokens():
    stats = GenerationStats(prompt_tokens=101, cached_prompt_tokens=20, generated_tokens=30, prefill_s=0.5,
                            decode_s=2.0)
    assert stats.prefill_tps == pytest.approx(160.0)  # 101 - 20 reused - 1 fed by decode = 80 tokens in 0.5 s
    assert stats.decode_tps == pytest.approx(15.0)
    assert GenerationStats(prompt_tokens=5, cached_prompt_tokens=4, prefill_s=0.1).prefill_tps == 0.0


# ---- K/V int8 codes: saturation at -128/127 and round-half-to-even ties


def _tamm_codes(x, scale):
    """tamm's fake_quantize on float32: x / scale, round half to even, clamp to [-128, 127]."""
    return np.clip(np.round(np.float32(x) / np.float32(scale)), -128, 127)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_kv_codes_round_ties_to_even_and_saturate(dtype):
    from afm_mlx.kv import int8_codes

    scale = np.float32(0.25)  # a power of two: every x below is exact in bf16 and x / scale is exact too
    ties = np.array([0.125, 0.375, 0.625, -0.125, -0.375, -0.625, 31.625, -31.875], np.float32)  # n + 0.5
    saturating = np.array([31.75, 31.875, 40.0, 1e4, -32.0, -32.125, -40.0, -1e4], np.float32)
    x = np.concatenate([ties, saturating])
    codes = np.array(int8_codes(mx.array(x).astype(dtype), mx.array(scale)))
    assert codes.tolist() == _tamm_codes(x, scale).astype(np.int8).tolist()
    assert codes[:8].tolist() == [0, 2, 2, 0, -2, -2, 126, -128]  # to even: not 1, 2, 3, -1, ...
    assert codes[8:].tolist() == [127, 127, 127, 127, -128, -128, -128, -128]


def test_model_with_saturating_kv_codes_matches_the_reference():
    args = tiny_base()
    sd = toolkit_weights(args, seed=1)
    for key in sd:
        if key.endswith(".range"):
            sd[key] = sd[key] * np.float32(0.02)  # a scale far below the K/V magnitudes: most codes clip
    model = mlx_model_from_toolkit(sd)
    cache = model.make_cache()
    model.prefill(mx.array(TOKENS)[None], cache)
    codes = np.concatenate([np.array(c.state[i]).ravel() for c in cache for i in (0, 1)])
    assert np.mean((codes == 127) | (codes == -128)) > 0.3  # the test does feed saturation to the model
    ours = np.array(model(mx.array(TOKENS)[None])[0])
    ref = reference_forward(sd, TOKENS, args.to_dict(), kv_quant=True)
    assert np.abs(ours - ref).max() <= 1e-4
