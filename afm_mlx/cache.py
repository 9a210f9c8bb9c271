"""KV cache: one per *regular* layer (the KV-reuse layers read the last regular layer's cache).

Storage is dtype-agnostic: the model hands over int8 codes when the checkpoint has kv-quant scales
(lossless, because AFM's K/V are on that int8 grid by construction: 17,920 bytes/token for the 3B base
instead of 71,680 in fp32) and floats otherwise (a draft without kv-quantizer buffers).

Arrays are [B, KV heads, S_alloc, head dim] and grow in chunks of `step` positions; `offset` is the number of
valid positions. `trim(n)` only moves `offset` back: speculative rollback costs nothing, and the next update
overwrites the stale slots.
"""

from __future__ import annotations

import mlx.core as mx



class KVCache:
    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Append keys/values [B, KV, L, D] after the `offset` valid positions."""
        new = keys.shape[2]
        if self.keys is None or self.offset + new > self.keys.shape[2]:
            self._grow(keys, values, new)
        self.keys[..., self.offset:self.offset + new, :] = keys
        self.values[..., self.offset:self.offset + new, :] = values
        self.offset += new

    def reserve(self, new: int) -> None:
        """Room for `new` more positions, without writing them (the compiled step writes into the buffers)."""
        if self.offset + new > self.keys.shape[2]:
            self._grow(self.keys, self.values, new)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys/values [B, KV, L, D]; return the full history [B, KV, offset, D] (mlx-lm's cache API)."""
        self.append(keys, values)
        return self.state

    def _grow(self, keys: mx.array, values: mx.array, new: int) -> None:
        B, n_kv, _, _ = keys.shape
        size = ((self.offset + new + self.step - 1) // self.step) * self.step
        k = mx.zeros((B, n_kv, size, keys.shape[3]), keys.dtype)
        v = mx.zeros((B, n_kv, size, values.shape[3]), values.dtype)
        if self.keys is not None and self.offset > 0:
            k[..., :self.offset, :] = self.keys[..., :self.offset, :]
            v[..., :self.offset, :] = self.values[..., :self.offset, :]
        self.keys, self.values = k, v

    def trim(self, n: int) -> int:
        """Forget the last n positions (speculative rollback); returns how many were dropped."""
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the valid positions (K and V)."""
        return sum(a.nbytes for a in self.state)
