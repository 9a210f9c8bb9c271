"""AFMTextV7: Apple's on-device foundation model (base and draft) in MLX.

Written from docs/format.md section 4 (the tamm numerics). Parameter names follow mlx-lm's
`afm7` module so model directories are interchangeable. Shapes: B batch, L new tokens, S cached tokens,
H query heads, KV key/value heads, D head dim.

The base has two segments: `layers` (regular transformer layers, each with its own KV cache) and
`kv_reuse_layers`, which compute only queries and attend to the K/V history of the *last* regular layer.
K/V are fake-quantised to int8 with one scalar scale per layer, so the cache stores the int8 codes (afm_mlx.kv:
the codes, the history the reuse layers read, the attention over it).

Every layer of a forward reads where its rows sit from one `Span` (positions, RoPE table rows, masks); decode and
verify steps run `Model.forward` compiled, with the position an array (afm_mlx.step), the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from . import cpu, kernels, step
from .cache import KVCache
from .kv import KVHistory, attend, int8_codes, padded_causal_mask
from .errors import AFMError


# config.json fields: (type, smallest, largest). Ints are checked inclusively, floats must be finite, above the
# smallest and at most the largest. The limits are far beyond any AFM model (3B: vocab 153,600, hidden 2,048,
# 56 layers, 16 heads) and there so that a hostile config is refused before it builds millions of layers.
CONFIG_LIMITS = {
    "vocab_size": (int, 1, 1 << 21),
    "hidden_dim": (int, 1, 1 << 16),
    "num_layers": (int, 1, 1024),
    "num_kv_reuse_layers": (int, 0, 1023),
    "num_heads": (int, 1, 1024),
    "num_kv_heads": (int, 1, 1024),
    "hidden_dim_scale_factor": (float, 0.0, 64.0),
    "rope_theta": (float, 0.0, 1e12),
    "rms_norm_eps": (float, 0.0, 1.0),
    "kv_quant": (bool, None, None),
    "model_type": (str, None, None),
}


def check_config_value(name: str, value) -> None:
    """AFMError unless `value` has the type and range CONFIG_LIMITS gives `name` (bools are not numbers here)."""
    kind, lo, hi = CONFIG_LIMITS[name]
    shown = repr(value)[:40]  # a 4,000-digit integer is not echoed whole
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (numeric if kind is float else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        raise AFMError(f"invalid model config: {name} must be {_KIND_NAMES[kind]}, got {shown}")
    if kind is int and not lo <= value <= hi:
        raise AFMError(f"invalid model config: {name} = {shown} is outside [{lo}, {hi}]")
    if kind is float and not (math.isfinite(value) and lo < value <= hi):
        raise AFMError(f"invalid model config: {name} = {shown} must be finite, > {lo:g} and <= {hi:g}")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_dim: int
    num_layers: int
    num_kv_reuse_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_dim_scale_factor: float = 3.25
    rope_theta: float = 500000.0  # tamm's default; mlx-lm's afm7 wrongly defaults to 50000
    rms_norm_eps: float = 1e-5
    kv_quant: bool = True  # False for a draft checkpoint without kv-quantizer buffers
    model_type: str = "afm7"

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """ModelArgs from a config.json object: every field type- and range-checked before anything is built."""
        if not isinstance(config, dict):
            raise AFMError(f"config.json must hold a JSON object, got {type(config).__name__}")
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in config]
        if missing:
            raise AFMError(f"config.json lacks required field(s): {', '.join(missing)}")
        for name in names & config.keys():
            check_config_value(name, config[name])
        args = cls(**{k: v for k, v in config.items() if k in names})
        args.validate()
        return args

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round(self.hidden_dim * self.hidden_dim_scale_factor)  # tamm's builder rounds

    @property
    def num_regular_layers(self) -> int:
        return self.num_layers - self.num_kv_reuse_layers

    def validate(self) -> None:
        checks = [
            (self.model_type == "afm7", f"model_type must be 'afm7', got {self.model_type!r}"),
            (min(self.vocab_size, self.hidden_dim, self.num_heads, self.num_kv_heads) > 0,
             "vocab_size, hidden_dim, num_heads and num_kv_heads must be positive"),
            (self.hidden_dim % self.num_heads == 0,
             f"num_heads ({self.num_heads}) must divide hidden_dim ({self.hidden_dim})"),
            (self.num_heads % self.num_kv_heads == 0,
             f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"),
            (self.head_dim % 2 == 0, f"head dim ({self.head_dim}) must be even for RoPE"),
            (0 <= self.num_kv_reuse_layers < self.num_layers,
             f"num_kv_reuse_layers ({self.num_kv_reuse_layers}) must be in [0, num_layers={self.num_layers})"),
            (self.hidden_dim_scale_factor > 0 and self.ffn_dim > 0, "hidden_dim_scale_factor must be positive"),
            (self.rope_theta > 0 and self.rms_norm_eps > 0, "rope_theta and rms_norm_eps must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise AFMError(f"invalid model config: {message}")


def rope_periods(head_dim: int, theta: float) -> mx.array:
    """tamm's RoPE frequencies (fp32, computed in Python double), as the periods mx.fast.rope takes.

    exponent_i = i * (2/dim - 1) / (dim/2 - 1) = -2i/dim; freq_i = fp32(theta ** exponent_i).
    """
    half = head_dim // 2
    exponents = [i * (2 / head_dim - 1) / (half - 1) if half > 1 else 0.0 for i in range(half)]
    inv_freqs = mx.array([math.pow(theta, e) for e in exponents], dtype=mx.float32)
    return 1.0 / inv_freqs


@mx.compile
def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Interleaved RoPE of x [B, H, L, D] with RopeTable rows [L, D]: each pair (x1, x2) becomes
    (x1 cos - x2 sin, x2 cos + x1 sin), written x * cos + swapped(x) * sin (the table's sin carries the sign).
    In float32, rounded once to x's dtype, as mx.fast.rope's kernels do."""
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    return (x * cos + swapped * sin).astype(x.dtype)


