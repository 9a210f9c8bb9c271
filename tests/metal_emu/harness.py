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
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .signature import ArgInfo, attributes, kernel_name, shape_infos, write_signature, write_template

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

_THREADGROUP_DECL = re.compile(
    r"\bthreadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]+\])*)\s*;"
)


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


def rewrite_threadgroup_arrays(text: str) -> str:
    """`threadgroup T x[A][B];` -> `auto& x = ::emu::shared_array<T[A][B]>();` (one arena per threadgroup)."""
    return _THREADGROUP_DECL.sub(lambda m: f"auto& {m[2]} = ::emu::shared_array<{m[1]}{m[3]}>();", text)


def launcher(func: str, template: list, n_buffers: int, call_args: list[str]) -> str:
    target = func + (write_template(template) if template else "")
    return f"""
static void* emu_buffers[{max(n_buffers, 1)}];
static void emu_body() {{
  {target}(
      {", ".join(call_args)});
}}
extern "C" __attribute__((visibility("default"))) int emu_launch(void** bufs, const long* dims, int reverse,
                                                                 char* err, int err_len) {{
  for (int i = 0; i < {n_buffers}; ++i) emu_buffers[i] = bufs[i];
  return ::emu::launch(emu_body, dims, reverse, err, err_len);
}}
"""


def cache_dir() -> Path:
    root = os.environ.get("AFM_MLX_EMU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(root) / "afm_mlx_metal_emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOADED: dict[str, ctypes.CDLL] = {}


def compile_shared(cpp: str, shim: str = "msl_shim.h") -> ctypes.CDLL:
    """Compile once per (source, shim, runtime, flags) hash; concurrent builders race safely via rename."""
    deps = "".join((HERE / f).read_text() for f in (shim, "runtime.h"))
    key = hashlib.sha256("\0".join([cpp, deps, CXX, *CXXFLAGS]).encode()).hexdigest()[:24]
    if key in _LOADED:
        return _LOADED[key]
    so = cache_dir() / f"k_{key}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # same filesystem: os.replace is atomic
            src = Path(tmp) / "kernel.cpp"
            src.write_text(cpp)
            out = Path(tmp) / "kernel.so"
            cmd = [CXX, *CXXFLAGS, "-I", str(HERE), str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmulatorError(f"kernel does not compile:\n{proc.stderr[-6000:]}")
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_long), ctypes.c_int,
                               ctypes.c_char_p, ctypes.c_int]  # fmt: skip
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


def int_buffer(values, dtype) -> GuardedBuffer:
    return GuardedBuffer(np.asarray(values, dtype).nbytes, np.asarray(values, dtype).tobytes())


class EmulatedMetalKernel:
    """Callable like the object `mx.fast.metal_kernel` returns; runs on the CPU through the emulator."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None):  # fmt: skip
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise NotImplementedError("the emulator has no atomic<T> outputs")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.reverse = False  # run fibers in reverse order between sync points (flushes out missing barriers)
        self.last_source = ""

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
                 verbose=False, stream=None) -> list[mx.array]:  # fmt: skip
        outs = self.run_numpy(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
        result = []
        for arr, dt in zip(outs, output_dtypes):
            name = dtype_name(dt)
            result.append(mx.array(arr).view(mx.bfloat16) if name == "bfloat16" else mx.array(arr))
        return result

    def source_for(self, infos: list[ArgInfo], out_names: list[str], template: list) -> tuple[str, str]:
        func = kernel_name(self.name, template, infos, out_names)
        text = write_signature(func, self.header, self.source, self.input_names, infos, self.output_names,
                               out_names, template)  # fmt: skip
        return func, text

    def run_numpy(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)}")
        template = [(n, dtype_name(v) if isinstance(v, (mx.Dtype, np.dtype, type)) else v) for n, v in (template or [])]
        arrays = [to_buffer(v) for v in inputs]
        infos = [ArgInfo(dt, a.ndim, a.size) for a, dt in arrays]
        out_names = [dtype_name(d) for d in output_dtypes]
        func, text = self.source_for(infos, out_names, template)
        self.last_source = text

        buffers, labels, call_args = [], [], []
        uses = shape_infos(self.source, self.input_names)
        for (arr, dt), info, name, (use_shape, use_strides, use_ndim) in zip(arrays, infos, self.input_names, uses):
            ctype = write_template([("", dt)])[1:-1]
            buffers.append(GuardedBuffer(arr.nbytes, arr.tobytes()))
            labels.append(name)
            i = len(buffers) - 1
            call_args.append(f"*(const {ctype}*)emu_buffers[{i}]" if arr.ndim == 0 else f"(const {ctype}*)emu_buffers[{i}]")
            if arr.ndim > 0:
                if use_shape:
                    buffers.append(int_buffer(arr.shape, np.int32))
                    labels.append(name + "_shape")
                    call_args.append(f"(const int*)emu_buffers[{len(buffers) - 1}]")
                if use_strides:
                    strides = [s // arr.itemsize for s in arr.strides]
                    buffers.append(int_buffer(strides, np.int64))
                    labels.append(name + "_strides")
                    call_args.append(f"(const int64_t*)emu_buffers[{len(buffers) - 1}]")
                if use_ndim:
                    buffers.append(int_buffer(arr.ndim, np.int32))
                    labels.append(name + "_ndim")
                    call_args.append(f"*(const int*)emu_buffers[{len(buffers) - 1}]")
        outputs = []
        for shape, dt, name in zip(output_shapes, out_names, self.output_names):
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORAGE[dt]).itemsize
            fill = None
            if init_value is not None:
                fill = np.full(tuple(shape), init_value, np.float32).astype(np.float32 if dt == "bfloat16" else STORAGE[dt])
                if dt == "bfloat16":
                    fill = (fill.view(np.uint32) >> 16).astype(np.uint16)  # exact for typical init values (0, -inf)
                fill = fill.tobytes()
            buffers.append(GuardedBuffer(nbytes, fill))
            labels.append(name)
            outputs.append((buffers[-1], shape, dt))
            ctype = write_template([("", dt)])[1:-1]
            call_args.append(f"({ctype}*)emu_buffers[{len(buffers) - 1}]")
        call_args += [f"::emu::attr::{a}()" for a, _ in attributes(self.source)]

        cpp = '#include "msl_shim.h"\n' + rewrite_threadgroup_arrays(text) + launcher(func, template, len(buffers), call_args)
        lib = compile_shared(cpp)
        ptrs = (ctypes.c_void_p * max(len(buffers), 1))(*[b.pointer for b in buffers])
        dims = (ctypes.c_long * 6)(*grid, *threadgroup)
        err = ctypes.create_string_buffer(1024)
        if lib.emu_launch(ptrs, dims, int(self.reverse), err, len(err)) != 0:
            raise EmulatorError(f"{self.name}: {err.value.decode()}")
        for b, name in zip(buffers, labels):
            if not b.guards_intact():
                raise EmulatorError(f"{self.name}: out-of-bounds write next to buffer of '{name}'")
        return [buf.data().view(STORAGE[dt]).reshape(shape).copy() for buf, shape, dt in outputs]


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True, atomic_outputs=False,
                 compile_options=None) -> EmulatedMetalKernel:  # fmt: skip
    """Drop-in for `mx.fast.metal_kernel` that runs on the CPU."""
    return EmulatedMetalKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                               atomic_outputs, compile_options)  # fmt: skip
