"""Read and write PyTorch zip checkpoints (`torch.save` format) without torch.

A `torch.save` file is a ZIP archive whose entries all live under one folder `<name>/`:

    <name>/data.pkl        pickle (protocol 2) of the saved object; tensors are `_rebuild_tensor_v2` calls whose
                           storages are persistent ids ("storage", <torch.FloatStorage>, key, location, numel)
    <name>/data/<key>      raw little-endian bytes of storage <key>, stored uncompressed, 64-byte aligned
    <name>/byteorder       "little" (absent in files from torch < 1.10: little is implied)
    <name>/version         serialization format version ("3\\n")
    <name>/.format_version, .storage_alignment, .data/serialization_id   bookkeeping written by torch >= 2.1

Reading: `open_checkpoint(path)` parses data.pkl through an allow-listed unpickler (no global is ever imported or
called: it only ever sees our own stand-ins) and exposes the tensors as `LazyTensor`s whose bytes are memory-mapped
straight from the zip on demand, so a 12.7 GB checkpoint is read one tensor at a time in bounded memory.
A checkpoint is untrusted: what reading it can allocate is paid for by the file (tensors' declared bytes by their
data, data.pkl's size, opcodes and flattened names capped, each dict walked once), see the limits below and
tests/test_fuzz_hostile.py.

Writing: `save_checkpoint(path, tensors, tie=...)` writes the same layout one tensor at a time (torch.load,
weights_only=True, reads it; tests cross-check), atomically through a temporary sibling.

Nested roots: a root dict without tensors that wraps the weights under "state_dict" / "model_state_dict" / "model" /
"module" is unwrapped; nested dicts inside the state dict are flattened with "." (torch's own module-path naming);
non-tensor leaves (ints, strings, ...) go to `Checkpoint.extras` instead of the tensor mapping.
"""

from __future__ import annotations

import _compat_pickle  # stdlib: the Python 2 -> 3 name table pickle itself uses
import collections
import hashlib
import io
import math
import mmap
import os
import pickle
import struct
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from afm_mlx.errors import AFMError

from .output import publish_file, staging_file

__all__ = ["BF16", "Checkpoint", "LazyTensor", "bf16_bits_to_float32", "float32_to_bf16_bits", "open_checkpoint",
           "save_checkpoint"]

# ---------------------------------------------------------------------------------------------------------------
# dtypes

# torch storage class name -> our dtype name. Storage types are how torch's pickle names a tensor's element type.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",  # torch >= 2 saving a raw untyped storage: bytes
}
_DTYPE_STORAGE = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}

# our dtype name -> NumPy dtype of the stored bytes (bfloat16 has no NumPy type: its bits are kept as uint16).
_NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# torch.float32-style dtype objects (they can appear as plain values in newer pickles): name -> our dtype name.
_TORCH_DTYPE_NAMES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32", "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8",
    "bool": "bool",
}

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_MAX_NESTING = 16

# Limits on what a (possibly hostile) file can make the reader allocate. Real files are far inside them: the 3B
# base's data.pkl is about 0.3 MB, its names about 100 characters.
_MAX_PICKLE_BYTES = 32 << 20  # data.pkl
_MAX_PICKLE_OPS = 1 << 19  # its opcodes: torch writes ~32 per tensor (3B base + LoRA: ~61,000)
_MAX_SMALL_RECORD = 4096  # version, byteorder
_MAX_NAMES_FACTOR = 2  # flattened names may total at most 2x data.pkl's size (+ 64 KiB): nesting repeats prefixes
_MAX_NDIM = 32
_MAX_DIM = 1 << 48  # per size / stride entry: anything larger cannot be a real tensor
# A broadcast view (stride 0, e.g. torch.zeros(1).expand(n)) declares more bytes than its storage holds. Such
# views are allowed, but all distinct views together may declare at most the archive's data plus this much.
_VIEW_ALLOWANCE = 16 << 20
_ALIGNMENT = 64  # torch aligns every data record to 64 bytes (its `.storage_alignment`)
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # ZIP local file header: 30 bytes, name/extra lengths last
_LOCAL_HEADER_MAGIC = 0x04034B50


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shifting the 16 bits up by 16 gives the exact float32 value."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: one float32-sized buffer in total
    return wide.view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits the way torch does (round to nearest even; NaN -> 0x7FC0)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


# ---------------------------------------------------------------------------------------------------------------
# restricted unpickling