class RopeTable:
    """cos and sin of tamm's RoPE angles for positions 0..size-1, each repeated for its pair: [size, D] float32.

    The angles are mx.fast.rope's, (position * 1.0) * (1 / period) in float32, so rope() gives its values bit for
    bit; one slice of rows serves every layer of a forward. Grows in `chunk`s of positions.
    """

    chunk = 4096

    def __init__(self, head_dim: int, theta: float):
        self.periods = rope_periods(head_dim, theta)
        self.cos = self.sin = mx.zeros((0, head_dim))

    def rows(self, start: int, n: int) -> tuple[mx.array, mx.array]:
        if start + n > self.cos.shape[0]:
            self._build(-(-(start + n) // self.chunk) * self.chunk)
        return self.cos[start:start + n], self.sin[start:start + n]

    def rows_at(self, starts: mx.array, n: int) -> tuple[mx.array, mx.array]:
        """The rows of n positions from each start of int32 starts [B] (a batch's rows): [B, 1, n, D] each."""
        end = int(starts.max().item()) + n if starts.size else n
        if end > self.cos.shape[0]:
            self._build(-(-end // self.chunk) * self.chunk)
        positions = starts[:, None] + mx.arange(n)[None, :]
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def _build(self, size: int) -> None:
        theta = (mx.arange(size, dtype=mx.float32) * 1.0)[:, None] * mx.reciprocal(self.periods)[None]
        cos, sin = mx.cos(theta), mx.sin(theta)
        self.cos = mx.repeat(cos, 2, axis=-1)
        self.sin = mx.stack([-sin, sin], axis=-1).reshape(size, -1)
        mx.eval(self.cos, self.sin)


class Span:
    """Where one forward's L new rows sit: positions offset..offset+L-1, their RoPE rows [L, D] and the attention
    masks they need. offset is an int, or an array with `padded` set: inside the compiled step (afm_mlx.step) the
    position [1], in a batch whose rows sit at their own positions (afm_mlx.batch) each row's [B], with RoPE rows
    [B, 1, L, D]. Padded, attention reads whole cache buffers under a (per-row) mask, so no shape depends on the
    position."""

    def __init__(self, offset: int | mx.array, cos: mx.array, sin: mx.array, padded: bool = False):
        self.offset, self.cos, self.sin, self.padded = offset, cos, sin, padded
        self.end = offset + cos.shape[-2]  # the K/V length after this forward
        self._masks: dict = {}

    def rope(self, x: mx.array) -> mx.array:
        """RoPE of x [B, heads, rows, D], the span's last `rows` rows (reuse layers may keep only the last few)."""
        rows = x.shape[2]
        if rows == self.cos.shape[-2]:
            return rope(x, self.cos, self.sin)
        return rope(x, self.cos[..., -rows:, :], self.sin[..., -rows:, :])

    def mask(self, rows: int, size: int, dtype: mx.Dtype, groups: int = 1) -> mx.array:
        """padded_causal_mask for the last `rows` rows over `size` slots, built once per forward."""
        key = (rows, size, dtype, groups)
        if key not in self._masks:
            self._masks[key] = padded_causal_mask(rows, self.end, size, dtype, groups)
        return self._masks[key]


class Attention(nn.Module):
    """Regular layer attention: qkv -> RoPE -> per-head q/k RMSNorm -> int8 K/V -> causal GQA SDPA -> out."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_dim, args.hidden_dim + 2 * kv_dim, bias=False)  # rows: Q | K | V
        self.out_proj = nn.Linear(args.hidden_dim, args.hidden_dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        if args.kv_quant:
            self.quant_key_scale = mx.array(1.0)
            self.quant_value_scale = mx.array(1.0)
        self.scale = self.head_dim**-0.5

    @property
    def kv_quant(self) -> bool:
        return "quant_key_scale" in self

    def __call__(self, x: mx.array, cache: KVCache, span: Span) -> tuple[mx.array, "KVHistory"]:
        """x [B, L, hidden] -> (out [B, L, hidden], this layer's K/V history, for the reuse layers)."""
        B, L, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).reshape(B, L, H + 2 * KV, self.head_dim).transpose(0, 2, 1, 3)
        # q and k together: one RoPE (before the norm, as in tamm) and one RMSNorm, then each side's weight
        qk = cpu.rms_norm(span.rope(qkv[:, :H + KV]), None, self.q_norm.eps)
        q, k, v = qk[:, :H] * self.q_norm.weight, qk[:, H:] * self.k_norm.weight, qkv[:, H + KV:]
        scales = (self.quant_key_scale, self.quant_value_scale) if self.kv_quant else (None, None)
        if self.kv_quant:
            k, v = int8_codes(k, scales[0]), int8_codes(v, scales[1])
        cache.append(k, v)
        kv = KVHistory(cache.keys, cache.values, *scales, cache.offset)
        out = attend(q, kv, self.scale, span)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), kv


class KVReuseAttention(nn.Module):
    """KV-reuse attention: only Q (+ q-norm, no k-norm) against the last regular layer's K/V."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.num_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_dim, args.hidden_dim, bias=False)
        self.out_proj = nn.Linear(args.hidden_dim, args.hidden_dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def __call__(self, x: mx.array, kv: KVHistory, span: Span) -> mx.array:
        B, L, _ = x.shape  # the L queries are the span's (and the cache's) last L positions
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        out = attend(self.q_norm(span.rope(q)), kv, self.scale, span)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.hidden_dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.up_proj(x) * nn.silu(self.gate_proj(x)))  # SwiGLU: up * silu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_dim, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache, span: Span):
        r, kv = self.self_attn(self.input_layernorm(x), cache, span)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class KVReuseTransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = KVReuseAttention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_dim, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, kv: KVHistory, span: Span) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), kv, span)
        return h + self.mlp(self.post_attention_layernorm(h))


class AFMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embedding = nn.Embedding(args.vocab_size, args.hidden_dim)
        self.layers = [TransformerBlock(args) for _ in range(args.num_regular_layers)]
        self.kv_reuse_layers = [KVReuseTransformerBlock(args) for _ in range(args.num_kv_reuse_layers)]
        self.output_norm = nn.RMSNorm(args.hidden_dim, eps=args.rms_norm_eps)

    def regular(self, tokens: mx.array, cache: list[KVCache], span: Span):
        """Embedding + regular layers: hidden [B, L, hidden] and the last layer's K/V history."""
        h = self.embedding(tokens)
        for layer, layer_cache in zip(self.layers, cache):
            h, kv = layer(h, layer_cache, span)
        return h, kv

    def reuse(self, h: mx.array, kv: KVHistory, span: Span) -> mx.array:
        for layer in self.kv_reuse_layers:
            h = layer(h, kv, span)
        return self.output_norm(h)

    def head(self, h: mx.array) -> mx.array:
        """Tied output head: h @ embedding^T (few-row quantized heads go through the small-M kernel)."""
        emb = self.embedding
        if isinstance(emb, nn.QuantizedEmbedding) and emb.mode == "affine" and kernels.model_uses("qmm_small"):
            return kernels.qmm_small(h, emb.weight, emb.scales, emb.biases, bits=emb.bits,
                                     group_size=emb.group_size)
        return emb.as_linear(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.model_type = args.model_type
        self.model = AFMModel(args)
        self.rope_table = RopeTable(args.head_dim, args.rope_theta)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None,
                 num_logits: int | None = None) -> mx.array:
        """tokens [B, L] -> logits [B, L, V], or [B, num_logits, V] for the last num_logits positions.

        A decode or verify step (a few rows after a prefill) runs `forward` compiled (afm_mlx.step): the same
        arithmetic, the same logits.
        """
        cache = self.make_cache() if cache is None else cache
        if step.applies(self, tokens, cache):
            return step.logits(self, tokens, cache, num_logits)
        return self.forward(tokens, cache, self.span(cache[0].offset, tokens.shape[1]), num_logits)

    def forward(self, tokens: mx.array, cache: list, span: Span, num_logits: int | None = None) -> mx.array:
        """The reuse layers and the vocab-wide head run only for the positions whose logits are asked for:
        reuse layers attend to the regular K/V, never to each other's earlier positions, so dropping
        positions before them changes nothing for the ones kept.
        """
        h, kv = self.model.regular(tokens, cache, span)
        if num_logits is not None and num_logits < h.shape[1]:
            h = h[:, -num_logits:]
        return self.model.head(self.model.reuse(h, kv, span))

    def span(self, offset: int | mx.array, length: int) -> Span:
        if isinstance(offset, mx.array):  # a batch whose rows sit at their own positions (afm_mlx.batch)
            return Span(offset, *self.rope_table.rows_at(offset, length), padded=True)
        return Span(offset, *self.rope_table.rows(offset, length))

    def prefill(self, tokens: mx.array, cache: list[KVCache], chunk_size: int = 512) -> None:
        """Fill the caches with `tokens` [B, L] through the regular layers only, chunk by chunk.

        No reuse layer and no head runs here; generation prefills all prompt tokens but the last, then
        calls the model on the last one for its logits.
        """
        for start in range(0, tokens.shape[1], chunk_size):
            chunk = tokens[:, start:start + chunk_size]
            self.model.regular(chunk, cache, self.span(cache[0].offset, chunk.shape[1]))
            mx.eval([c.state for c in cache])

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]

    @property
    def layers(self):
        return self.model.layers + self.model.kv_reuse_layers
