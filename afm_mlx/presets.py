"""Named configurations: the 3B base, the 48.8M draft, and tiny ones for tests.

Parameter counts come from shapes alone (no weights allocated); `tests/test_presets.py` checks the
formula against a built tiny model.
"""

from .model import ModelArgs

# AFMTextV7.create_basic_builder defaults (docs/format.md 1.1): 35 regular + 21 KV-reuse layers.
BASE_3B = ModelArgs(vocab_size=153600, hidden_dim=2048, num_layers=56, num_kv_reuse_layers=21,
                    num_heads=16, num_kv_heads=2, hidden_dim_scale_factor=3.25)
# Draft (docs/format.md 1.2): 12 uniform layers, head dim 32, 4 KV heads.
DRAFT_48M = ModelArgs(vocab_size=153600, hidden_dim=256, num_layers=12, num_kv_reuse_layers=0,
                      num_heads=8, num_kv_heads=4, hidden_dim_scale_factor=3.0)
LORA_RANK = 32
PRESETS = {"base-3b": BASE_3B, "draft-48m": DRAFT_48M}


def tiny_base(vocab_size: int = 256, hidden_dim: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
              num_layers: int = 4, num_kv_reuse_layers: int = 2, kv_quant: bool = True) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers,
                     num_kv_reuse_layers=num_kv_reuse_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     hidden_dim_scale_factor=2.5, kv_quant=kv_quant)


def tiny_draft(vocab_size: int = 256, hidden_dim: int = 32, kv_quant: bool = False) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=2, num_kv_reuse_layers=0,
                     num_heads=4, num_kv_heads=2, hidden_dim_scale_factor=3.0, kv_quant=kv_quant)


def _linear_params(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one regular layer and one reuse layer."""
    d, kv, f = args.hidden_dim, args.num_kv_heads * args.head_dim, args.ffn_dim
    mlp = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    return {"regular": {"q": (d, d), "k": (d, kv), "v": (d, kv), "out": (d, d), **mlp},
            "reuse": {"q": (d, d), "out": (d, d), **mlp}}


def count_parameters(args: ModelArgs, lora_rank: int = 0) -> int:
    """Trainable parameters (kv-quant scales are buffers in tamm, not counted), plus LoRA slots if rank > 0."""
    d, hd = args.hidden_dim, args.head_dim
    shapes = _linear_params(args)
    dense = {kind: sum(i * o for i, o in proj.values()) for kind, proj in shapes.items()}
    lora = {kind: sum(lora_rank * (i + o) for i, o in proj.values()) for kind, proj in shapes.items()}
    regular = dense["regular"] + lora["regular"] + 2 * d + 2 * hd  # two norms, q/k norms
    reuse = dense["reuse"] + lora["reuse"] + 2 * d + hd  # q norm only
    return (args.vocab_size * d + d + args.num_regular_layers * regular
            + args.num_kv_reuse_layers * reuse)


def kv_bytes_per_token(args: ModelArgs) -> int:
    """Int8 codes for K and V in every regular layer (float32 without kv-quant)."""
    per_layer = 2 * args.num_kv_heads * args.head_dim
    return args.num_regular_layers * per_layer * (1 if args.kv_quant else 4)


def weight_bytes(args: ModelArgs, bits: int, group_size: int = 128, embedding_bits: int | None = None) -> int:
    """Resident bytes of the weights at an affine quantization (scale + bias per group, fp16)."""
    def quantized(n_in: int, n_out: int, b: int) -> int:
        if b >= 16:
            return n_in * n_out * 2
        return n_in * n_out * b // 8 + (n_in // group_size) * n_out * 4
    emb = quantized(args.hidden_dim, args.vocab_size, embedding_bits or bits)
    shapes = _linear_params(args)
    per = {kind: sum(quantized(i, o, bits) for i, o in proj.values()) for kind, proj in shapes.items()}
    norms = (count_parameters(args) - args.vocab_size * args.hidden_dim
             - sum(i * o for i, o in shapes["regular"].values()) * args.num_regular_layers
             - sum(i * o for i, o in shapes["reuse"].values()) * args.num_kv_reuse_layers) * 2
    return emb + per["regular"] * args.num_regular_layers + per["reuse"] * args.num_kv_reuse_layers + norms
