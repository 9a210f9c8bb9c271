"""AFMTextV7 scaled down, in PyTorch, with tamm's module names (training code for the demo family only).

The module tree reproduces the toolkit's state-dict keys exactly (docs/format.md sec. 1.1/1.2), e.g.
`layers.segment_0.layer_0.attention.qkv_transform.wrapped.fused_linear.weight` for the base and
`layers.layer_0.attention.qkv_transform.fused_linear.weight` for the draft. Numerics follow sec. 4:
RMSNorm eps 1e-5 with plain `w`; interleaved (GPT-J) RoPE with tamm's fp32 frequencies, applied before the
per-head q/k RMSNorm; int8 per-tensor KV fake-quant whose ranges come from EMA min/max observers (momentum 0.9,
updated in training mode only) with straight-through gradients; KV-reuse layers attend to the post-quant K/V
of the last regular layer; SwiGLU `linear_1(x) * silu(linear_0(x))`; tied embedding/output, no scaling.

Weight quantization-aware training (2-bit, group 128; 4-bit embedding, group 32) is switched on per model with
`set_weight_fake_quant`; `snap_weights_to_grid` then writes the grid values into the float32 weights.
torch is a dev-only dependency: nothing under afm_mlx imports this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AFMConfig:
    vocab_size: int = 8192
    hidden_dim: int = 256
    num_layers: int = 9  # total, including the KV-reuse layers
    num_kv_reuse_layers: int = 3  # 0 -> uniform layer sequence (the draft's layout)
    num_heads: int = 4
    num_kv_heads: int = 2
    hidden_dim_scale_factor: float = 3.0
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    kv_quant: bool = True
    lora_rank: int = 0  # >0: add `adapters.base_adapter` LoRA tensors (B = 0), as base-model.pt carries them
    lora_alpha: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round(self.hidden_dim * self.hidden_dim_scale_factor)


# ---------------------------------------------------------------- weight fake-quant (QAT)


def fp16_representable(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest float16 value (kept as float32), as the shipped scales/biases are fp16."""
    return x.to(torch.float16).to(torch.float32)


def affine_grid(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-group min/max affine fake-quant of `weight [out, in]` along `in` (no gradient handling).

    scale = (max - min) / (2^bits - 1), bias = min, both rounded to fp16-representable values; the result
    lies exactly on {bias + q * scale : q = 0..2^bits-1} in float32 and uses both ends of the grid.
    """
    out_dim, in_dim = weight.shape
    groups = weight.reshape(out_dim, in_dim // group_size, group_size)
    w_min = groups.amin(dim=-1, keepdim=True)
    w_max = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = fp16_representable((w_max - w_min) / levels)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-14))  # constant group: any scale works
    bias = fp16_representable(w_min)
    codes = torch.clamp(torch.round((groups - bias) / scale), 0, levels)
    return (codes * scale + bias).reshape(out_dim, in_dim)


class _StraightThrough(torch.autograd.Function):
    """Forward returns `quantized` bit for bit (x + (q - x).detach() would not); backward is the identity to x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, quantized.detach())


