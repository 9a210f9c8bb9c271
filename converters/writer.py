"""Streaming safetensors shards: tensors are appended to disk as they are produced (bounded memory).

A safetensors file is `u64 header length | JSON header | raw little-endian data`, and the header (offsets of
every tensor) must come first. Each shard's data is therefore first written to a scratch file; when the shard
is full its header is written and the data copied behind it in blocks. Shards are named like mlx-lm's
(`model.safetensors`, or `model-00001-of-00003.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from afm_mlx.errors import AFMError

DEFAULT_SHARD_BYTES = 2 * 1024**3
_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}
_COPY_BLOCK = 64 * 1024 * 1024


class ShardWriter:
    """`add(name, array)` in model order, then `close()`; returns nothing until closed."""

    def __init__(self, directory: Path, shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model"):
        self.directory, self.shard_bytes, self.prefix = Path(directory), shard_bytes, prefix
        self._shards: list[Path] = []  # finished shards, temporary names
        self._weight_map: dict[str, int] = {}  # name -> shard index
        self._entries: dict[str, dict] = {}
        self._scratch_path = self.directory / f".{prefix}.scratch"
        self._scratch = None
        self._offset = 0
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        dtype = _DTYPES.get(array.dtype)
        if dtype is None:
            raise AFMError(f"{name}: dtype {array.dtype} cannot be written to safetensors here")
        if name in self._weight_map:
            raise AFMError(f"{name} written twice")
        if self._scratch is not None and self._offset and self._offset + array.nbytes > self.shard_bytes:
            self._finish_shard()
        if self._scratch is None:
            self._scratch = open(self._scratch_path, "wb")
        flat = np.require(array.reshape(-1), dtype=array.dtype.newbyteorder("<"), requirements="C")
        self._scratch.write(memoryview(flat.view(np.uint8)))  # no copy for contiguous little-endian data
        self._entries[name] = {"dtype": dtype, "shape": list(array.shape),
                               "data_offsets": [self._offset, self._offset + array.nbytes]}
        self._weight_map[name] = len(self._shards)
        self._offset += array.nbytes
        self.total_bytes += array.nbytes

    def _finish_shard(self) -> None:
        self._scratch.close()
        header = json.dumps({"__metadata__": {"format": "mlx"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
        path = self.directory / f".{self.prefix}.shard{len(self._shards)}"
        with open(path, "wb") as out, open(self._scratch_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, _COPY_BLOCK)
        self._scratch_path.unlink()
        self._shards.append(path)
        self._scratch, self._entries, self._offset = None, {}, 0

    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names; returns them."""
        if self._scratch is not None:
            self._finish_shard()
        n = len(self._shards)
        if n == 0:
            raise AFMError("no tensors were written")
        names = ([f"{self.prefix}.safetensors"] if n == 1 else
                 [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        final = [self.directory / name for name in names]
        for tmp, dst in zip(self._shards, final):
            tmp.rename(dst)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[i] for k, i in self._weight_map.items()}}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
