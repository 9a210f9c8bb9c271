"""Float64 NumPy reference forward of AFMTextV7, written from docs/format.md section 4.

It reads the *toolkit* (tamm) state-dict names, so a converter that mis-maps a tensor cannot agree with it by
construction. Nothing here is shared with afm_mlx: it is the oracle.

Deliberate fp32 steps, as in tamm: RoPE frequencies are fp32 values computed in Python double; the kv-quant
scale is max(range * fp32([1/-128, 1/127])) in fp32; fake-quant divides by that fp32 scale.
LoRA (when `lora_scale` is given) adds scale * (x A) B for every `adapters.<id>` pair present.
"""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x, positions, theta):
    """x [..., S, H, D]: rotate adjacent pairs (2i, 2i+1) by positions * freq_i (GPT-J / tamm order)."""
    dim = x.shape[-1]
    half = dim // 2
    exps = [i * (2 / dim - 1) / (half - 1) for i in range(half)]
    freqs = np.array([math.pow(theta, e) for e in exps], dtype=np.float32).astype(np.float64)
    ang = positions[:, None].astype(np.float64) * freqs[None, :]  # [S, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]  # broadcast over heads
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def kv_scale(range_buffer):
    r = np.asarray(range_buffer, dtype=np.float32)
    return np.float32(np.max(r * np.array([1 / -128, 1 / 127], dtype=np.float32)))


def fake_quant(x, scale):
    s = np.float64(scale)
    return np.clip(np.round(x / s), -128, 127) * s  # np.round is round-half-even, like torch


def sdpa_causal(q, k, v):
    """q [S, H, D], k/v [S, KV, D]; head h uses kv head h // (H / KV)."""
    S, H, D = q.shape
    ratio = H // k.shape[1]
    k, v = np.repeat(k, ratio, axis=1), np.repeat(v, ratio, axis=1)
    scores = np.einsum("shd,thd->hst", q, k) / math.sqrt(D)
    scores = np.where(np.tril(np.ones((S, S), bool))[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    return np.einsum("hst,thd->shd", probs, v)


class _Weights:
    def __init__(self, sd, lora_scale):
        self.sd = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
        self.lora_scale = lora_scale

    def linear(self, prefix, x, lora_index=None):
        """x @ W^T (+ scale * (x A) B) for `<prefix>[.wrapped].weight` / `.fused_linear.weight`."""
        w = self._find(prefix, [".wrapped.fused_linear.weight", ".fused_linear.weight", ".wrapped.weight", ".weight"])
        return x @ w.T

    def lora(self, prefix, x, sub=""):
        if self.lora_scale is None:
            return 0.0
        keys = [k for k in self.sd if k.startswith(prefix + ".adapters.") and k.endswith(sub + ".a_transpose")]
        out = 0.0
        for ka in keys:
            out = out + self.lora_scale * (x @ self.sd[ka]) @ self.sd[ka[: -len("a_transpose")] + "b_transpose"]
        return out

    def _find(self, prefix, suffixes):
        for s in suffixes:
            if prefix + s in self.sd:
                return self.sd[prefix + s]
        raise KeyError(f"no weight for {prefix}")

    def __getitem__(self, key):
        return self.sd[key]

    def has(self, key):
        return key in self.sd


def _attention(W, p, x, positions, cfg, kv_quant):
    H, KV = cfg["num_heads"], cfg["num_kv_heads"]
    D = cfg["hidden_dim"] // H
    S = x.shape[0]
    h = rms_norm(x, W[p + ".norm.weight"])
    qkv = W.linear(p + ".qkv_transform", h)
    q, k, v = np.split(qkv, [H * D, H * D + KV * D], axis=-1)
    q = q + W.lora(p + ".qkv_transform", h, ".lora_0")
    k = k + W.lora(p + ".qkv_transform", h, ".lora_1")
    v = v + W.lora(p + ".qkv_transform", h, ".lora_2")
    q, k, v = q.reshape(S, H, D), k.reshape(S, KV, D), v.reshape(S, KV, D)
    q = rms_norm(rope_interleaved(q, positions, cfg["rope_theta"]), W[p + ".qk_norm.query_norm.weight"])
    k = rms_norm(rope_interleaved(k, positions, cfg["rope_theta"]), W[p + ".qk_norm.key_norm.weight"])
    quant = p + ".kv_quantizer.key_quantizer.activation_post_process.range"
    if kv_quant and W.has(quant):
        k = fake_quant(k, kv_scale(W[quant]))
        v = fake_quant(v, kv_scale(W[quant.replace("key_quantizer", "value_quantizer")]))
    o = sdpa_causal(q, k, v).reshape(S, H * D)
    return W.linear(p + ".output_transform", o) + W.lora(p + ".output_transform", o), (k, v)


def _reuse_attention(W, p, x, positions, cfg, kv):
    H = cfg["num_heads"]
    D = cfg["hidden_dim"] // H
    S = x.shape[0]
    h = rms_norm(x, W[p + ".norm.weight"])
    q = (W.linear(p + ".q_transform", h) + W.lora(p + ".q_transform", h)).reshape(S, H, D)
    q = rms_norm(rope_interleaved(q, positions, cfg["rope_theta"]), W[p + ".q_norm.query_norm.weight"])
    o = sdpa_causal(q, *kv).reshape(S, H * D)
    return W.linear(p + ".output_transform", o) + W.lora(p + ".output_transform", o)


def _feed_forward(W, p, x):
    h = rms_norm(x, W[p + ".norm.weight"])
    gate = W.linear(p + ".hidden_transform.linear_0", h) + W.lora(p + ".hidden_transform.linear_0", h)
    up = W.linear(p + ".hidden_transform.linear_1", h) + W.lora(p + ".hidden_transform.linear_1", h)
    act = up * (gate / (1 + np.exp(-gate)))  # SwiGLU: linear_1(x) * silu(linear_0(x))
    return W.linear(p + ".output_transform", act) + W.lora(p + ".output_transform", act)


def _layer_prefixes(sd):
    """Regular and reuse layer prefixes in order: base (segment_0/segment_1) or draft (layers.layer_N)."""
    def layers(stem):
        idx = sorted({int(k[len(stem):].split(".")[0]) for k in sd if k.startswith(stem)})
        return [f"{stem}{i}" for i in idx]
    if any(k.startswith("layers.segment_0.") for k in sd):
        return layers("layers.segment_0.layer_"), layers("layers.segment_1.layer_")
    return layers("layers.layer_"), []


def reference_forward(sd, tokens, cfg, *, lora_scale=None, kv_quant=True):
    """Logits [L, V] (float64) for one sequence `tokens` [L] from a toolkit state dict."""
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    W = _Weights(sd, lora_scale)
    tokens = np.asarray(tokens).reshape(-1)
    positions = np.arange(len(tokens))
    x = W["embedding.weight"][tokens]
    regular, reuse = _layer_prefixes(sd)
    for p in regular:
        a, kv = _attention(W, p + ".attention", x, positions, cfg, kv_quant)
        x = x + a
        x = x + _feed_forward(W, p + ".feed_forward", x)
    for p in reuse:
        x = x + _reuse_attention(W, p + ".attention", x, positions, cfg, kv)
        x = x + _feed_forward(W, p + ".feed_forward", x)
    return rms_norm(x, W["output_norm.weight"]) @ W["embedding.weight"].T
