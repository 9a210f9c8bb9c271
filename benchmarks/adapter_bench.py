"""Decode speed with an active LoRA adapter vs none, and the time to switch adapters, on a synthetic base.

    python benchmarks/adapter_bench.py --preset small --bits 2 --tokens 64

The base is a synthetic toolkit checkpoint converted in memory (optionally quantized with nn.quantize); two full
rank-r adapters are made resident. Decode is greedy, one token per step, `mx.eval` per step, after a prefill of
--prompt tokens; each setting runs --trials times interleaved (none, adapter, none, ...) and the median is shown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from afm_mlx.adapters import add_adapter, load_adapter, set_active_adapter
from afm_mlx.converters.adapter_formats import AdapterWeights, TOOLKIT_SCALE, toolkit_key_to_name
from afm_mlx.converters.mapping import toolkit_to_mlx_arrays
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.loading import build_model
from afm_mlx.model import ModelArgs
from afm_mlx.presets import BASE_3B, tiny_base

PRESETS = {
    "tiny": tiny_base(),
    "small": ModelArgs(vocab_size=4096, hidden_dim=512, num_layers=12, num_kv_reuse_layers=4, num_heads=8,
                       num_kv_heads=2, hidden_dim_scale_factor=3.25),
    "base-3b": BASE_3B,  # needs ~13 GB for the float weights before quantization
}


def build_base(args: ModelArgs, bits: int, group_size: int) -> nn.Module:
    config, arrays = toolkit_to_mlx_arrays(synthetic_dict(args, seed=0, lora=False))
    model = build_model(config, {k: mx.array(v) for k, v in arrays.items()}, mx.float32)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
        mx.eval(model.parameters())
    return model


def toolkit_adapter(args: ModelArgs, seed: int, rank: int) -> dict[str, np.ndarray]:
    sd = synthetic_dict(args, seed=seed, lora_rank=rank, lora_nonzero=True)
    return {k: v for k, v in sd.items() if ".adapters." in k}


def as_weights(lora: dict[str, np.ndarray], rank: int) -> AdapterWeights:
    return AdapterWeights({toolkit_key_to_name(k)[0]: v for k, v in lora.items()}, rank, TOOLKIT_SCALE, "memory")


def decode_tps(model: nn.Module, prompt: mx.array, steps: int) -> float:
    cache = model.make_cache()
    model.prefill(prompt[:, :-1], cache)
    token = prompt[:, -1:]
    mx.eval(model(token, cache))  # first step outside the timing
    start = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(model(token, cache)[:, -1:], axis=-1)
        mx.eval(token)
    return steps / (time.perf_counter() - start)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--bits", type=int, default=2, help="0 for a float base, else nn.quantize bits")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    opts = parser.parse_args()

    args = PRESETS[opts.preset]
    model = build_base(args, opts.bits, opts.group_size)
    lora = toolkit_adapter(args, 1, opts.rank)
    with tempfile.TemporaryDirectory() as tmp:  # load one adapter from a toolkit .pt, as users do
        path = Path(tmp) / "adapter-final.pt"
        save_checkpoint(path, lora.items())
        start = time.perf_counter()
        load_adapter(model, path, name="a")
        load_s = time.perf_counter() - start
    add_adapter(model, as_weights(toolkit_adapter(args, 2, opts.rank), opts.rank), "b")

    prompt = mx.array(np.random.default_rng(0).integers(0, args.vocab_size, (1, opts.prompt)))
    speeds: dict[str | None, list[float]] = {None: [], "a": []}
    for _ in range(opts.trials):
        for name in speeds:
            set_active_adapter(model, name)
            speeds[name].append(decode_tps(model, prompt, opts.tokens))
    base, adapted = statistics.median(speeds[None]), statistics.median(speeds["a"])

    def switch(sequence):
        return lambda: [set_active_adapter(model, n) for n in sequence]

    set_active_adapter(model, "a")
    a_to_b = median_seconds(switch(["b", "a"]), 50) / 2
    set_active_adapter(model, None)
    on_off = median_seconds(switch(["a", None]), 50) / 2

    quant = f"{opts.bits}-bit g{opts.group_size}" if opts.bits else "float32"
    print(f"preset {opts.preset} ({quant}, {args.num_regular_layers}+{args.num_kv_reuse_layers} layers, hidden "
          f"{args.hidden_dim}), LoRA rank {opts.rank}, device {mx.default_device()}")
    print(f"decode tokens/s, no adapter : {base:8.1f}   (trials {', '.join(f'{s:.1f}' for s in speeds[None])})")
    print(f"decode tokens/s, adapter    : {adapted:8.1f}   (trials {', '.join(f'{s:.1f}' for s in speeds['a'])})")
    print(f"slowdown with adapter       : {100 * (1 - adapted / base):8.1f} %")
    print(f"switch adapter a -> b       : {a_to_b * 1e3:8.3f} ms")
    print(f"switch none <-> adapter     : {on_off * 1e3:8.3f} ms")
    print(f"load adapter from .pt       : {load_s * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