class _StorageType(NamedTuple):
    """Stand-in for torch.FloatStorage & co: only carries the dtype (a tuple: BUILD cannot mutate it)."""

    torch_name: str
    dtype: str | None


class _TorchDtype(NamedTuple):
    """Stand-in for a torch.float32-style dtype object."""

    dtype: str


class _StorageRef(NamedTuple):
    """What a storage persistent id resolves to: the zip entry `data/<key>` holding `numel` elements of `dtype`."""

    key: str
    dtype: str
    numel: int


class _TensorRecord(NamedTuple):
    """A `_rebuild_tensor_v2` call, unvalidated (the Checkpoint validates every record after unpickling)."""

    storage: Any
    storage_offset: Any
    shape: Any
    stride: Any


def _encode_latin1(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol-2 pickles write bytes objects as _codecs.encode(str, "latin1"): harmless, so allowed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode only allowed as (str, 'latin1')")
    return text.encode("latin1")


class _Inert:
    """An allow-listed callable as the unpickler hands it out: nothing a file could set (BUILD on a plain function
    could rewrite its __defaults__ for the whole process)."""

    __slots__ = ("_call",)

    def __init__(self, call: Callable[..., Any]):
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")


_CODECS_ENCODE = _Inert(_encode_latin1)

# Dict keys and set items must hash unpredictably (str, bytes: seeded per process) or uniquely (small ints):
# ints k * (2**61 - 1) all hash to 0, and 20,000 of them (a 200 KB file) take 6 s to put in a dict, quadratically
# more beyond. Torch's pickles only ever key by strings (an optimizer state by small ints).
_HASH_MODULUS = sys.hash_info.modulus


def _check_hashable(value: Any) -> None:
    if type(value) in (str, bytes, bool, type(None)):
        return
    if type(value) is int and -_HASH_MODULUS < value < _HASH_MODULUS:
        return
    raise pickle.UnpicklingError(f"{type(value).__name__} {_describe(value)} as a dict key or set item")


def _hash_checked(loader: Callable[[Any], None], step: int) -> Callable[[Any], None]:
    """An opcode loader whose items since the last MARK (every `step`-th: the keys) are checked first."""
    def load(unpickler: Any) -> None:
        for item in unpickler.stack[::step]:
            _check_hashable(item)
        loader(unpickler)
    return load


def _checked_new(kind: type) -> Callable[..., Any]:
    """dict / set / frozenset / OrderedDict as REDUCE calls them: `kind()` or `kind(list)`, items checked."""
    def new(*args: Any) -> Any:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            raise pickle.UnpicklingError(f"{kind.__name__} called with {len(args)} arguments")
        items = args[0] if args else ()
        for item in items:
            _check_hashable(item[0] if kind in (dict, collections.OrderedDict) and type(item) is tuple else item)
        return kind(*args)
    return new


_ORDERED_DICT = _Inert(_checked_new(collections.OrderedDict))


def _counted(loader: Callable[[Any], None]) -> Callable[[Any], None]:
    """An opcode loader that spends one of the unpickler's _MAX_PICKLE_OPS: one opcode byte can make a 64-byte
    object (an empty dict), so the number of opcodes, not the pickle's size, bounds its memory."""
    def load(unpickler: Any) -> None:
        unpickler._ops_left -= 1
        if unpickler._ops_left < 0:
            raise pickle.UnpicklingError(f"more than {_MAX_PICKLE_OPS} pickle operations")
        loader(unpickler)
    return load


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only allow-listed globals, each to an inert stand-in; never imports anything.

    It is pickle's pure-Python unpickler (data.pkl is small: 0.3 MB for the 3B base, ~25 ms): its memo is a dict,
    where the C unpickler grows an array to the largest index a file names (a 9-byte LONG_BINPUT 2**28 took
    4.2 GB). BUILD is only accepted on dicts the file itself made (torch sets a state dict's `_metadata` so):
    never on a stand-in, whose state would then change for the whole process.
    """

    _BUILTIN_TYPES = {"dict": _Inert(_checked_new(dict)), "list": list, "tuple": tuple,
                      "set": _Inert(_checked_new(set)), "frozenset": _Inert(_checked_new(frozenset))}
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BytesIO, source_name: str):
        super().__init__(file)
        self._source_name = source_name

    def load_build(self) -> None:
        if type(self.stack[-2]) not in (dict, collections.OrderedDict):
            raise pickle.UnpicklingError(f"BUILD on a {type(self.stack[-2]).__name__}: only a dict's attributes")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load_setitem(self) -> None:
        _check_hashable(self.stack[-2])
        super().load_setitem()

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.DICT[0]] = _hash_checked(pickle._Unpickler.load_dict, 2)
    dispatch[pickle.SETITEMS[0]] = _hash_checked(pickle._Unpickler.load_setitems, 2)
    dispatch[pickle.ADDITEMS[0]] = _hash_checked(pickle._Unpickler.load_additems, 1)
    dispatch[pickle.FROZENSET[0]] = _hash_checked(pickle._Unpickler.load_frozenset, 1)
    dispatch = {opcode: _counted(loader) for opcode, loader in dispatch.items()}
    _ops_left = _MAX_PICKLE_OPS

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 spells some names the Python 2 way (__builtin__.eval, commands.call): use Python 3's names
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._allowed(module, name)
        if found is None:
            raise AFMError(
                f"refusing to unpickle global {module}.{name} in {self._source_name}: not a tensor checkpoint")
        return found

    def _allowed(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _ORDERED_DICT
        if module == "builtins" and name in self._BUILTIN_TYPES:
            return self._BUILTIN_TYPES[name]
        if (module, name) == ("_codecs", "encode"):
            return _CODECS_ENCODE
        if module == "torch._utils":
            return _REBUILDERS.get(name)
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) == ("torch.storage", "TypedStorage"):
            return _StorageType(name, None)  # no dtype of its own: refused if used as a storage type
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _TorchDtype(_TORCH_DTYPE_NAMES[name])
        return None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ("storage", storage_type, key, location, numel): the only persistent id torch's zip format writes.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {_describe(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
            raise pickle.UnpicklingError(f"storage type {_describe(storage_type)} has no dtype")
        if not isinstance(key, str) or not _is_count(numel):
            raise pickle.UnpicklingError(f"malformed storage id (key {_describe(key)}, numel {_describe(numel)})")
        return _StorageRef(key, storage_type.dtype, numel)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # nn.Parameter is a tensor plus requires_grad, which inference does not need


_REBUILDERS = {"_rebuild_tensor_v2": _Inert(_rebuild_tensor_v2), "_rebuild_tensor": _Inert(_rebuild_tensor),
               "_rebuild_parameter": _Inert(_rebuild_parameter),
               "_rebuild_parameter_with_state": _Inert(_rebuild_parameter)}


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _describe(value: Any) -> str:
    """A short description of a file-made value for an error message. Never a full repr: the repr of a structure
    shared across nesting levels is exponential, and a huge int's repr raises."""
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit int>"
    if value is None or isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, _StorageType):
        return value.torch_name
    return f"<{type(value).__name__}>"


def _unpickle(data: bytes, source_name: str) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source_name).load()
    except AFMError:
        raise
    except Exception as err:  # any malformed pickle: a one-line error, never a traceback
        raise AFMError(f"{source_name}: malformed data.pkl ({_one_line(err)})") from None


