"""The decode and verify step: `Model.forward` under one mx.compile, with the position passed as an array.

A step is a few rows (1 for decode, k + 1 for verify) after a prefill. Eagerly every step rebuilds the graph op by
op, and on a GPU each node is a launch; compiled, one trace serves every position, because nothing in it depends
on the position's value: K/V are written into the cache buffers at the position (mx.slice_update) and attention
reads the whole buffers under a causal mask (kv.padded_causal_mask). A trace is kept per (rows, logits wanted,
active adapter), and by MLX per input shapes and dtypes: the buffer size, which changes every KVCache.step
positions, and the model's dtype. The model's parameters are the compiled function's inputs, read at every call,
so new weights need no retrace; an adapter's LoRA arrays are constants of the trace, hence the adapter in the key
(and the traces of an unloaded adapter are dropped with it).

Logits are bit-identical to the eager forward on the CPU (tests/test_step.py): the same ops, the padded mask adds
exact zeros, and the row-parallel matmuls (afm_mlx.cpu) split the same way inside the trace.
"""

from __future__ import annotations

import mlx.core as mx

from . import kernels
from .cache import KVCache

MAX_ROWS = 16  # verify of up to 15 drafts; longer inputs are prefill, run eagerly
ENABLED = True  # False: every call eager (the probes compare the two)


class Slots:
    """A KVCache's buffers inside the trace: append writes at the array position, and no shape depends on it."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def append(self, keys: mx.array, values: mx.array) -> None:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        self.offset = self.offset + keys.shape[2]


def applies(model, tokens: mx.array, cache: list) -> bool:
    """A few rows onto filled afm-mlx caches, all at one length, and no kernel that needs the length as an int."""
    if not ENABLED or tokens.shape[1] > MAX_ROWS or kernels.model_uses("kv_attention"):
        return False
    first = cache[0]
    return all(type(c) is KVCache and c.keys is not None and c.offset == first.offset for c in cache)


def logits(model, tokens: mx.array, cache: list[KVCache], num_logits: int | None) -> mx.array:
    """model(tokens, cache, num_logits) through the compiled step; the caches advance as in the eager forward."""
    rows = tokens.shape[1]
    offset = cache[0].offset
    for c in cache:
        c.reserve(rows)
    cos, sin = model.rope_table.rows(offset, rows)
    step = _compiled(model, rows, num_logits or rows)
    out, buffers = step(tokens, mx.array([offset], dtype=mx.int32), cos, sin, [(c.keys, c.values) for c in cache])
    for c, (keys, values) in zip(cache, buffers):
        c.keys, c.values, c.offset = keys, values, offset + rows
    return out


def _compiled(model, rows: int, num_logits: int):
    from .adapters import _registry  # the adapter module imports the model's modules

    registry = _registry(model)
    adapter = registry.adapters.get(registry.active) if registry.active is not None else None
    steps = model.__dict__.setdefault("_compiled_steps", {})  # a plain attribute: not a parameter
    key = (rows, num_logits, id(adapter))
    entry = steps.get(key)
    if entry is None or entry[0] is not adapter:  # the id of an unloaded adapter may come back
        resident = list(registry.adapters.values())
        for stale in [k for k, (a, _) in steps.items() if a is not None and all(a is not r for r in resident)]:
            del steps[stale]  # its LoRA arrays live on in the trace otherwise
        entry = steps[key] = (adapter, _trace(model, num_logits))
    return entry[1]


def _trace(model, num_logits: int):
    from .model import Span

    def step(tokens, position, cos, sin, buffers):
        cache = [Slots(keys, values, position) for keys, values in buffers]
        out = model.forward(tokens, cache, Span(position, cos, sin, padded=True), num_logits)
        return out, [(c.keys, c.values) for c in cache]

    return mx.compile(step, inputs=model)
