"""Prompt K/V shared across requests: a system message or few-shot examples are prefilled once.

    cache = PrefixCache(model, max_bytes=256 << 20)
    caches, reused = cache.lookup(ids, adapter)    # fresh per-sequence KVCaches holding ids[:reused]
    ...prefill ids[reused:] into them...
    cache.store(ids, adapter, [c.state for c in caches])   # keep their first len(ids) positions for later

Entries are whole prompts (the ids a row prefilled) keyed by adapter (a LoRA changes the K/V); a lookup reuses the
longest common prefix with any entry. Bounded in bytes of K/V held, least recently used evicted first; an entry
that is a prefix of a newer one is replaced by it. The stored arrays are never written: a row gets its own
slices of them, and KVCache grows (copies) before its first append past them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from .cache import KVCache
from .generation import _common_prefix
from .model import Model

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20


@dataclass
class _Entry:
    ids: tuple[int, ...]
    adapter: str | None
    kv: list[tuple[mx.array, mx.array]]  # per regular layer, [1, KV, len(ids), D]
    nbytes: int


class PrefixCache:
    def __init__(self, model: Model, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        self.model, self.max_bytes = model, max_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self.nbytes = 0
        self.hits = self.reused_tokens = 0
        self._key = 0

    def lookup(self, ids: list[int], adapter: str | None) -> tuple[list[KVCache], int]:
        """New caches for one sequence holding the longest cached prefix of ids (and its length)."""
        caches = self.model.make_cache()
        best, entry = 0, None
        for key, candidate in self.entries.items():
            n = _common_prefix(candidate.ids, ids) if candidate.adapter == adapter else 0
            if n > best:
                best, entry = n, key
        if entry is not None:
            self.entries.move_to_end(entry)
            for c, (k, v) in zip(caches, self.entries[entry].kv):
                c.state = (k[:, :, :best], v[:, :, :best])
            self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + best
        return caches, best

    def store(self, ids: list[int], adapter: str | None, kv: list[tuple[mx.array, mx.array]]) -> None:
        """Keep the first len(ids) positions of one sequence's K/V (per regular layer, [1, KV, >= len(ids), D])."""
        ids = tuple(ids)
        if not ids:
            return
        for key, e in list(self.entries.items()):
            if e.adapter == adapter and e.ids[:len(ids)] == ids:
                self.entries.move_to_end(key)  # already covered
                return
            if e.adapter == adapter and ids[:len(e.ids)] == e.ids:
                self._remove(key)  # superseded by the longer prompt
        kv = [(k[:, :, :len(ids)], v[:, :, :len(ids)]) for k, v in kv]
        mx.eval(kv)
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if nbytes > self.max_bytes:
            return
        self._key += 1
        self.entries[self._key] = _Entry(ids, adapter, kv, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self.entries)))

    def _remove(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
