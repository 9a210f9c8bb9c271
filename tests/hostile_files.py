"""Small hostile inputs for the readers (issue #16 section 1), each written to a path by a `write_*` function.

Every file here is a few KB at most, yet, read naively, makes the reader allocate gigabytes or loop for ever:
the fuzz suite (test_fuzz_hostile.py) reads them in a child process bounded in memory and time.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from afm_mlx.converters import torch_zip as tz

ARCHIVE = "archive"


def checkpoint_zip(path: Path, records: dict[str, bytes], deflate: tuple[str, ...] = ()) -> Path:
    """A torch-style zip: `records` under ARCHIVE/, stored (or deflated for the names in `deflate`)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            zf.writestr(f"{ARCHIVE}/{name}", data, compress_type=method)
    return path


def tensor_pickle(tensors: dict[str, tuple[str, int, tuple, tuple]]) -> bytes:
    """data.pkl of an OrderedDict name -> float32 tensor (storage key, storage numel, shape, stride)."""
    items = b""
    for name, (key, numel, shape, stride) in tensors.items():
        entry = tz._p_tensor(tz._Entry(name, "float32", shape, key, numel))
        contiguous = tz._p_tuple(map(tz._p_int, tz._contiguous_strides(shape)))
        items += tz._p_str(name) + entry.replace(contiguous, tz._p_tuple(map(tz._p_int, stride)), 1)
    return b"\x80\x02" + tz._p_global("collections", "OrderedDict") + b")R(" + items + b"u."


def _base_records(pickled: bytes, **data: bytes) -> dict[str, bytes]:
    return {"data.pkl": pickled, "byteorder": b"little", **{f"data/{k}": v for k, v in data.items()},
            "version": b"3\n"}


def write_shared_dict(path: Path) -> Path:
    """One dict at every nesting level, 12 keys x 14 levels: 12**14 paths through a 2 KB pickle."""
    node: dict = {"leaf": 0}
    for _ in range(14):
        node = {f"k{i}": node for i in range(12)}
    return checkpoint_zip(path, _base_records(pickle.dumps(node, protocol=2)))


def write_long_names(path: Path) -> Path:
    """A 200 KB key above 20,000 entries: flattening repeats the key in each name (4 GB of names)."""
    inner = {f"{i}": i for i in range(20_000)}
    return checkpoint_zip(path, _base_records(pickle.dumps({"x" * 200_000: inner}, protocol=2)))


LORA_KEY = "layers.segment_0.layer_0.attention.qkv_transform.adapters.base_adapter.lora_0.a_transpose"


def write_stride0(path: Path, numel: int = 1 << 30, name: str = LORA_KEY) -> Path:
    """A stride-0 view of a 1-element storage declaring `numel` float32s (4 GB by default): under a LoRA name, the
    issue's 779-byte adapter."""
    pickled = tensor_pickle({name: ("0", 1, (numel, 1), (0, 0))})
    return checkpoint_zip(path, _base_records(pickled, **{"0": np.ones(1, np.float32).tobytes()}))


def write_stride0_2d(path: Path) -> Path:
    """The same in two dimensions (rows and columns both stride 0): 128 GB declared."""
    pickled = tensor_pickle({"w": ("0", 1, (1 << 18, 1 << 17), (0, 0))})
    return checkpoint_zip(path, _base_records(pickled, **{"0": np.ones(1, np.float32).tobytes()}))


def write_many_views(path: Path) -> Path:
    """3,000 distinct overlapping views (different lengths) of one 128 KB storage: 390 MB declared."""
    n = 32_768
    tensors = {f"s{i}": ("0", n, (n - i,), (1,)) for i in range(1, 3_000)}
    return checkpoint_zip(path, _base_records(tensor_pickle(tensors), **{"0": bytes(4 * n)}))


def write_memo_index(path: Path) -> Path:
    """LONG_BINPUT 2**28: the C unpickler grows its memo array to that index (4.2 GB)."""
    return checkpoint_zip(path, _base_records(b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 28) + b"."))


