"""Few-row attention over the whole cache buffer with an explicit mask (kv.PADDED_ATTENTION_BACKENDS, CUDA
by default, where MLX's cuDNN attention builds a graph per distinct K/V shape): the same logits as attending to
the valid prefix, and the same K/V shape for every verify round until the buffer grows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import afm_mlx.kv as KV
from afm_mlx import step
from afm_mlx.dtypes import backend_name
from afm_mlx.presets import tiny_base, tiny_draft
from toolkit_fixtures import STEP_TOKENS, decode_verify_logits, mlx_model_from_toolkit, toolkit_weights


@pytest.fixture
def padded_here(monkeypatch):
    """Make this machine's backend one that pads few-row attention."""
    monkeypatch.setattr(KV, "PADDED_ATTENTION_BACKENDS", (backend_name(),))


@pytest.mark.parametrize("config", [tiny_base(), tiny_draft()], ids=["base-int8-kv", "draft"])
def test_padded_attention_gives_the_same_logits(config, monkeypatch):
    model = mlx_model_from_toolkit(toolkit_weights(config, seed=5))
    assert backend_name() not in KV.PADDED_ATTENTION_BACKENDS  # the CPU attends to the valid prefix
    prefix = decode_verify_logits(model)
    monkeypatch.setattr(KV, "PADDED_ATTENTION_BACKENDS", (backend_name(),))
    padded = decode_verify_logits(model)
    for step, (a, b) in enumerate(zip(padded, prefix)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-step"])
def test_verify_rounds_attend_to_one_key_shape(compiled, padded_here, monkeypatch):
    """The point of padding: verify rounds at different lengths present SDPA the same K/V shape and an
    explicit mask; eager single-row decode keeps the valid prefix (MLX's vector kernel, no per-shape graph), the
    compiled step (afm_mlx.step) pads every step, decode too: its trace serves every position."""
    monkeypatch.setattr(step, "ENABLED", compiled)
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(), seed=5))
    seen = []
    original = mx.fast.scaled_dot_product_attention

    def recording(q, k, v, *, scale, mask=None, **kw):
        seen.append((q.shape[2], k.shape[2], None if mask is None or isinstance(mask, str) else mask.shape))
        return original(q, k, v, scale=scale, mask=mask, **kw)

    def grouped(q, k, v, scale, mask):  # the CPU's form: each KV head's query group as one matmul's rows
        groups = q.shape[1] // k.shape[1]
        seen.append((q.shape[2], k.shape[2], (1, 1, mask.shape[2] // groups, mask.shape[3])))
        return original_grouped(q, k, v, scale, mask)

    original_grouped = KV.grouped_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(KV, "grouped_attention", grouped)
    cache = model.make_cache()
    tokens = mx.array(STEP_TOKENS)[None]
    model.prefill(tokens[:, :9], cache)  # 9 rows: the prefix path with "causal"
    seen.clear()
    mx.eval(model(tokens[:, 9:10], cache))  # decode at length 10
    mx.eval(model(tokens[:, 10:14], cache, num_logits=4))  # verify, length 14
    mx.eval(model(tokens[:, 14:17], cache, num_logits=3))  # verify, length 17
    layers = model.args.num_layers
    assert seen[:layers] == [(1, 256, (1, 1, 1, 256)) if compiled else (1, 10, None)] * layers
    assert seen[layers:2 * layers] == [(4, 256, (1, 1, 4, 256))] * layers
    assert seen[2 * layers:] == [(3, 256, (1, 1, 3, 256))] * layers


def test_padded_causal_mask_is_lower_right_causal():
    mask = np.array(KV.padded_causal_mask(3, 5, 8, mx.float32))[0, 0]
    visible = mask == 0
    expected = np.zeros((3, 8), bool)
    for i in range(3):
        expected[i, :5 - 3 + i + 1] = True  # query i sits at position 2 + i
    assert (visible == expected).all() and np.isneginf(mask[~visible]).all()
