"""Compile and run Metal kernel text on the CPU: g++ + the MSL shim + the fiber runtime.

`metal_kernel(...)` has the signature of `mx.fast.metal_kernel` and returns a callable with the same call
signature, so code that builds kernels through a factory can be routed here by a monkeypatch. Each call:
1. converts inputs to row-contiguous NumPy buffers (Python scalars become 0-d int32/float32/bool, as MLX does);
2. writes the exact text MLX would hand to the Metal compiler (`signature.write_signature`), with
   `threadgroup T name[N];` declarations rewritten to views of a shared, poisoned arena (the one edit);
3. compiles it once per source hash (`g++ -O1 -shared -fPIC`), cached on disk;
4. runs every threadgroup as fibers; outputs start as 0xFF bytes (NaN) unless `init_value` is given, and every
   buffer sits between guard bytes that must be intact afterwards (catches out-of-bounds writes; OOB reads
   see NaN-poison guards).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .signature import (
    CUDA_DEFAULT_HEADER,
    CUDA_TYPES,
    TYPE_STRINGS,
    ArgInfo,
    attributes,
    cuda_kernel_name,
    kernel_name,
    shape_infos,
    write_cuda_source,
    write_signature,
    write_template,
)

HERE = Path(__file__).resolve().parent
GUARD = 64  # bytes of 0xFF on each side of every buffer
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-U_FORTIFY_SOURCE", "-fvisibility=hidden"]

# numpy storage for each mx dtype name (bfloat16 travels as its raw uint16 bits)
STORAGE = {
    "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64, "bool": np.bool_,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}  # fmt: skip

# `  const device float* q [[buffer(0)]]` / `  device float* out [[buffer(3)]]` in the generated signature
_POINTER_PARAM = re.compile(r"^  (const )?(?:device|constant) ([\w:]+)\* (\w+) \[\[buffer", re.M)
# `threadgroup T name[A][B];` (MSL) / `__shared__ T name[A];` (CUDA), at the top level of the body
_SHARED_DECL = r"\b{kw}\s+((?:const\s+)?[A-Za-z_][\w:]*(?:<[^;{{}}]*?>)?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]+\])*)\s*;"
# `    const float* x,` / `    float* y) {` in the CUDA signature
_CUDA_POINTER_PARAM = re.compile(r"^    (const )?([\w:]+)\* (\w+)(,|\) \{)$", re.M)


class EmulatorError(RuntimeError):
    """The kernel broke a GPU rule (barrier, collective, bounds) or failed to compile."""


def dtype_name(dtype) -> str:
    """'float16' for mx.float16, np.float16, 'float16'."""
    if isinstance(dtype, mx.Dtype):
        return str(dtype).removeprefix("mlx.core.")
    return np.dtype(dtype).name


def to_buffer(value) -> tuple[np.ndarray, str]:
    """(row-contiguous storage array, mx dtype name) for an input, converting Python scalars as MLX does."""
    if isinstance(value, bool):
        return np.array(value, np.bool_), "bool"
    if isinstance(value, int):
        return np.array(value, np.int32), "int32"
    if isinstance(value, float):
        return np.array(value, np.float32), "float32"
    if isinstance(value, mx.array):
        name = dtype_name(value.dtype)
        if name == "bfloat16":
            return np.array(value.view(mx.uint16), order="C"), name
        return np.array(value, order="C"), name
    arr = np.array(value, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return arr, arr.dtype.name


def rewrite_shared_arrays(text: str, keyword: str) -> str:
    """`threadgroup T x[A][B];` -> `auto& x = ::emu::shared_array<T[A][B]>();` (one poisoned arena per group)."""
    pattern = re.compile(_SHARED_DECL.format(kw=re.escape(keyword)))
    return pattern.sub(lambda m: f"auto& {m[2]} = ::emu::shared_array<{m[1]}{m[3]}>();", text)


def checked_pointers(text: str) -> str:
    """`const device T* x [[buffer(i)]]` -> `::emu::checked_ptr<const T> x [[buffer(i)]]` (bounds, read counts)."""
    return _POINTER_PARAM.sub(lambda m: f"  ::emu::checked_ptr<{m[1] or ''}{m[2]}> {m[3]} [[buffer", text)


def cuda_pointers(text: str) -> str:
    """`    const float* x,` -> `    ::emu::checked_ptr<const float> x,` in the CUDA signature."""
    return _CUDA_POINTER_PARAM.sub(lambda m: f"    ::emu::checked_ptr<{m[1] or ''}{m[2]}> {m[3]}{m[4]}", text)


def launcher(target: str, n_buffers: int, call_args: list[str]) -> str:
    """The extern "C" entry point: stores the buffer pointers, then runs `target(args...)` on every thread."""
    return f"""
