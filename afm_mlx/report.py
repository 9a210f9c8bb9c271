"""Human-readable tables (rich) for `afm-mlx info`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .errors import AFMError
from .presets import PRESETS, count_parameters, kv_bytes_per_token, weight_bytes

QUANTIZATIONS = [("fp16", 16, None), ("8-bit g64", 8, None), ("4-bit g64", 4, None),
                 ("2-bit g128, 4-bit emb", 2, 4)]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def presets_table(names: list[str] | None = None, lora_rank: int = 32, console: Console | None = None) -> None:
    if type(lora_rank) is not int or not 0 <= lora_rank <= 4096:
        raise AFMError(f"--lora-rank must be an integer in 0..4096 (0: no adapter), got {lora_rank}")
    names = names or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise AFMError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    table = Table(title="AFMTextV7 presets")
    for col in ["", *names]:
        table.add_column(col, justify="right")
    args = [PRESETS[n] for n in names]
    rows = [
        ("layers (regular + KV-reuse)", [f"{a.num_regular_layers} + {a.num_kv_reuse_layers}" for a in args]),
        ("hidden / heads / KV heads / head dim",
         [f"{a.hidden_dim} / {a.num_heads} / {a.num_kv_heads} / {a.head_dim}" for a in args]),
        ("FFN / vocab", [f"{a.ffn_dim} / {a.vocab_size}" for a in args]),
        ("parameters", [f"{count_parameters(a):,}" for a in args]),
        # The toolkit trains adapters for the base only; the draft has no LoRA slots.
        (f"parameters with rank-{lora_rank} LoRA",
         [f"{count_parameters(a, lora_rank):,}" if a.num_kv_reuse_layers else "-" for a in args]),
    ]
    for label, bits, emb in QUANTIZATIONS:
        group = 128 if bits == 2 else 64
        rows.append((f"weights {label}", [_gib(weight_bytes(a, bits, group, emb)) for a in args]))
    rows.append(("KV bytes / token (int8)", [f"{kv_bytes_per_token(a):,}" for a in args]))
    for label, values in rows:
        table.add_row(label, *values)
    (console or Console()).print(table)