def _one_line(err: BaseException, limit: int = 160) -> str:
    # messages quoting bytes from a hostile file can hold newlines: keep the error on one line, bounded
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# reading

class LazyTensor:
    """One tensor of an open checkpoint; nothing is read until `.numpy()`.

    shape/stride/storage_offset are in elements, as in torch. `numpy()` maps only this tensor's storage.
    """

    __slots__ = ("_checkpoint", "_storage", "_data_offset", "shape", "stride", "storage_offset")

    def __init__(self, checkpoint: Checkpoint, storage: _StorageRef, data_offset: int,
                 shape: tuple[int, ...], stride: tuple[int, ...], storage_offset: int):
        self._checkpoint = checkpoint
        self._storage = storage
        self._data_offset = data_offset  # byte offset of the storage's first element in the checkpoint file
        self.shape = shape
        self.stride = stride
        self.storage_offset = storage_offset

    @property
    def dtype(self) -> str:
        return self._storage.dtype

    @property
    def storage_key(self) -> str:
        return self._storage.key

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _NUMPY_DTYPES[self.dtype].itemsize

    def is_contiguous(self) -> bool:
        return self.stride == _contiguous_strides(self.shape) or self.numel <= 1

    def numpy(self, raw: bool = False, copy: bool = False) -> np.ndarray:
        """The tensor as NumPy: a read-only memory-mapped view, or with copy=True an owned writable array.

        bfloat16 comes back as float32 (exact), or as its uint16 bit pattern with raw=True. copy=True reads
        contiguous tensors straight into the result (peak memory = the tensor once, no mapping kept).
        """
        if copy and self.is_contiguous():
            bits = self._checkpoint._read_into(self._data_offset + self._byte_offset(),
                                               np.empty(self.shape, _NUMPY_DTYPES[self.dtype]))
        else:
            bits = self._mapped_view()
            if copy:
                bits = np.array(bits, copy=True)
        if self.dtype == "bfloat16" and not raw:
            return bf16_bits_to_float32(bits)
        return bits

    def _byte_offset(self) -> int:
        return self.storage_offset * _NUMPY_DTYPES[self.dtype].itemsize

    def _mapped_view(self) -> np.ndarray:
        np_dtype = _NUMPY_DTYPES[self.dtype]
        if self.numel == 0:
            return np.empty(self.shape, np_dtype)
        # map only the bytes this tensor can touch (bounds validated when the checkpoint was opened)
        span = _max_index(self.shape, self.stride) + 1
        flat = self._checkpoint._map(self._data_offset + self._byte_offset(), span * np_dtype.itemsize, np_dtype)
        strides = tuple(s * np_dtype.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(flat, self.shape, strides, writeable=False)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, storage={self.storage_key!r})"


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def _max_index(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Largest element index (relative to storage_offset) a strided view reads; shape must be non-empty."""
    return sum((n - 1) * s for n, s in zip(shape, stride))


class Checkpoint(Mapping):
    """A read-only name -> LazyTensor mapping over a PyTorch zip checkpoint, in state-dict order.

    Also: `.extras` (non-tensor entries), `.version` (format version int), `.archive_name`, `.path`,
    `shares_storage(a, b)`. Use as a context manager, or call `close()`; views already returned stay valid.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._name = self.path.name
        self._lock = threading.Lock()  # the file position is shared by zip reads and copy reads
        self._file = _open_file(self.path)
        try:
            self._zip = _open_zip(self._file, self._name)
            self._load()
        except BaseException:
            self._file.close()
            raise

    # --- opening

    def _load(self) -> None:
        self.archive_name = _find_archive_name(self._zip, self._name)
        self._file_size = os.fstat(self._file.fileno()).st_size
        self._check_byteorder()
        self.version = self._read_version()
        pickled = self._read_record("data.pkl", _MAX_PICKLE_BYTES)
        root = _unpickle(pickled, self._name)
        state, self.extras = _split_root(root, self._name, _MAX_NAMES_FACTOR * len(pickled) + (64 << 10))
        self._storage_offsets: dict[str, int] = {}
        self._tensors = {name: self._make_tensor(name, record) for name, record in state.items()}
        self._check_declared_bytes()

    def _read_record(self, relative: str, limit: int) -> bytes:
        """A small record, read whole: at most `limit` bytes, and no more than the file's own size (a compressed
        record cannot inflate beyond what the file holds: no zip bombs)."""
        info = self._zip.NameToInfo.get(f"{self.archive_name}/{relative}")
        if info is None:
            raise AFMError(f"{self._name}: missing {self.archive_name}/{relative}; not a complete "
                           "PyTorch checkpoint")
        if info.file_size > min(limit, self._file_size):
            raise AFMError(f"{self._name}: {relative} declares {info.file_size} bytes, more than "
                           f"{min(limit, self._file_size)} (the most it may hold); not a PyTorch checkpoint")
        try:
            with self._zip.open(info) as record:
                return record.read(info.file_size)
        except Exception as err:  # zipfile raises many types on damaged archives (CRC, struct, zlib, ...)
            raise AFMError(f"{self._name}: cannot read {relative} ({_one_line(err)}); file damaged?") from None

    def _has_record(self, relative: str) -> bool:
        return f"{self.archive_name}/{relative}" in self._zip.NameToInfo

    def _check_byteorder(self) -> None:
        # torch < 1.10 wrote no byteorder record: those files are little-endian
        if self._has_record("byteorder"):
            order = self._read_record("byteorder", _MAX_SMALL_RECORD)
            if order != b"little":
                raise AFMError(f"{self._name}: byteorder {order.decode('latin1')!r} is not supported "
                               "(only little-endian checkpoints); re-save it on a little-endian machine")

    def _read_version(self) -> int:
        # torch's own reader requires this record (in `.data/version` for newer files, else `version`)
        relative = ".data/version" if self._has_record(".data/version") else "version"
        text = self._read_record(relative, _MAX_SMALL_RECORD)
        try:
            return int(text.strip())
        except ValueError:
            raise AFMError(f"{self._name}: unreadable format version {text[:20]!r}") from None

    def _make_tensor(self, name: str, record: Any) -> LazyTensor:
        if not isinstance(record, _TensorRecord) or not isinstance(record.storage, _StorageRef):
            raise AFMError(f"{self._name}: entry {_describe(name)} is not a tensor")
        shape, stride, offset = record.shape, record.stride, record.storage_offset
        if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride) <= _MAX_NDIM
                and all(_is_count(v) and v < _MAX_DIM for v in shape + stride) and _is_count(offset)):
            raise AFMError(f"{self._name}: tensor {_describe(name)} has malformed size/stride/offset")
        storage = record.storage
        end = offset + (_max_index(shape, stride) + 1 if math.prod(shape) else 0)
        if end > storage.numel:
            raise AFMError(f"{self._name}: tensor {_describe(name)} reaches element {end} of a {storage.numel}-element "
                           "storage; file damaged?")
        return LazyTensor(self, storage, self._storage_data_offset(storage), shape, stride, offset)

    def _check_declared_bytes(self) -> None:
        """What reading every tensor can materialise must be paid for by the file: the bytes all distinct views
        declare (a tied head is the same view as its embedding: counted once) at most the data they view (never
        more than the file) + _VIEW_ALLOWANCE. Stops stride-0 views of a 1-element storage declaring gigabytes."""
        views = {(t.storage_key, t.dtype, t.storage_offset, t.shape, t.stride): t.nbytes for t in self._tensors.values()}
        storages: dict[str, int] = {}
        for t in self._tensors.values():
            size = t._storage.numel * _NUMPY_DTYPES[t.dtype].itemsize
            storages[t.storage_key] = max(size, storages.get(t.storage_key, 0))
        declared, data = sum(views.values()), min(sum(storages.values()), self._file_size)
        if declared > data + _VIEW_ALLOWANCE:
            raise AFMError(f"{self._name}: its tensors declare {declared} bytes but the file holds {data} bytes of "
                           "tensor data (overlapping or stride-0 views); not a real checkpoint")

    def _storage_data_offset(self, storage: _StorageRef) -> int:
        """File offset of `data/<key>`'s bytes, checked: present, uncompressed, large enough, inside the file."""
        if storage.key not in self._storage_offsets:
            self._storage_offsets[storage.key] = self._locate_entry(f"data/{storage.key}")
        entry = self._zip.getinfo(f"{self.archive_name}/data/{storage.key}")
        needed = storage.numel * _NUMPY_DTYPES[storage.dtype].itemsize
        if entry.file_size < needed:
            raise AFMError(f"{self._name}: data/{storage.key} holds {entry.file_size} bytes, "
                           f"its storage needs {needed}; file damaged?")
        return self._storage_offsets[storage.key]

    def _locate_entry(self, relative: str) -> int:
        full = f"{self.archive_name}/{relative}"
        entry = self._zip.NameToInfo.get(full)
        if entry is None:
            raise AFMError(f"{self._name}: missing tensor data {full}; file truncated or damaged?")
        if entry.compress_type != zipfile.ZIP_STORED:
            raise AFMError(f"{self._name}: {full} is compressed; torch writes tensor data uncompressed "
                           "(was the file re-zipped?). Re-save it with torch.save")
        header = os.pread(self._file.fileno(), _LOCAL_HEADER.size, entry.header_offset)
        if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != _LOCAL_HEADER_MAGIC:
            raise AFMError(f"{self._name}: bad zip header for {full}; file damaged?")
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
        start = entry.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + entry.file_size > self._file_size:
            raise AFMError(f"{self._name}: {full} runs past the end of the file; file truncated?")
        return start

    # --- data access (used by LazyTensor)

    def _check_open(self) -> None:
        if self._file.closed:
            raise AFMError(f"{self._name}: checkpoint is closed; read tensors inside the `with` block")

    def _map(self, offset: int, nbytes: int, np_dtype: np.dtype) -> np.ndarray:
        self._check_open()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be granularity-aligned
        mapped = mmap.mmap(self._file.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
        # the array keeps the mapping alive; it is unmapped when the last view is dropped
        return np.frombuffer(mapped, np_dtype, nbytes // np_dtype.itemsize, offset - start)

    def _read_into(self, offset: int, out: np.ndarray) -> np.ndarray:
        self._check_open()
        view = memoryview(out.reshape(-1)).cast("B")
        with self._lock:
            self._file.seek(offset)
            done = 0
            while done < len(view):  # large reads can come back short
                got = self._file.readinto(view[done:])
                if not got:
                    raise AFMError(f"{self._name}: unexpected end of file; file truncated?")
                done += got
        return out

    # --- Mapping interface

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shares_storage(self, a: str, b: str) -> bool:
        """True when tensors `a` and `b` are views of one storage (e.g. a tied embedding and output head)."""
        return self[a].storage_key == self[b].storage_key

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a PyTorch zip checkpoint for lazy, torch-free reading (see `Checkpoint`)."""
    return Checkpoint(path)


def _open_file(path: Path) -> io.FileIO:
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise AFMError(f"no such checkpoint: {path}") from None
    except IsADirectoryError:
        raise AFMError(f"{path} is a directory, expected a .pt checkpoint file") from None
    except OSError as err:
        raise AFMError(f"cannot open {path}: {err.strerror}") from None


def _open_zip(file: io.FileIO, name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except Exception as err:  # BadZipFile, but also NotImplementedError, struct.error... on damaged files
        hint = "legacy (torch < 1.6) format? re-save it with a newer torch" if _looks_like_pickle(file) \
            else "truncated or not a checkpoint?"
        raise AFMError(f"{name}: not a PyTorch zip checkpoint ({_one_line(err)}; {hint})") from None


def _looks_like_pickle(file: io.FileIO) -> bool:
    file.seek(0)
    return file.read(1) == b"\x80"


def _find_archive_name(archive: zipfile.ZipFile, name: str) -> str:
    # torch puts every record under one folder, named after the file it saved to; data.pkl sits directly in it
    folders = [n[: -len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(folders) != 1:
        found = "no" if not folders else "several"
        raise AFMError(f"{name}: {found} <archive>/data.pkl record; not a PyTorch checkpoint")
    return folders[0]


def _split_root(root: Any, name: str, name_budget: int) -> tuple[dict[str, _TensorRecord], dict[str, Any]]:
    """Root object -> (flat name -> tensor record, flat name -> non-tensor value).

    name_budget: the most characters all flattened names may total (nesting repeats each prefix in every name
    below it)."""
    if not isinstance(root, dict):
        raise AFMError(f"{name}: holds a {type(root).__name__}, not a state dict")
    extras: dict[str, Any] = {}
    if not any(isinstance(v, _TensorRecord) for v in root.values()):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(root.get(k), dict)), None)
        if wrapper is not None:  # e.g. {"state_dict": {...}, "epoch": 3}
            extras = {k: v for k, v in root.items() if k != wrapper}
            root = root[wrapper]
    flat = _Flattener(name, name_budget)
    flat.walk(root, "", 0)
    extras.update(flat.extras)
    return flat.tensors, extras


class _Flattener:
    """Nested dicts -> flat "a.b.c" names. A pickle can put one dict at many places (a 2 KB file, 12 keys x 14
    levels, has 12**14 paths): each dict is walked once, a second place is refused, and the names' total length
    is bounded."""

    def __init__(self, source: str, name_budget: int):
        self.source, self.budget = source, name_budget
        self.tensors: dict[str, _TensorRecord] = {}
        self.extras: dict[str, Any] = {}
        self._seen: set[int] = set()

    def walk(self, node: dict, prefix: str, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise AFMError(f"{self.source}: state dict nested deeper than {_MAX_NESTING} levels")
        if id(node) in self._seen:
            raise AFMError(f"{self.source}: one dict appears at several places (at {prefix[:60]!r} again); "
                           "not a state dict")
        self._seen.add(id(node))
        for key, value in node.items():
            if not isinstance(key, str):
                raise AFMError(f"{self.source}: state-dict key {_describe(key)} is not a string")
            full = prefix + key
            self.budget -= len(full)
            if self.budget < 0:
                raise AFMError(f"{self.source}: state-dict names too long for the file's size (nested too often)")
            if isinstance(value, dict):
                self.walk(value, full + ".", depth + 1)
            elif isinstance(value, _TensorRecord):
                self.tensors[full] = value
            else:
                self.extras[full] = value


# ---------------------------------------------------------------------------------------------------------------
# writing

class BF16:
    """Marks values to be stored as bfloat16: `BF16(float_array)` rounds like torch (round to nearest even; NaN
    becomes 0x7FC0), `BF16.from_bits(uint16_array)` stores given bits unchanged."""

    __slots__ = ("values", "bits")

    def __init__(self, values: Any = None, *, bits: np.ndarray | None = None):
        self.values = None if values is None else np.asarray(values, dtype=np.float32)
        self.bits = None if bits is None else np.asarray(bits, dtype=np.uint16)
        if (self.values is None) == (self.bits is None):
            raise ValueError("BF16 takes either float values or bits=uint16 array")

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> BF16:
        return cls(bits=bits)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.values if self.bits is None else self.bits).shape


TensorSource = np.ndarray | BF16 | LazyTensor | Callable[[], Any] | None


class _Entry(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    storage_key: str
    storage_numel: int


def save_checkpoint(path: str | os.PathLike, tensors: Iterable[tuple[str, TensorSource]], *,
                    tie: Mapping[str, str] | None = None, replace: bool = True) -> None:
    """Write a PyTorch zip checkpoint (an OrderedDict of tensors, as torch.save writes it) one tensor at a time.

    `tensors` yields (name, value); a value is a NumPy array, `BF16(...)`, a `LazyTensor` (bf16 copied bit-exact),
    or a zero-argument callable returning one of those (called only when that tensor is written, so peak memory
    is one tensor). `tie={"output_transform.weight": "embedding.weight"}` stores the first key as a view of the
    second key's storage, as torch does for tied weights; a tied key's value in `tensors` is never read (it may
    be None) and only fixes its position, else the tied key is appended at the end. replace=False: an existing
    `path` (even one that appeared while writing) is an AFMError, never overwritten.
    """
    path = Path(path)
    tie = dict(tie or {})
    tmp = _create(path)
    try:
        with open(tmp, "wb") as file:
            _write_archive(file, path.stem or "archive", tensors, tie)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            publish_file(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _create(final: Path) -> Path:
    """The temporary sibling `final` is written to (unique: concurrent writers never share one)."""
    try:
        return staging_file(final, "tmp")
    except OSError as err:  # missing folder, no permission: a user mistake, not a bug
        raise AFMError(f"cannot write {final}: {err.strerror}") from None


def _write_archive(file, archive: str, tensors: Iterable[tuple[str, TensorSource]], tie: dict[str, str]) -> None:
    order: list[str] = []  # state-dict order, tied keys included
    seen: set[str] = set()
    entries: dict[str, _Entry] = {}
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        # torch writes these first; readers only need them to exist
        _write_record(zf, f"{archive}/.format_version", b"1")
        _write_record(zf, f"{archive}/.storage_alignment", str(_ALIGNMENT).encode())
        _write_record(zf, f"{archive}/byteorder", b"little")
        for name, source in tensors:
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            order.append(name)
            if name not in tie:
                key = str(len(entries))
                entries[name] = _write_tensor_data(zf, f"{archive}/data/{key}", name, key, source)
        order += [t for t in tie if t not in seen]
        _resolve_ties(entries, tie)
        _write_record(zf, f"{archive}/data.pkl", _pickle_state_dict([entries[n] for n in order], order))
        _write_record(zf, f"{archive}/version", b"3\n")
        _write_record(zf, f"{archive}/.data/serialization_id", _serialization_id(zf))


def _resolve_ties(entries: dict[str, _Entry], tie: dict[str, str]) -> None:
    for target, source in tie.items():
        if source not in entries:
            raise ValueError(f"tie {target!r} -> {source!r}: {source!r} is not a written tensor")
        entries[target] = entries[source]._replace(name=target)


def _materialize(source: TensorSource, name: str) -> tuple[str, np.ndarray]:
    """Turn a tensor source into (dtype name, array of the stored element type)."""
    if callable(source) and not isinstance(source, (np.ndarray, BF16, LazyTensor)):
        source = source()
    if isinstance(source, LazyTensor):
        return source.dtype, source.numpy(raw=True)
    if isinstance(source, BF16):
        return "bfloat16", source.bits if source.bits is not None else source.values
    array = np.asarray(source)
    dtype = next((k for k, v in _NUMPY_DTYPES.items() if v == array.dtype.newbyteorder("<")
                  and k != "bfloat16"), None)
    if dtype is None:
        raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored")
    return dtype, array


def _write_tensor_data(zf: zipfile.ZipFile, arcname: str, name: str, key: str, source: TensorSource) -> _Entry:
    dtype, array = _materialize(source, name)
    itemsize = _NUMPY_DTYPES[dtype].itemsize
    with _open_aligned(zf, arcname, array.size * itemsize) as out:
        for chunk in _row_chunks(array):
            if dtype == "bfloat16" and chunk.dtype != np.uint16:
                chunk = float32_to_bf16_bits(chunk)  # rounded chunk by chunk: no full-size bf16 copy
            out.write(np.ascontiguousarray(chunk, dtype=_NUMPY_DTYPES[dtype]).reshape(-1).view(np.uint8))
    return _Entry(name, dtype, tuple(array.shape), key, array.size)


def _row_chunks(array: np.ndarray, chunk_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    # Slices along the first axis, C order, about chunk_bytes each: bounded extra memory for huge tensors.
    if array.ndim == 0 or array.size == 0:
        yield array.reshape(-1)
        return
    rows = max(1, chunk_bytes // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], rows):
        yield array[start:start + rows]


def _open_aligned(zf: zipfile.ZipFile, arcname: str, nbytes: int):
    """Open a STORED entry whose data starts on a 64-byte boundary, like torch (and what mmap loaders want).

    The local header is 30 bytes + name + extra (+ 20 bytes of zip64 sizes when zipfile decides so); a padding
    extra field (id 0xD935, as Android's zipalign uses) fills up to the boundary.
    """
    info = zipfile.ZipInfo(arcname)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for writing zip64 sizes
    header = _LOCAL_HEADER.size + len(arcname.encode("utf-8")) + (20 if zip64 else 0)
    pad = (-(zf.fp.tell() + header)) % _ALIGNMENT
    if pad:
        pad += _ALIGNMENT if pad < 4 else 0  # an extra field needs a 4-byte header
        info.extra = struct.pack("<HH", 0xD935, pad - 4) + bytes(pad - 4)
    handle = zf.open(info, "w", force_zip64=zip64)
    if zf.fp.tell() % _ALIGNMENT:
        raise RuntimeError(f"internal error: {arcname} data not {_ALIGNMENT}-byte aligned")
    return handle


def _write_record(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    with _open_aligned(zf, arcname, len(data)) as out:
        out.write(data)


def _serialization_id(zf: zipfile.ZipFile) -> bytes:
    # torch writes 40 decimal digits identifying the save; ours is derived from the contents (reproducible)
    digest = hashlib.sha1(repr([(i.filename, i.CRC) for i in zf.infolist()]).encode()).digest()
    return str(int.from_bytes(digest, "big") % 10**40).zfill(40).encode()


# --- pickle emission (protocol 2, by hand: the globals named are torch's, which need not be importable here)

def _p_int(value: int) -> bytes:
    if 0 <= value < 1 << 8:
        return b"K" + bytes([value])
    if 0 <= value < 1 << 16:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(encoded)]) + encoded  # LONG1


def _p_str(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(encoded)) + encoded  # BINUNICODE


def _p_tuple(items: Iterable[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _p_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _p_tensor(entry: _Entry) -> bytes:
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=OrderedDict())
    storage_id = _p_tuple([_p_str("storage"), _p_global("torch", _DTYPE_STORAGE[entry.dtype]),
                           _p_str(entry.storage_key), _p_str("cpu"), _p_int(entry.storage_numel)])
    args = [storage_id + b"Q", _p_int(0), _p_tuple(map(_p_int, entry.shape)),
            _p_tuple(map(_p_int, _contiguous_strides(entry.shape))), b"\x89",
            _p_global("collections", "OrderedDict") + b")R"]
    return _p_global("torch._utils", "_rebuild_tensor_v2") + _p_tuple(args) + b"R"


def _pickle_state_dict(entries: list[_Entry], names: list[str]) -> bytes:
    items = b"".join(_p_str(name) + _p_tensor(entry) for name, entry in zip(names, entries))
    return b"\x80\x02" + _p_global("collections", "OrderedDict") + b")R" + b"(" + items + b"u."
