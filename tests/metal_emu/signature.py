"""The kernel text `mx.fast.metal_kernel` generates, ported line for line from MLX.

Source: ml-explore/mlx `mlx/backend/common/metal_kernel.cpp` (`write_signature`, `write_template`,
`make_template_hash`, the kernel-name and attribute logic of `metal_kernel`) and `get_type_string` in
`mlx/backend/common/compiled.cpp`. Python scalars become 0-d arrays as in `python/src/fast.cpp` (`to_array`):
int -> int32, float -> float32, bool -> bool.
"""

from __future__ import annotations

from dataclasses import dataclass

# Inputs with fewer elements are passed in the constant address space (metal_kernel.cpp).
MAX_CONSTANT_ARRAY_SIZE = 8

# (attribute, MSL type), in MLX's order: the generated signature lists the referenced ones in this order.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# mx dtype name -> MSL type string (get_type_string).
TYPE_STRINGS = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "float64": "double",
    "bool": "bool",
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
    "uint64": "uint64_t",
}


@dataclass(frozen=True)
class ArgInfo:
    """What the signature needs to know about one input array."""

    dtype: str  # mx dtype name, e.g. "float16"
    ndim: int
    size: int


def shape_infos(source: str, input_names: list[str]) -> list[tuple[bool, bool, bool]]:
    """Whether the body uses `<name>_shape`, `_strides`, `_ndim` (plain substring search, as in MLX)."""
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def attributes(source: str) -> list[tuple[str, str]]:
    """The thread-position attributes the body references (substring search, as in MLX)."""
    return [(a, t) for a, t in METAL_ATTRIBUTES if a in source]


def write_template(template: list[tuple[str, object]]) -> str:
    parts = []
    for _, arg in template:
        if isinstance(arg, bool):
            parts.append("1" if arg else "0")  # std::ostream << bool
        elif isinstance(arg, int):
            parts.append(str(arg))
        else:
            parts.append(TYPE_STRINGS[arg])
    return "<" + ", ".join(parts) + ">"


def make_template_hash(template_def: str) -> str:
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]  # pop_back


def kernel_name(name: str, template: list[tuple[str, object]], inputs: list[ArgInfo], output_dtypes: list[str]) -> str:
    out = "custom_kernel_" + name
    if template:
        out += "_" + make_template_hash(write_template(template))
    for arr in inputs:
        out += "_" + TYPE_STRINGS[arr.dtype]
        if arr.ndim == 0:
            out += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dt in output_dtypes:
        out += "_" + TYPE_STRINGS[dt]
    return out


def template_param_type(arg: object) -> str:
    if isinstance(arg, bool):
        return "bool"
    if isinstance(arg, int):
        return "int"
    return "typename"


def write_signature(
    func_name: str,
    header: str,
    source: str,
    input_names: list[str],
    inputs: list[ArgInfo],
    output_names: list[str],
    output_dtypes: list[str],
    template: list[tuple[str, object]],
    atomic_outputs: bool = False,
) -> str:
    """Header + `template <...>` + `[[kernel]] void name(...) {` + body + `}` exactly as MLX writes it."""
    infos = shape_infos(source, input_names)
    attrs = attributes(source)
    text = header
    if template:
        text += "template <" + ", ".join(f"{template_param_type(a)} {n}" for n, a in template) + ">\n"
    text += "[[kernel]] void " + func_name + "(\n"
    index = 0
    for name, arr, (use_shape, use_strides, use_ndim) in zip(input_names, inputs, infos):
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        text += f"  const {location} {TYPE_STRINGS[arr.dtype]}{ref} {name} [[buffer({index})]],\n"
        index += 1
        if arr.ndim > 0:
            if use_shape:
                text += f"  const constant int* {name}_shape [[buffer({index})]],\n"
                index += 1
            if use_strides:
                text += f"  const constant int64_t* {name}_strides [[buffer({index})]],\n"
                index += 1
            if use_ndim:
                text += f"  const constant int& {name}_ndim [[buffer({index})]],\n"
                index += 1
    for name, dt in zip(output_names, output_dtypes):
        type_string = f"atomic<{TYPE_STRINGS[dt]}>" if atomic_outputs else TYPE_STRINGS[dt]
        text += f"  device {type_string}* {name} [[buffer({index})]]"
        # MLX compares the buffer index with len(inputs) + len(outputs) - 1 here, not the argument count.
        if index < len(inputs) + len(output_names) - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
        index += 1
    for i, (attr, dtype) in enumerate(attrs):
        text += f"  {dtype} {attr} [[{attr}]]"
        text += ",\n" if i < len(attrs) - 1 else ") {\n"
    text += source
    text += "\n}\n"
    if template:
        template_def = func_name + write_template(template)
        text += f'\ntemplate [[host_name("{func_name}")]] [[kernel]] decltype({template_def}) {template_def};\n'
    return text


# ---- CUDA: ml-explore/mlx mlx/backend/cuda/custom_kernel.cpp (`build_kernel`, `template_arguments_hash`) ----

CUDA_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'

# mx dtype name -> CUDA type (dtype_to_cuda_type in mlx/backend/cuda/utils.cpp)
CUDA_TYPES = {
    "bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
    "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
    "float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
}  # fmt: skip


def cuda_kernel_name(name: str, template: list[tuple[str, object]]) -> str:
    out = "custom_kernel_" + name
    for _, arg in template:
        if isinstance(arg, bool):
            out += "_t" if arg else "_f"
        elif isinstance(arg, int):
            out += f"_{arg}"
        else:
            out += "_" + TYPE_STRINGS[arg]
    return out


def write_cuda_source(
    func_name: str,
    header: str,
    source: str,
    input_names: list[str],
    inputs: list[ArgInfo],
    output_names: list[str],
    output_dtypes: list[str],
    template: list[tuple[str, object]],
) -> str:
    """The translation unit `mx.fast.cuda_kernel` hands to NVRTC: every input (scalars too) is a pointer, and
    template arguments become `constexpr` / `using` lines at the top of the body."""
    text = CUDA_DEFAULT_HEADER + header
    text += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += "__global__ void " + func_name + "(\n"
    for name, arr, (use_shape, use_strides, use_ndim) in zip(input_names, inputs, shape_infos(source, input_names)):
        text += f"    const {CUDA_TYPES[arr.dtype]}* {name},\n"
        if arr.ndim > 0:
            if use_shape:
                text += f"    const __grid_constant__ Shape {name}_shape,\n"
            if use_strides:
                text += f"    const __grid_constant__ Strides {name}_strides,\n"
            if use_ndim:
                text += f"    const __grid_constant__ int {name}_ndim,\n"
    for i, (name, dt) in enumerate(zip(output_names, output_dtypes)):
        text += f"    {CUDA_TYPES[dt]}* {name}"
        text += ",\n" if i < len(output_names) - 1 else ") {\n"
    if template:
        for name, arg in template:
            if isinstance(arg, bool):
                text += f"  constexpr bool {name} = {'true' if arg else 'false'};\n"
            elif isinstance(arg, int):
                text += f"  constexpr int {name} = {arg};\n"
            else:
                text += f"  using {name} = {CUDA_TYPES[arg]};\n"
        text += "\n"
    text += source
    text += "\n}\n\n} // namespace mlx::core::cu\n"
    return text