def fake_quant_ste(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Straight-through estimator: forward uses the grid value, backward passes the gradient unchanged."""
    return straight_through(weight, affine_grid(weight.detach(), bits, group_size))


class QuantSpec:
    """Which grid a weight is fake-quantised onto during QAT (None = float training)."""

    def __init__(self):
        self.bits: int | None = None
        self.group_size: int = 128

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.bits is None else fake_quant_ste(weight, self.bits, self.group_size)


class QLinear(nn.Module):
    """`nn.Linear` without bias whose weight can be fake-quantised (tamm's Linear: `weight [out, in]`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.normal_(self.weight, std=in_dim**-0.5)
        self.quant = QuantSpec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quant.apply(self.weight))


class FusedLinear(nn.Module):
    """tamm `FusedMultiOutputLinear`: one `fused_linear` whose rows are Q | K | V."""

    def __init__(self, in_dim: int, out_dims: list[int]):
        super().__init__()
        self.fused_linear = QLinear(in_dim, sum(out_dims))
        self.out_dims = out_dims

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(self.fused_linear(x), self.out_dims, dim=-1)


class LoRA(nn.Module):
    """tamm LoRA tensors (`a_transpose [in, r]`, `b_transpose [r, out]`), frozen with B = 0.

    They are stored for a faithful base-model.pt; since B = 0 their contribution is exactly zero, so the
    forward pass skips them.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)
        self.a_transpose = nn.Parameter(torch.empty(in_dim, rank).uniform_(-bound, bound), requires_grad=False)
        self.b_transpose = nn.Parameter(torch.zeros(rank, out_dim), requires_grad=False)


class Adapted(nn.Module):
    """tamm `AdaptedLayer`: `wrapped` then `adapters.base_adapter` (so the keys come out in that order)."""

    def __init__(self, wrapped: nn.Module, lora: nn.Module | None):
        super().__init__()
        self.wrapped = wrapped
        if lora is not None:
            self.adapters = nn.ModuleDict({"base_adapter": lora})

    def forward(self, x):
        return self.wrapped(x)


class FusedLoRA(nn.Module):
    """tamm `LoRAFusedMultiOutputLinear`: children `lora_0, lora_1, lora_2` for Q, K, V."""

    def __init__(self, in_dim: int, out_dims: list[int], rank: int):
        super().__init__()
        for i, out_dim in enumerate(out_dims):
            self.add_module(f"lora_{i}", LoRA(in_dim, out_dim, rank))


def maybe_adapted(layer: nn.Module, lora: nn.Module | None, adapted: bool) -> nn.Module:
    return Adapted(layer, lora) if adapted else layer


# ---------------------------------------------------------------- numerics


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def tamm_rope_freqs(head_dim: int, theta: float) -> torch.Tensor:
    """tamm's frequencies: exponents x * (2/dim - 1) / (dim//2 - 1) in Python double, then fp32 (sec. 4.2)."""
    half = head_dim // 2
    exponents = [x * (2 / head_dim - 1) / (half - 1) for x in range(half)]
    return torch.tensor([math.pow(theta, e) for e in exponents], dtype=torch.float32)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(seq_len, dtype=torch.float32)
    angles = positions[:, None] * tamm_rope_freqs(head_dim, theta)[None, :]  # [L, head_dim/2], fp32
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs: out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i] sin + x[2i+1] cos.

    x: [B, heads, L, head_dim]; cos/sin: [L, head_dim/2].
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.reshape(x.shape)


class EMAMinMaxObserver(nn.Module):
    """tamm `SimpleEMAMinMaxObserver` (momentum 0.9, range starts at [-1, 1], first sample replaces it)."""

    def __init__(self, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("range", torch.tensor([-1.0, 1.0], dtype=torch.float32))
        self.register_buffer("num_samples", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        min_max = torch.stack([x.min(), x.max()]).float()
        alpha = 1 - self.momentum if int(self.num_samples) != 0 else 1.0
        self.range.add_(min_max - self.range, alpha=alpha)
        self.num_samples.add_(x.size(0) if x.ndim > 0 else 1)

    def scale(self) -> torch.Tensor:
        return torch.max(self.range.float() * torch.tensor([1 / -128, 1 / 127], dtype=torch.float32))


class FakeQuantize(nn.Module):
    """int8 symmetric per-tensor fake-quant; observer runs only in training mode; straight-through gradient."""

    def __init__(self):
        super().__init__()
        self.activation_post_process = EMAMinMaxObserver()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.activation_post_process(x.detach())
        scale = self.activation_post_process.scale()
        quantized = torch.clamp(torch.round(x.float() / scale), -128, 127) * scale
        return straight_through(x, quantized)


class KVQuantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.key_quantizer = FakeQuantize()
        self.value_quantizer = FakeQuantize()


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, eps: float, with_key: bool = True):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps)
        if with_key:
            self.key_norm = RMSNorm(head_dim, eps)


# ---------------------------------------------------------------- layers


