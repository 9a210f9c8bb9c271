"""The compiled decode / verify step (afm_mlx.step): the logits of the forward as it was before it, bit for bit,
one trace per (rows, logits, adapter) and buffer size, new weights and adapters honoured."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

import afm_mlx.kv as KV
from afm_mlx import cpu, loading
from afm_mlx.adapters import add_adapter, set_active_adapter
from afm_mlx.bench.suite import random_adapter
from afm_mlx.model import rope_periods
from afm_mlx.presets import tiny_base, tiny_draft
from toolkit_fixtures import mlx_model_from_toolkit, quantize_tiny, toolkit_weights

# (rows, rolled back after): decode steps and verify rounds whose rejected drafts are trimmed
STEPS = [(1, 0), (1, 0), (3, 1), (1, 0), (5, 2), (2, 0), (1, 0), (4, 0), (6, 5), (1, 0), (2, 1), (1, 0)]


def todays_logits(model, tokens, history, num_logits):
    """The forward before the compiled step: mx.fast.rope per layer at an int offset, q_norm and k_norm apart,
    SDPA over the valid prefix. history: per regular layer [keys, values] so far (extended here)."""
    inner, args = model.model, model.args
    B, L = tokens.shape
    H, KVH, D = args.num_heads, args.num_kv_heads, args.head_dim
    offset = 0 if history[0][0] is None else history[0][0].shape[2]
    periods = rope_periods(D, args.rope_theta)

    def rope(x, at):
        return mx.fast.rope(x, D, traditional=True, base=None, scale=1.0, offset=at, freqs=periods)

    def heads(x, n):
        return x.reshape(B, x.shape[1], n, D).transpose(0, 2, 1, 3)

    def attend(q, kv, scales, module):
        keys, values = kv
        if scales is not None:
            keys, values = (KV.dequantize_int8(x, scale, q.dtype) for x, scale in zip(kv, scales))
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=module.scale,
                                                   mask="causal" if q.shape[2] > 1 else None)
        return module.out_proj(out.transpose(0, 2, 1, 3).reshape(B, q.shape[2], -1))

    h, scales = inner.embedding(tokens), None
    for layer, kv in zip(inner.layers, history):
        a = layer.self_attn
        q, k, v = mx.split(a.qkv_proj(layer.input_layernorm(h)), [H * D, (H + KVH) * D], axis=-1)
        q, k, v = a.q_norm(rope(heads(q, H), offset)), a.k_norm(rope(heads(k, KVH), offset)), heads(v, KVH)
        scales = (a.quant_key_scale, a.quant_value_scale) if a.kv_quant else None
        if scales is not None:
            k, v = KV.int8_codes(k, scales[0]), KV.int8_codes(v, scales[1])
        kv[:] = [x if old is None else mx.concatenate([old, x], axis=2) for old, x in zip(kv, (k, v))]
        h = h + attend(q, kv, scales, a)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = h[:, -num_logits:]
    for layer in inner.kv_reuse_layers:
        q = heads(layer.self_attn.q_proj(layer.input_layernorm(h)), H)
        q = layer.self_attn.q_norm(rope(q, offset + L - num_logits))
        h = h + attend(q, history[-1], scales, layer.self_attn)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return inner.head(inner.output_norm(h))


def tiny_model(config, quantized: bool):
    model = mlx_model_from_toolkit(toolkit_weights(config, seed=7))
    if quantized:
        loading.tune_for_device(quantize_tiny(model))
    return model


def step_logits(model, prompt_length: int, rows_wanted=None):
    """(logits of each of STEPS through model(...), the same through todays_logits), from one random token stream."""
    tokens = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, (1, prompt_length + 40)))
    cache, history = model.make_cache(), [[None, None] for _ in model.model.layers]
    model.prefill(tokens[:, :prompt_length], cache)
    todays_logits(model, tokens[:, :prompt_length], history, 1)
    ours, todays, at = [], [], prompt_length
    for rows, rejected in STEPS:
        x, n = tokens[:, at:at + rows], rows if rows_wanted is None else rows_wanted
        ours.append(np.array(model(x, cache, num_logits=n)))
        todays.append(np.array(todays_logits(model, x, history, n)))
        for c in cache:
            c.trim(rejected)
        history[:] = [[a[..., :cache[0].offset, :] for a in kv] for kv in history]
        at += rows - rejected
    return ours, todays


@pytest.mark.parametrize("config", [tiny_base(), tiny_draft()], ids=["base-int8-kv", "draft-float-kv"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "2-bit-tuned"])
@pytest.mark.parametrize("prompt_length", [9, 250], ids=["short", "across-256"])
def test_step_logits_are_bit_identical_to_the_forward_before_it(config, quantized, prompt_length, monkeypatch):
    monkeypatch.setattr(cpu, "PARALLEL_MIN_MACS", 1)  # the row-parallel split inside the trace too
    monkeypatch.setenv("AFM_MLX_CPU_STREAMS", "2")
    model = tiny_model(config, quantized)
    ours, todays = step_logits(model, prompt_length)
    assert {key[:2] for key in model._compiled_steps} == {(r, r) for r, _ in STEPS}  # every step compiled
    for i, (a, b) in enumerate(zip(ours, todays)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {i} ({STEPS[i][0]} rows)")


def test_steps_keeping_fewer_logits_are_bit_identical():
    """The draft's first call of a round feeds 2 tokens for 1 logit: the reuse layers run for the last row only."""
    model = tiny_model(tiny_base(), quantized=True)
    ours, todays = step_logits(model, 20, rows_wanted=1)
    for a, b in zip(ours, todays):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("offset", [0, 1, 7, 255, 1000, 4095])