def write_colliding_keys(path: Path, count: int = 40_000) -> Path:
    """A dict keyed by `count` ints k * (2**61 - 1), which all hash to 0: building it is quadratic (40,000 keys,
    520 KB: about 25 s)."""
    keys = b"".join(tz._p_int(k * ((1 << 61) - 1)) + b"N" for k in range(1, count + 1))
    return checkpoint_zip(path, _base_records(b"\x80\x02}(" + keys + b"u."))


def write_many_containers(path: Path, count: int = 4_000_000) -> Path:
    """A list of 4 million empty dicts: one byte each in the pickle, 64 bytes each in memory (290 MB)."""
    return checkpoint_zip(path, _base_records(b"\x80\x02](" + b"}" * count + b"e."))


def write_deflated_pickle(path: Path, size: int = 128 << 20) -> Path:
    """data.pkl deflated: 128 MB of zeros in a ~130 KB file (written in chunks: the test never holds it)."""
    checkpoint_zip(path, _base_records(b""))
    with zipfile.ZipFile(path) as zf:
        records = {i.filename: zf.read(i) for i in zf.infolist() if not i.filename.endswith("data.pkl")}
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(f"{ARCHIVE}/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as record:
            chunk = bytes(16 << 20)
            for _ in range(size // len(chunk)):
                record.write(chunk)
        for name, data in records.items():
            zf.writestr(name, data)
    return path


def write_overlapping_entries(path: Path, copies: int = 256) -> Path:
    """`copies` zip entries data/0..N-1 all pointing at one 1 MB record (a non-recursive zip bomb): 256 MB
    declared by a 1 MB file."""
    numel = 1 << 18
    tensors = {f"w{i}": (str(i), numel, (numel,), (1,)) for i in range(copies)}
    checkpoint_zip(path, _base_records(tensor_pickle(tensors), **{"0": bytes(4 * numel)}))
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    template = infos[f"{ARCHIVE}/data/0"]
    data = bytearray(path.read_bytes())
    eocd = data.rindex(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    central = bytes(data[cd_offset:cd_offset + cd_size])
    extra = b"".join(_central_entry(template, f"{ARCHIVE}/data/{i}") for i in range(1, copies))
    struct.pack_into("<HHI", data, eocd + 8, count + copies - 1, count + copies - 1, cd_size + len(extra))
    path.write_bytes(bytes(data[:cd_offset]) + central + extra + bytes(data[eocd:]))
    return path


def _central_entry(info: zipfile.ZipInfo, name: str) -> bytes:
    encoded = name.encode()
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, info.CRC, info.compress_size,
                       info.file_size, len(encoded), 0, 0, 0, 0, 0, info.header_offset) + encoded


def write_deep_metadata(path: Path) -> Path:
    """A .fmadapter whose metadata.json nests 100,000 lists deep: json.loads recurses until RecursionError."""
    path.mkdir()
    (path / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)
    (path / "adapter_weights.bin").write_bytes(struct.pack("<II", 0, 2) + bytes(56))
    return path


def write_deep_mlx_config(path: Path) -> Path:
    """An mlx-lm adapter dir whose adapter_config.json nests 100,000 dicts deep."""
    path.mkdir()
    (path / "adapter_config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    (path / "adapters.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    return path


HOSTILE = {  # name -> (reader kind, writer, file name)
    "shared_dict": ("pt", write_shared_dict, "shared.pt"),
    "long_names": ("pt", write_long_names, "names.pt"),
    "stride0_4gb": ("pt", write_stride0, "stride0.pt"),
    "stride0_128gb": ("pt", write_stride0_2d, "stride0_2d.pt"),
    "many_views": ("pt", write_many_views, "views.pt"),
    "memo_index": ("pt", write_memo_index, "memo.pt"),
    "colliding_keys": ("pt", write_colliding_keys, "keys.pt"),
    "many_containers": ("pt", write_many_containers, "containers.pt"),
    "deflated_pickle": ("pt", write_deflated_pickle, "bomb.pt"),
    "overlapping_entries": ("pt", write_overlapping_entries, "overlap.pt"),
    "stride0_adapter": ("adapter", write_stride0, "adapter-final.pt"),
    "deep_metadata": ("adapter", write_deep_metadata, "deep.fmadapter"),
    "deep_mlx_config": ("adapter", write_deep_mlx_config, "deep_mlx"),
}