class Attention(nn.Module):
    """tamm `TransformerAttention`: norm -> qkv -> RoPE -> q/k norm -> KV fake-quant -> SDPA -> output."""

    def __init__(self, cfg: AFMConfig, adapted: bool):
        super().__init__()
        h, d = cfg.hidden_dim, cfg.head_dim
        dims = [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d]
        self.cfg = cfg
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        lora = FusedLoRA(h, dims, cfg.lora_rank) if cfg.lora_rank else None
        self.qkv_transform = maybe_adapted(FusedLinear(h, dims), lora, adapted)
        self.qk_norm = QKNorm(d, cfg.rms_norm_eps)
        if cfg.kv_quant:
            self.kv_quantizer = KVQuantizer()
        out_lora = LoRA(dims[0], h, cfg.lora_rank) if cfg.lora_rank else None
        self.output_transform = maybe_adapted(QLinear(dims[0], h), out_lora, adapted)

    def forward(self, x, cos, sin):
        cfg, (b, L, _) = self.cfg, x.shape
        q, k, v = self.qkv_transform(self.norm(x))
        q = q.view(b, L, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, L, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, L, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = self.qk_norm.query_norm(apply_rope(q, cos, sin))
        k = self.qk_norm.key_norm(apply_rope(k, cos, sin))
        if cfg.kv_quant:
            k = self.kv_quantizer.key_quantizer(k)
            v = self.kv_quantizer.value_quantizer(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, L, -1)
        return x + self.output_transform(out), (k, v)


class KVReuseAttention(nn.Module):
    """tamm `KVReuseTransformerAttention`: own Q only, attends to the last regular layer's (quantised) K/V."""

    def __init__(self, cfg: AFMConfig, adapted: bool):
        super().__init__()
        h, d = cfg.hidden_dim, cfg.head_dim
        q_dim = cfg.num_heads * d
        self.cfg = cfg
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        lora = LoRA(h, q_dim, cfg.lora_rank) if cfg.lora_rank else None
        self.q_transform = maybe_adapted(QLinear(h, q_dim), lora, adapted)
        self.q_norm = QKNorm(d, cfg.rms_norm_eps, with_key=False)
        out_lora = LoRA(q_dim, h, cfg.lora_rank) if cfg.lora_rank else None
        self.output_transform = maybe_adapted(QLinear(q_dim, h), out_lora, adapted)

    def forward(self, x, cos, sin, kv):
        cfg, (b, L, _) = self.cfg, x.shape
        q = self.q_transform(self.norm(x)).view(b, L, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        q = self.q_norm.query_norm(apply_rope(q, cos, sin))
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True, enable_gqa=True)
        return x + self.output_transform(out.transpose(1, 2).reshape(b, L, -1))


class HiddenTransform(nn.Module):
    """tamm `MultiOutputLinear`: `linear_0` = gate (through SiLU), `linear_1` = up."""

    def __init__(self, cfg: AFMConfig, adapted: bool):
        super().__init__()
        h, f, r = cfg.hidden_dim, cfg.ffn_dim, cfg.lora_rank
        self.linear_0 = maybe_adapted(QLinear(h, f), LoRA(h, f, r) if r else None, adapted)
        self.linear_1 = maybe_adapted(QLinear(h, f), LoRA(h, f, r) if r else None, adapted)


class FeedForward(nn.Module):
    def __init__(self, cfg: AFMConfig, adapted: bool):
        super().__init__()
        h, f, r = cfg.hidden_dim, cfg.ffn_dim, cfg.lora_rank
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_transform = HiddenTransform(cfg, adapted)
        self.output_transform = maybe_adapted(QLinear(f, h), LoRA(f, h, r) if r else None, adapted)

    def forward(self, x):
        y = self.norm(x)
        gate, up = self.hidden_transform.linear_0(y), self.hidden_transform.linear_1(y)
        return x + self.output_transform(up * F.silu(gate))


class Layer(nn.Module):
    def __init__(self, cfg: AFMConfig, reuse: bool, adapted: bool):
        super().__init__()
        self.attention = (KVReuseAttention if reuse else Attention)(cfg, adapted)
        self.feed_forward = FeedForward(cfg, adapted)


class Segment(nn.Module):
    def __init__(self, cfg: AFMConfig, count: int, reuse: bool, adapted: bool):
        super().__init__()
        for i in range(count):
            self.add_module(f"layer_{i}", Layer(cfg, reuse, adapted))


class AFMText(nn.Module):
    """Base (two segments, KV reuse, `wrapped.` names) or draft (uniform `layers.layer_N`, no `wrapped.`)."""

    def __init__(self, cfg: AFMConfig):
        super().__init__()
        self.cfg = cfg
        adapted = cfg.num_kv_reuse_layers > 0  # the toolkit's base is adapter-wrapped, its draft is not
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=cfg.hidden_dim**-0.5)
        self.embedding_quant = QuantSpec()
        n_regular = cfg.num_layers - cfg.num_kv_reuse_layers
        if cfg.num_kv_reuse_layers:
            self.layers = nn.Module()
            self.layers.segment_0 = Segment(cfg, n_regular, reuse=False, adapted=adapted)
            self.layers.segment_1 = Segment(cfg, cfg.num_kv_reuse_layers, reuse=True, adapted=adapted)
        else:
            self.layers = Segment(cfg, n_regular, reuse=False, adapted=adapted)
        self.output_norm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)

    def regular_layers(self) -> list[Layer]:
        seq = self.layers.segment_0 if self.cfg.num_kv_reuse_layers else self.layers
        return list(seq.children())

    def reuse_layers(self) -> list[Layer]:
        return list(self.layers.segment_1.children()) if self.cfg.num_kv_reuse_layers else []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> logits [B, L, V] (causal, positions 0..L-1)."""
        cos, sin = rope_cos_sin(tokens.shape[1], self.cfg.head_dim, self.cfg.rope_theta)
        table = self.embedding_quant.apply(self.embedding.weight)
        x = F.embedding(tokens, table)
        kv = None
        for layer in self.regular_layers():
            x, kv = layer.attention(x, cos, sin)
            x = layer.feed_forward(x)
        for layer in self.reuse_layers():
            x = layer.feed_forward(layer.attention(x, cos, sin, kv))
        return F.linear(self.output_norm(x), table)

    def toolkit_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as the toolkit saves it: tamm key order, plus `output_transform.weight` tied to the
        embedding storage (one storage in the zip)."""
        sd = {k: v for k, v in self.state_dict().items()}
        sd["output_transform.weight"] = sd["embedding.weight"]
        return sd


