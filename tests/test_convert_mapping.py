"""Toolkit -> afm7 name mapping and synthetic checkpoints (no MLX, no torch except the scale cross-check)."""

import numpy as np
import pytest

from afm_mlx.converters.mapping import (
    kv_scale_from_range,
    map_toolkit_state_dict,
    target_shapes,
    toolkit_to_mlx_arrays,
)
from afm_mlx.converters.synthetic import grid_tensor, synthetic_dict, synthetic_thunks
from afm_mlx.errors import AFMError

TINY = dict(vocab_size=96, hidden_dim=64, num_layers=3, num_kv_reuse_layers=1, num_heads=4, num_kv_heads=2,
            hidden_dim_scale_factor=1.5)
TINY_DRAFT = dict(TINY, num_layers=2, num_kv_reuse_layers=0, num_heads=2, num_kv_heads=1, hidden_dim_scale_factor=2.0)
BASE = dict(vocab_size=153600, hidden_dim=2048, num_layers=56, num_kv_reuse_layers=21, num_heads=16,
            num_kv_heads=2, hidden_dim_scale_factor=3.25)


def test_full_size_layout_matches_spec_counts():
    items = synthetic_thunks(BASE)
    frozen = sum(int(np.prod(t.shape)) for n, t in items
                 if "adapters" not in n and "quantizer" not in n and n != "output_transform.weight")
    lora = sum(int(np.prod(t.shape)) for n, t in items if "adapters" in n)
    assert (frozen, lora) == (3_111_368_064, 66_633_728)  # docs/format.md 1.4
    mapped = map_toolkit_state_dict(dict(items))
    assert {k: v for k, v in mapped.config.items() if k in BASE} == BASE
    assert mapped.config["kv_quant"] and len(mapped.lora) == 700
    assert sorted(mapped.weights) == sorted(target_shapes(mapped.config))


def test_base_mapping_moves_every_tensor():
    sd = synthetic_dict(TINY, seed=3)
    config, weights = toolkit_to_mlx_arrays(sd)
    pre = "layers.segment_0.layer_1."
    np.testing.assert_array_equal(weights["model.layers.1.mlp.gate_proj.weight"],
                                  sd[pre + "feed_forward.hidden_transform.linear_0.wrapped.weight"])
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.qkv_proj.weight"],
                                  sd[pre + "attention.qkv_transform.wrapped.fused_linear.weight"])
    np.testing.assert_array_equal(weights["model.kv_reuse_layers.0.self_attn.q_proj.weight"],
                                  sd["layers.segment_1.layer_0.attention.q_transform.wrapped.weight"])
    rng = sd[pre + "attention.kv_quantizer.value_quantizer.activation_post_process.range"]
    assert weights["model.layers.1.self_attn.quant_value_scale"] == max(-rng[0] / 128, rng[1] / 127)
    assert weights["model.layers.1.self_attn.quant_value_scale"].dtype == np.float32
    assert config["num_heads"] == 4 and config["num_kv_heads"] == 2 and config["hidden_dim_scale_factor"] == 1.5


def test_draft_layout_with_model_prefix_and_no_kv_quant():
    sd = {"model." + k: v for k, v in synthetic_dict(TINY_DRAFT, draft=True, kv_quant=False).items()}
    mapped = map_toolkit_state_dict(sd)
    assert mapped.config["kv_quant"] is False and not mapped.lora
    assert mapped.config["num_heads"] == 2 and mapped.config["num_kv_heads"] == 1
    assert "model.layers.1.self_attn.quant_key_scale" not in mapped.weights