static void* emu_buffers[{max(n_buffers, 1)}];
static void* emu_counters[{max(n_buffers, 1)}];
static void emu_body() {{
  {target}(
      {", ".join(call_args)});
}}
extern "C" __attribute__((visibility("default"))) int emu_launch(void** bufs, void** counters, const long* dims,
                                                                 int flags, char* err, int err_len) {{
  for (int i = 0; i < {n_buffers}; ++i) emu_buffers[i] = bufs[i], emu_counters[i] = counters[i];
  return ::emu::launch(emu_body, dims, flags, err, err_len);
}}
"""


def cache_dir() -> Path:
    root = os.environ.get("AFM_MLX_EMU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(root) / "afm_mlx_metal_emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOADED: dict[str, ctypes.CDLL] = {}


HEADERS = ("runtime.h", "fp_types.h", "msl_shim.h", "cuda_shim.h")


def precompiled_headers() -> Path:
    """A cache folder with copies of the shim headers and their precompiled .gch files (halves each compile).

    g++ uses `<dir>/msl_shim.h.gch` in place of `<dir>/msl_shim.h` when the flags match, and otherwise silently
    reads the header, so a stale or unusable PCH costs time, never correctness."""
    text = "\0".join((HERE / h).read_text() for h in HEADERS)
    key = hashlib.sha256("\0".join([text, CXX, *CXXFLAGS]).encode()).hexdigest()[:16]
    folder = cache_dir() / f"pch_{key}"
    if folder.exists():
        return folder
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    for h in HEADERS:
        (tmp / h).write_text((HERE / h).read_text())
    for shim in ("msl_shim.h", "cuda_shim.h"):
        flags = [f for f in CXXFLAGS if f != "-shared"]
        subprocess.run([CXX, *flags, "-x", "c++-header", str(tmp / shim), "-o", str(tmp / f"{shim}.gch")],
                       capture_output=True)  # fmt: skip
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def compile_shared(cpp: str, shim: str = "msl_shim.h") -> ctypes.CDLL:
    """Compile once per (source, headers, flags) hash, cached on disk; concurrent builders race safely."""
    deps = "".join((HERE / h).read_text() for h in HEADERS)
    key = hashlib.sha256("\0".join([cpp, deps, CXX, *CXXFLAGS]).encode()).hexdigest()[:24]
    if key in _LOADED:
        return _LOADED[key]
    so = cache_dir() / f"k_{key}.so"
    if not so.exists():
        include = precompiled_headers()
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # same filesystem: os.replace is atomic
            src = Path(tmp) / "kernel.cpp"
            src.write_text(cpp)
            out = Path(tmp) / "kernel.so"
            cmd = [CXX, *CXXFLAGS, "-I", str(include), str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmulatorError(f"kernel does not compile:\n{proc.stderr[-6000:]}")
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
                               ctypes.POINTER(ctypes.c_long), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]  # fmt: skip
    _LOADED[key] = lib
    return lib


class GuardedBuffer:
    """A buffer with GUARD bytes of 0xFF before and after, 64-byte aligned."""

    def __init__(self, nbytes: int, fill: bytes | None = None):
        self.raw = np.full(nbytes + 2 * GUARD + 64, 0xFF, np.uint8)
        self.start = (-self.raw.ctypes.data) % 64 + GUARD
        self.nbytes = nbytes
        if fill is not None:
            self.raw[self.start : self.start + nbytes] = np.frombuffer(fill, np.uint8)

    @property
    def pointer(self) -> int:
        return self.raw.ctypes.data + self.start

    def data(self) -> np.ndarray:
        return self.raw[self.start : self.start + self.nbytes]

    def guards_intact(self) -> bool:
        before = self.raw[self.start - GUARD : self.start]
        after = self.raw[self.start + self.nbytes : self.start + self.nbytes + GUARD]
        return bool((before == 0xFF).all() and (after == 0xFF).all())


def ctype_of(dtype: str, dialect: str = "metal") -> str:
    return CUDA_TYPES[dtype] if dialect == "cuda" else TYPE_STRINGS[dtype]


@dataclass
class Arg:
    """One kernel argument as the launcher passes it: a pointer (checked) or a value read from a buffer."""

    label: str
    buffer: GuardedBuffer
    ctype: str
    pointer: bool
    elements: int = 1
    const: bool = True
    reads: np.ndarray | None = None  # per-element read counts (const pointers)

    def expression(self, i: int) -> str:
        if not self.pointer:
            return f"*(const {self.ctype}*)emu_buffers[{i}]"
        qual = "const " if self.const else ""
        count = f"(uint32_t*)emu_counters[{i}]" if self.reads is not None else "nullptr"
        return (f"::emu::checked_ptr<{qual}{self.ctype}>{{({qual}{self.ctype}*)emu_buffers[{i}], {self.elements}, "
                f'{count}, "{self.label}"}}')  # fmt: skip


def input_args(name: str, arr: np.ndarray, dt: str, uses: tuple[bool, bool, bool], dialect: str) -> list[Arg]:
    """The data argument of one input, then its _shape/_strides/_ndim arguments where the body uses them.

    Metal passes a 0-d input by value (`const constant T&`), CUDA as a pointer."""
    buf = GuardedBuffer(arr.nbytes, arr.tobytes())
    ctype = ctype_of(dt, dialect)
    if arr.ndim == 0 and dialect == "metal":
        return [Arg(name, buf, ctype, pointer=False)]
    args = [Arg(name, buf, ctype, pointer=True, elements=arr.size, reads=np.zeros(arr.size, np.uint32))]
    if arr.ndim == 0:
        return args
    if dialect == "cuda" and any(uses):
        raise NotImplementedError("the CUDA emulation has no _shape/_strides/_ndim arguments")
    use_shape, use_strides, use_ndim = uses
    extras = [(use_shape, "_shape", np.int32, arr.shape), (use_strides, "_strides", np.int64,
              [s // arr.itemsize for s in arr.strides])]  # fmt: skip
    for used, suffix, dtype, values in extras:
        if used:
            data = np.asarray(values, dtype)
            args.append(Arg(name + suffix, GuardedBuffer(data.nbytes, data.tobytes()), ctype_of(data.dtype.name),
                            pointer=True, elements=data.size, reads=np.zeros(data.size, np.uint32)))  # fmt: skip
    if use_ndim:
        data = np.asarray(arr.ndim, np.int32)
        args.append(Arg(name + "_ndim", GuardedBuffer(data.nbytes, data.tobytes()), "int", pointer=False))
    return args


def output_arg(name: str, shape, dt: str, init_value, dialect: str) -> Arg:
    """An output buffer: 0xFF (NaN) bytes, like uninitialised GPU memory, unless init_value is given."""
    count = int(np.prod(shape, dtype=np.int64))
    fill = None
    if init_value is not None:
        values = np.full(count, init_value, np.float32)
        if dt == "bfloat16":
            values = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact for 0, +-1, +-inf
        fill = values.astype(STORAGE[dt]).tobytes()
    buf = GuardedBuffer(count * np.dtype(STORAGE[dt]).itemsize, fill)
    return Arg(name, buf, ctype_of(dt, dialect), pointer=True, elements=count, const=False)


def normalise_template(template) -> list[tuple[str, object]]:
    return [(n, dtype_name(v) if isinstance(v, (mx.Dtype, np.dtype, type)) else v) for n, v in (template or [])]


class EmulatedKernel:
    """Callable like the object `mx.fast.metal_kernel` (dialect "metal") or `mx.fast.cuda_kernel` ("cuda")
    returns; runs on the CPU.

    After a call: `last_source` is the text MLX would compile, `last_reads[name]` the per-element read counts
    of each input array. Set `reverse = True` to run each group's threads in reverse order between sync points.
    """

    def __init__(self, dialect, name, input_names, output_names, source, header="", ensure_row_contiguous=True):
        if not output_names:
            raise ValueError("[custom_kernel] Must specify at least one output.")
        self.dialect = dialect
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.reverse = False
        self.last_source = ""
        self.last_reads: dict[str, np.ndarray] = {}

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
                 verbose=False, stream=None) -> list[mx.array]:  # fmt: skip
        outs = self.run_numpy(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
        result = []
        for arr, dt in zip(outs, output_dtypes):
            result.append(mx.array(arr).view(mx.bfloat16) if dtype_name(dt) == "bfloat16" else mx.array(arr))
        return result

    def function_name(self, inputs, output_dtypes, template) -> str:
        template = normalise_template(template)
        if self.dialect == "cuda":
            return cuda_kernel_name(self.name, template)
        infos = [ArgInfo(dt, a.ndim, a.size) for a, dt in map(to_buffer, inputs)]
        return kernel_name(self.name, template, infos, [dtype_name(d) for d in output_dtypes])

    def generated_source(self, inputs, output_dtypes, template=None) -> str:
        """The full kernel text MLX generates for these inputs (what a Mac's Metal compiler or NVRTC gets)."""
        template = normalise_template(template)
        infos = [ArgInfo(dt, a.ndim, a.size) for a, dt in map(to_buffer, inputs)]
        out_names = [dtype_name(d) for d in output_dtypes]
        func = self.function_name(inputs, output_dtypes, template)
        write = write_cuda_source if self.dialect == "cuda" else write_signature
        return write(func, self.header, self.source, self.input_names, infos, self.output_names, out_names, template)

    def cpu_source(self, text: str) -> str:
        """The generated text made compilable by g++: shim include, shared-memory views, checked pointers."""
        if self.dialect == "cuda":
            text = rewrite_shared_arrays(text.replace(CUDA_DEFAULT_HEADER, "\n"), "__shared__")
            return '#include "cuda_shim.h"\n' + cuda_pointers(text)
        return '#include "msl_shim.h"\n' + checked_pointers(rewrite_shared_arrays(text, "threadgroup"))

    def run_numpy(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[custom_kernel] Expected `inputs` to have size {len(self.input_names)}")
        template = normalise_template(template)
        arrays = [to_buffer(v) for v in inputs]
        out_names = [dtype_name(d) for d in output_dtypes]
        text = self.generated_source(inputs, output_dtypes, template)
        self.last_source = text

        args: list[Arg] = []
        for (arr, dt), name, uses in zip(arrays, self.input_names, shape_infos(self.source, self.input_names)):
            args += input_args(name, arr, dt, uses, self.dialect)
        outputs = [output_arg(n, s, dt, init_value, self.dialect)
                   for n, s, dt in zip(self.output_names, output_shapes, out_names)]  # fmt: skip
        args += outputs
        call = [a.expression(i) for i, a in enumerate(args)]
        func = self.function_name(inputs, output_dtypes, template)
        if self.dialect == "cuda":
            target = "mlx::core::cu::" + func
        else:
            call += [f"::emu::attr::{a}()" for a, _ in attributes(self.source)]
            target = func + (write_template(template) if template else "")
        shim = "cuda_shim.h" if self.dialect == "cuda" else "msl_shim.h"
        lib = compile_shared(self.cpu_source(text) + launcher(target, len(args), call), shim)
        self._launch(lib, args, grid, threadgroup)
        self.last_reads = {a.label: a.reads for a in args if a.reads is not None}
        results = zip(outputs, output_shapes, out_names)
        return [a.buffer.data().view(STORAGE[dt]).reshape(s).copy() for a, s, dt in results]

    def _launch(self, lib, args: list[Arg], grid, threadgroup) -> None:
        n = max(len(args), 1)
        ptrs = (ctypes.c_void_p * n)(*[a.buffer.pointer for a in args])
        counters = (ctypes.c_void_p * n)(*[a.reads.ctypes.data if a.reads is not None else None for a in args])
        dims = (ctypes.c_long * 6)(*grid, *threadgroup)
        flags = (1 if self.reverse else 0) | (2 if self.dialect == "cuda" else 0)  # emu::REVERSE, FULL_GROUPS
        err = ctypes.create_string_buffer(1024)
        if lib.emu_launch(ptrs, counters, dims, flags, err, len(err)) != 0:
            raise EmulatorError(f"{self.name}: {err.value.decode()}")
        for a in args:
            if not a.buffer.guards_intact():
                raise EmulatorError(f"{self.name}: out-of-bounds write next to buffer of '{a.label}'")


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, atomic_outputs=False,
                 compile_options=None) -> EmulatedKernel:  # fmt: skip
    """Drop-in for `mx.fast.metal_kernel` that runs on the CPU."""
    if atomic_outputs:
        raise NotImplementedError("the emulator has no atomic<T> outputs")
    return EmulatedKernel("metal", name, input_names, output_names, source, header, ensure_row_contiguous)


def cuda_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                shared_memory=0) -> EmulatedKernel:  # fmt: skip
    """Drop-in for `mx.fast.cuda_kernel` that runs on the CPU (static __shared__ arrays only)."""
    if shared_memory:
        raise NotImplementedError("the emulator has no dynamic shared memory")
    return EmulatedKernel("cuda", name, input_names, output_names, source, header, ensure_row_contiguous)