# ---------------------------------------------------------------- QAT switches


def quantizable_linears(model: AFMText) -> list[QLinear]:
    return [m for m in model.modules() if isinstance(m, QLinear)]


def fitting_group(in_dim: int, requested: int) -> int:
    """The requested group size, or the largest smaller MLX group size (64, 32) that divides `in_dim` (hidden 192:
    its 192-input projections cannot take groups of 128) -- the rule of the converter's `fitting_group`."""
    for group in (g for g in (128, 64, 32) if g <= requested):
        if in_dim % group == 0:
            return group
    raise ValueError(f"input size {in_dim} is not a multiple of 32")


def set_weight_fake_quant(model: AFMText, bits: int | None, group_size: int = 128,
                          embed_bits: int | None = None, embed_group_size: int = 32) -> None:
    """Fake-quantise every linear onto a `bits` grid and the tied embedding onto `embed_bits` (None: float)."""
    for linear in quantizable_linears(model):
        linear.quant.bits, linear.quant.group_size = bits, fitting_group(linear.weight.shape[1], group_size)
    model.embedding_quant.bits, model.embedding_quant.group_size = embed_bits, embed_group_size


@torch.no_grad()
def snap_weights_to_grid(model: AFMText, bits: int, group_size: int, embed_bits: int, embed_group_size: int) -> None:
    """Write the grid values into the float32 weights (then switch fake-quant off: it would be the identity)."""
    for linear in quantizable_linears(model):
        linear.weight.copy_(affine_grid(linear.weight, bits, fitting_group(linear.weight.shape[1], group_size)))
    model.embedding.weight.copy_(affine_grid(model.embedding.weight, embed_bits,
                                             fitting_group(model.embedding.weight.shape[1], embed_group_size)))
    set_weight_fake_quant(model, None)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