def test_lora_names_follow_mlx_lm_adapter_layout():
    sd = synthetic_dict(TINY, lora_nonzero=True, lora_rank=8)
    mapped = map_toolkit_state_dict(sd)
    b1 = mapped.load("model.layers.0.self_attn.qkv_proj.lora_b.1", sd)
    assert b1.shape == (8, 32)  # K part: 2 kv heads x head_dim 16
    np.testing.assert_array_equal(
        b1, sd["layers.segment_0.layer_0.attention.qkv_transform.adapters.base_adapter.lora_1.b_transpose"])
    assert mapped.lora["model.kv_reuse_layers.0.mlp.down_proj.lora_a"].shape == (96, 8)


def test_kv_scale_is_the_float32_formula():
    torch = pytest.importorskip("torch", reason="torch cross-checks the fp32 scale formula")
    rng = np.random.default_rng(0)
    ranges = rng.uniform(-6, 6, (2000, 2)).astype(np.float32)
    ranges[:, 0] = -np.abs(ranges[:, 0])
    ranges[:, 1] = np.abs(ranges[:, 1])
    recip = torch.tensor([1 / -128, 1 / 127])
    want = [torch.max(torch.from_numpy(r) * recip).item() for r in ranges]
    got = [float(kv_scale_from_range(r)) for r in ranges]
    assert got == want
    # the double formula differs in the last bit for some ranges: the fp32 one is what tamm uses
    double = [np.float32(max(float(r[0]) / -128, float(r[1]) / 127)) for r in ranges]
    assert any(g != d for g, d in zip(got, double))
    # nor float32 division by (-128, 127): tamm's calculate_qparams multiplies by the float32 reciprocals
    divided = [np.max(r / np.array([-128, 127], np.float32)) for r in ranges]
    assert any(g != d for g, d in zip(got, divided))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"layers.segment_0.layer_0.attention.bogus.weight": np.zeros(3)}), "unknown"),
    (lambda sd: sd.pop("layers.segment_1.layer_0.feed_forward.norm.weight"), "missing"),
    (lambda sd: sd.update({"output_norm.weight": np.ones(63, np.float32)}), "shape"),
    (lambda sd: sd.pop("layers.segment_0.layer_1.attention.kv_quantizer.key_quantizer.activation_post_process.range"),
     "KV-quantizer"),
    (lambda sd: sd.pop("layers.segment_0.layer_1.attention.output_transform.adapters.base_adapter.b_transpose"),
     "LoRA"),
    (lambda sd: sd.pop("embedding.weight"), "embedding"),
])
def test_strict_mapping_errors(edit, message):
    sd = synthetic_dict(TINY)
    edit(sd)
    with pytest.raises(AFMError, match=message):
        toolkit_to_mlx_arrays(sd)


def test_untied_unequal_output_head_is_refused_equal_copy_accepted():
    sd = synthetic_dict(TINY)
    sd["output_transform.weight"] = sd["embedding.weight"].copy()
    toolkit_to_mlx_arrays(sd)
    sd["output_transform.weight"][5, 3] += 1
    with pytest.raises(AFMError, match="neither tied"):
        toolkit_to_mlx_arrays(sd)


def test_grid_tensor_lies_on_the_grid():
    w = grid_tensor(np.random.default_rng(1), (8, 256), bits=2, group=128, step=0.015)
    groups = w.reshape(8, 2, 128)
    lo, hi = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    assert np.all(lo == lo.astype(np.float16)) and all(len(np.unique(g)) == 4 for g in groups.reshape(16, 128))
    step = ((hi - lo) / 3).astype(np.float16).astype(np.float32)
    q = np.round((groups - lo) / step)
    assert np.array_equal(step * q + lo, groups)


def test_synthetic_is_seeded_and_lazy():
    a, b = synthetic_dict(TINY, seed=5, grid=True), synthetic_dict(TINY, seed=5, grid=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = synthetic_dict(TINY, seed=6, grid=True)
    assert not np.array_equal(a["embedding.weight"], c["embedding.weight"])
    names = [n for n, _ in synthetic_thunks(TINY)]
    assert names[0] == "embedding.weight" and names[-2:] == ["output_norm.weight", "output_transform.weight"]