def test_rope_table_gives_fast_rope_bit_for_bit(offset):
    """model.rope over RopeTable rows (the table crosses a chunk at 4096) is mx.fast.rope, tamm's fp32 angles."""
    model = mlx_model_from_toolkit(toolkit_weights(tiny_base(), seed=7))
    D = model.args.head_dim
    x = mx.random.normal((1, 6, 3, D), key=mx.random.key(offset))
    expected = mx.fast.rope(x, D, traditional=True, base=None, scale=1.0, offset=offset,
                            freqs=rope_periods(D, model.args.rope_theta))
    np.testing.assert_array_equal(np.array(model.span(offset, 3).rope(x)), np.array(expected))
    assert model.span(offset, 3).rope(x.astype(mx.bfloat16)).dtype == mx.bfloat16


def test_an_adapter_switch_gets_its_own_trace_and_logits():
    """The LoRA arrays are constants of a trace: activating, switching and dropping adapters retraces."""
    model = tiny_model(tiny_base(), quantized=True)
    for seed in (1, 2):
        add_adapter(model, random_adapter(model.args, 4, seed), f"a{seed}")
    for active in ("a1", "a2", None, "a1"):
        set_active_adapter(model, active)
        ours, todays = step_logits(model, 12)
        for a, b in zip(ours, todays):
            np.testing.assert_array_equal(a, b, err_msg=f"adapter {active}")
    assert len({key[2] for key in model._compiled_steps}) == 3  # a1, a2, none


def test_new_weights_need_no_retrace():
    """The parameters are the trace's inputs, read at every call: new arrays of the same shapes are used."""
    model = tiny_model(tiny_base(), quantized=False)
    step_logits(model, 12)
    traces = dict(model._compiled_steps)
    model.update(tree_map(lambda w: w * 1.5 if w.ndim == 2 else w, model.parameters()))
    ours, todays = step_logits(model, 12)
    for a, b in zip(ours, todays):
        np.testing.assert_array_equal(a, b)
    assert model._compiled_steps == traces


def test_the_step_stays_eager_where_it_cannot_apply(monkeypatch):
    """Prefill-sized inputs, an empty cache, caches of another kind, and the Metal kv_attention kernel (it takes
    the K/V length as an int) run the eager forward."""
    from afm_mlx import kernels, step

    model = tiny_model(tiny_base(), quantized=False)
    cache = model.make_cache()
    assert not step.applies(model, mx.zeros((1, 1), mx.int32), cache)  # nothing prefilled: no buffers yet
    model.prefill(mx.arange(1, 9)[None], cache)
    assert step.applies(model, mx.zeros((1, step.MAX_ROWS), mx.int32), cache)
    assert not step.applies(model, mx.zeros((1, step.MAX_ROWS + 1), mx.int32), cache)
    assert not step.applies(model, mx.zeros((1, 1), mx.int32), [object()] * len(cache))
    monkeypatch.setattr(kernels, "model_uses", lambda name: name == "kv_attention")
    assert not step.applies(model, mx.zeros((1, 1), mx.int32), cache)


def test_an_unloaded_adapters_traces_are_dropped():
    """Each trace holds its adapter's LoRA arrays: a server cycling adapters must not keep them all."""
    from afm_mlx.adapters import unload_adapter

    model = tiny_model(tiny_base(), quantized=False)
    for seed in range(3):
        add_adapter(model, random_adapter(model.args, 4, seed), "cycled", activate=True)
        step_logits(model, 12)
        unload_adapter(model, "cycled")
    step_logits(model, 12)  # no adapter: a miss drops the traces of the ones unloaded
    assert {key[2] for key in model._compiled_steps} == {id(None)}
