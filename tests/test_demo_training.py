"""The demo family's training code (benchmarks/demo/): toolkit key names, numerics against float64 NumPy
references written from docs/format.md, and the 2-bit grid that the converter's `auto` recipe must find exactly.

torch is a dev-only dependency; without it these tests are skipped (the runtime package never imports torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (dev dependency) trains the demo family")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "demo"))

import afm_torch  # noqa: E402
from afm_torch import AFMConfig, AFMText  # noqa: E402

TINY_BASE = AFMConfig(vocab_size=64, hidden_dim=128, num_layers=3, num_kv_reuse_layers=1, num_heads=2,
                      num_kv_heads=1, hidden_dim_scale_factor=2.0, lora_rank=4, lora_alpha=2.0)
TINY_DRAFT = AFMConfig(vocab_size=64, hidden_dim=64, num_layers=2, num_kv_reuse_layers=0, num_heads=4,
                       num_kv_heads=2, hidden_dim_scale_factor=3.0)
TINY_BASE_V2 = AFMConfig(vocab_size=400, hidden_dim=192, num_layers=3, num_kv_reuse_layers=1, num_heads=3,
                         num_kv_heads=1, hidden_dim_scale_factor=4.0, lora_rank=4, lora_alpha=2.0)  # v2's widths
TINY_DRAFT_V2 = AFMConfig(vocab_size=400, hidden_dim=64, num_layers=1, num_kv_reuse_layers=0, num_heads=2,
                          num_kv_heads=1, hidden_dim_scale_factor=4.0)  # the v2 draft's shape at one layer


def test_base_keys_are_the_toolkit_names():
    sd = AFMText(TINY_BASE).toolkit_state_dict()
    seg0 = "layers.segment_0.layer_1.attention."
    seg1 = "layers.segment_1.layer_0."
    expected = {
        "embedding.weight": (64, 128),
        seg0 + "norm.weight": (128,),
        seg0 + "qkv_transform.wrapped.fused_linear.weight": (256, 128),  # Q 128 | K 64 | V 64
        seg0 + "qkv_transform.adapters.base_adapter.lora_1.b_transpose": (4, 64),
        seg0 + "qk_norm.key_norm.weight": (64,),
        seg0 + "kv_quantizer.value_quantizer.activation_post_process.range": (2,),
        seg0 + "kv_quantizer.value_quantizer.activation_post_process.num_samples": (),
        seg0 + "output_transform.adapters.base_adapter.a_transpose": (128, 4),
        seg1 + "attention.q_transform.wrapped.weight": (128, 128),
        seg1 + "attention.q_norm.query_norm.weight": (64,),
        seg1 + "feed_forward.hidden_transform.linear_0.wrapped.weight": (256, 128),
        seg1 + "feed_forward.output_transform.wrapped.weight": (128, 256),
        "output_transform.weight": (64, 128),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("segment_1" in k and ("key_norm" in k or "kv_quantizer" in k) for k in sd)
    assert sd["output_transform.weight"].untyped_storage().data_ptr() == sd["embedding.weight"].untyped_storage().data_ptr()
    assert sd[seg0 + "kv_quantizer.key_quantizer.activation_post_process.num_samples"].dtype == torch.int64


def test_draft_keys_have_no_wrapped_or_segments():
    keys = list(AFMText(TINY_DRAFT).toolkit_state_dict())
    assert "layers.layer_1.attention.qkv_transform.fused_linear.weight" in keys
    assert "layers.layer_0.feed_forward.hidden_transform.linear_1.weight" in keys
    assert not any("wrapped" in k or "segment" in k or "adapters" in k for k in keys)


def test_rope_freqs_and_interleaved_rotation_match_float64_reference():
    head_dim, theta, length = 32, 500000.0, 7
    freqs = afm_torch.tamm_rope_freqs(head_dim, theta).numpy()
    ref_freqs = np.array([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)])
    np.testing.assert_allclose(freqs, ref_freqs.astype(np.float32), rtol=0, atol=0)
    x = np.random.default_rng(0).standard_normal((1, 2, length, head_dim))
    cos, sin = afm_torch.rope_cos_sin(length, head_dim, theta)
    out = afm_torch.apply_rope(torch.tensor(x, dtype=torch.float64), cos.double(), sin.double()).numpy()
    angles = np.arange(length)[:, None] * freqs.astype(np.float64)[None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    np.testing.assert_allclose(out[..., 0::2], even * np.cos(angles) - odd * np.sin(angles), atol=1e-6)
    np.testing.assert_allclose(out[..., 1::2], even * np.sin(angles) + odd * np.cos(angles), atol=1e-6)


def test_ema_observer_and_kv_fake_quant_follow_the_toolkit():
    fq = afm_torch.FakeQuantize().train()
    first = torch.tensor([[-2.0, 0.5, 3.0]])
    fq(first)  # first sample replaces the initial [-1, 1]
    np.testing.assert_array_equal(fq.activation_post_process.range.numpy(), [-2.0, 3.0])
    fq(torch.tensor([[-1.0, 1.0]]))  # then EMA with momentum 0.9
    np.testing.assert_allclose(fq.activation_post_process.range.numpy(), [-1.9, 2.8], rtol=1e-6)
    fq.eval()
    before = fq.activation_post_process.range.clone()
    x = torch.tensor([0.3, -1.7, 2.9, 100.0])
    out = fq(x).numpy()
    assert torch.equal(fq.activation_post_process.range, before)  # eval mode: observer frozen
    r = before.numpy()  # float32 [min, max]
    scale = np.max(r * np.array([1 / -128, 1 / 127], dtype=np.float32))  # sec. 4.6, all float32
    ref = np.clip(np.round(x.numpy() / scale), -128, 127) * scale
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    y = torch.tensor([0.3, 5.0], requires_grad=True)
    fq(y).sum().backward()
    np.testing.assert_array_equal(y.grad.numpy(), [1.0, 1.0])  # straight-through


@pytest.mark.parametrize("bits,group", [(2, 128), (4, 32), (4, 64), (2, 64)])  # base linears / embedding, v2 draft
def test_grid_snap_is_exact_idempotent_and_found_by_the_converter(bits, group):
    from afm_mlx.converters.quantize import QuantSetting, quantize_tensor

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(bits))
    snapped = afm_torch.affine_grid(w, bits, group)
    groups = snapped.reshape(16, -1, group).numpy()
    for g in groups.reshape(-1, group):
        levels = np.unique(g)
        assert 2 <= len(levels) <= 2**bits
        scale = (levels[-1] - levels[0]) / (2**bits - 1)
        assert np.float16(scale) == pytest.approx(scale, rel=1e-6) and float(np.float16(levels[0])) == levels[0]
    assert torch.equal(afm_torch.affine_grid(snapped, bits, group), snapped)
    packed = quantize_tensor(snapped.numpy(), QuantSetting(bits, group), recipe="auto")
    assert (packed.method, packed.bits, packed.group_size, packed.exact) == ("grid", bits, group, True)


def test_fake_quant_ste_forward_is_the_grid_and_backward_is_identity():
    w = torch.randn(4, 128, requires_grad=True)
    out = afm_torch.fake_quant_ste(w, 2, 128)
    assert torch.equal(out.detach(), afm_torch.affine_grid(w.detach(), 2, 128))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_kv_reuse_layers_attend_to_the_last_regular_layers_quantised_kv():
    torch.manual_seed(0)
    model = AFMText(TINY_BASE).eval()
    tokens = torch.randint(0, 64, (1, 5))
    logits = model(tokens)
    # Only the reuse layer reads the last regular layer's quantised K/V after that layer's own output, so a
    # changed K scale there must still change the logits (it would not if segment_1 recomputed its own K/V).
    last = model.regular_layers()[-1].attention.kv_quantizer.key_quantizer.activation_post_process
    last.range.mul_(3.0)
    assert not torch.allclose(model(tokens), logits)
    assert logits.shape == (1, 5, 64) and torch.isfinite(logits).all()


def test_swiglu_uses_linear_1_times_silu_of_linear_0():
    torch.manual_seed(0)
    ff = afm_torch.FeedForward(TINY_DRAFT, adapted=False)
    x = torch.randn(2, 3, 64, dtype=torch.float32)
    y = ff.norm(x)
    gate = y @ ff.hidden_transform.linear_0.weight.T
    up = y @ ff.hidden_transform.linear_1.weight.T
    ref = x + (up * gate * torch.sigmoid(gate)) @ ff.output_transform.weight.T
    torch.testing.assert_close(ff(x), ref)


def test_inverse_kl_is_kl_of_draft_from_target():
    sys.path.insert(0, str(Path(afm_torch.__file__).parent))
    import train

    target, draft = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    p_d = np.exp(draft.numpy()) / np.exp(draft.numpy()).sum(-1, keepdims=True)
    p_t = np.exp(target.numpy()) / np.exp(target.numpy()).sum(-1, keepdims=True)
    ref = np.mean(np.sum(p_d * (np.log(p_d) - np.log(p_t)), -1))
    assert float(train.inverse_kl(target, draft)) == pytest.approx(ref, rel=1e-5)
    assert math.isclose(float(train.inverse_kl(target, target)), 0.0, abs_tol=1e-6)


def mlx_logits(directory: Path, tokens: torch.Tensor) -> np.ndarray:
    import mlx.core as mx

    import afm_mlx

    model = afm_mlx.load(directory, draft=False)[0]
    return np.array(model(mx.array(tokens.numpy()), model.make_cache()).astype(mx.float32))


def test_v2_family_converts_exactly_and_matches_torch(tmp_path):
    """The v2 family's path at tiny size: a hidden-192 2-bit QAT base (its 192-input projections take groups of 64,
    the 768-input FFN output groups of 128) and a 4-bit g64 QAT draft with a 2-bit g64 embedding, exported in the
    toolkit's layout, go through `afm-mlx convert`'s `auto` recipe onto exact grids, and the loaded MLX models
    compute the torch models' logits."""
    from tokenizer_fixture import build_tiny_tokenizer

    from afm_mlx.converters import convert

    torch.manual_seed(0)
    base = AFMText(TINY_BASE_V2).eval()
    draft = AFMText(TINY_DRAFT_V2).eval()
    afm_torch.snap_weights_to_grid(base, bits=2, group_size=128, embed_bits=4, embed_group_size=32)
    afm_torch.snap_weights_to_grid(draft, bits=4, group_size=64, embed_bits=2, embed_group_size=64)
    assets = tmp_path / "assets"
    assets.mkdir()
    for model, name in ((base, "base-model.pt"), (draft, "draft-model.pt")):
        torch.save(model.toolkit_state_dict(), assets / name)
    build_tiny_tokenizer(assets)
    convert(assets, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    for part, embedding, linears in (("base", (4, 32), {(2, 64), (2, 128)}), ("draft", (2, 64), {(4, 64)})):
        assert report[part]["tensors_lossy"] == 0
        grids = {t["source"]: (t["bits"], t["group_size"]) for t in report[part]["tensors"] if t["storage"] == "grid"}
        assert grids.pop("embedding.weight") == embedding and set(grids.values()) == linears
    tokens = torch.tensor([[1, 5, 9, 33, 2, 17, 40, 63]])
    for model, directory in ((base, tmp_path / "out"), (draft, tmp_path / "out" / "draft")):
        with torch.no_grad():
            expected = model(tokens).numpy()
        np.testing.assert_allclose(mlx_logits(directory, tokens).reshape(expected.shape), expected,
                                   atol=2e-3, rtol=2e-3)
