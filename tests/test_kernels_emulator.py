"""The Metal/CUDA emulation harness itself: it writes the kernel text MLX writes, gives MSL/CUDA semantics to
barriers, collectives and 16-bit floats, and catches broken kernels (missing barrier, off-by-one, divergence)."""

from __future__ import annotations

import os
import tempfile
import warnings

import mlx.core as mx
import numpy as np
import pytest

import metal_emu
from afm_mlx.kernels import attention, dispatch, kv_attention, qmm, qmm_small, qmm_small_reference
from kernel_oracles import attention_oracle, emulated, f64, random_codes, random_quantized

# ---- the generated text is MLX's ----


def mlx_generated_source(capfd, name, input_names, output_names, source, call) -> str:
    """The source mx.fast.metal_kernel generates, captured from its verbose print while exporting (MLX traces
    Metal kernels for export without a Metal device)."""
    kernel = mx.fast.metal_kernel(name=name, input_names=input_names, output_names=output_names, source=source)
    arrays = [a for a in call["inputs"] if isinstance(a, mx.array)]

    def fn(*arrs):
        it = iter(arrs)
        inputs = [next(it) if isinstance(a, mx.array) else a for a in call["inputs"]]
        return kernel(**dict(call, inputs=inputs), verbose=True)

    capfd.readouterr()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mx.export_function(os.path.join(tmp, "k.mlxfn"), fn, *arrays)
        except RuntimeError as err:
            pytest.skip(f"this MLX cannot trace a Metal kernel without Metal: {err}")
    out = capfd.readouterr().out
    return out.split("```\n", 1)[1].rsplit("\n```", 1)[0]


SIGNATURE_CASES = {
    "qmm_small": ("afm_qmm_small", qmm.INPUTS, ["y"], dict(
        inputs=[mx.zeros((3, 64), mx.float16), mx.zeros((8, 8), mx.uint32), mx.zeros((8, 2), mx.float16),
                mx.zeros((8, 2), mx.float16), mx.zeros((3, 5)), mx.zeros((5, 8), mx.float16), 64, 8, 5],
        template=[("T", mx.float16), ("S", mx.float16), ("BT", mx.float16), ("M", 3), ("BITS", 4), ("GS", 32),
                  ("R", 4), ("HAS_LORA", True)],
        grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(3, 8)], output_dtypes=[mx.float16])),
    "kv_attention_partial": ("afm_kv_attention_partial", attention.PARTIAL_INPUTS, attention.PARTIAL_OUTPUTS, dict(
        inputs=[mx.zeros((1, 16, 4, 128), mx.bfloat16), mx.zeros((1, 2, 256, 128), mx.int8),
                mx.zeros((1, 2, 256, 128), mx.int8), mx.array(0.1), 70, 256, 2, 64],
        template=[("T", mx.bfloat16), ("D", 128), ("L", 4), ("G", 8), ("NSG", 8), ("RPS", 4), ("CAUSAL", True)],
        grid=(64, 8, 2), threadgroup=(32, 8, 1), output_shapes=[(64, 2, 128), (64, 2), (64, 2)],
        output_dtypes=[mx.float32] * 3)),
    "kv_attention_reduce": ("afm_kv_attention_reduce", attention.REDUCE_INPUTS, ["out"], dict(
        inputs=[mx.zeros((64, 2, 128)), mx.zeros((64, 2)), mx.zeros((64, 2)), mx.array(0.1), 2],
        template=[("T", mx.float32), ("D", 128)], grid=(128, 64, 1), threadgroup=(128, 1, 1),
        output_shapes=[(64, 128)], output_dtypes=[mx.float32])),
    # shape/strides/ndim arguments, a small (constant address space) input, no template
    "shapes": ("shapes", ["a", "b"], ["out"], dict(
        inputs=[mx.zeros((4, 5)), mx.zeros((3,), mx.int32)], grid=(20, 1, 1), threadgroup=(32, 1, 1),
        output_shapes=[(20,)], output_dtypes=[mx.float32])),
}  # fmt: skip
SHAPES_BODY = "uint i = thread_position_in_grid.x; out[i] = a[i] * a_shape[0] + a_strides[0] + a_ndim + b[0];"


@pytest.mark.parametrize("case", SIGNATURE_CASES)
def test_generated_source_is_mlx_byte_for_byte(capfd, case):
    name, input_names, output_names, call = SIGNATURE_CASES[case]
    source = SHAPES_BODY if case == "shapes" else dispatch.body(case, "metal")
    expected = mlx_generated_source(capfd, name, input_names, output_names, source, call)
    ours = metal_emu.metal_kernel(name, input_names, output_names, source)
    assert ours.generated_source(call["inputs"], call["output_dtypes"], call.get("template")) == expected


def test_shape_arguments_reach_the_kernel():
    body = SHAPES_BODY.replace("out[i] =", "if (i < 20) out[i] =")
    kern = metal_emu.metal_kernel("shapes", ["a", "b"], ["out"], body)
    a = mx.arange(20, dtype=mx.float32).reshape(4, 5)
    out = kern(inputs=[a, mx.array([7, 0, 0])], grid=(20, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(20,)],
               output_dtypes=[mx.float32])[0]  # fmt: skip
    np.testing.assert_array_equal(np.array(out), np.arange(20) * 4 + 5 + 2 + 7)


# ---- MSL semantics ----

COLLECTIVES = """
uint i = thread_position_in_grid.x;
uint lane = thread_index_in_simdgroup;
float v = inp[i];
out[i * 9 + 0] = simd_sum(v);
out[i * 9 + 1] = simd_max(v);
out[i * 9 + 2] = simd_min(v);
out[i * 9 + 3] = simd_shuffle(v, ushort((lane * 7) % 32));
out[i * 9 + 4] = simd_shuffle_down(v, ushort(3));
out[i * 9 + 5] = simd_shuffle_xor(v, ushort(5));
out[i * 9 + 6] = simd_broadcast(v, ushort(4));
out[i * 9 + 7] = simd_prefix_exclusive_sum(v);
out[i * 9 + 8] = float(simdgroup_index_in_threadgroup * 100 + lane);
"""


def test_simdgroup_collectives():
    """Full SIMD-groups of 32 and a partial one (the grid's edge group holds 20 threads); NumPy in, NumPy out."""
    n = 84  # groups of 64: [0, 64) and an edge group of 20 -> SIMD-groups of 32, 32, 20
    x = np.random.default_rng(0).permutation(n).astype(np.float32)
    kern = metal_emu.metal_kernel("coll", ["inp"], ["out"], COLLECTIVES)
    (out,) = kern.run_numpy([x], [(n, 9)], [np.float32], grid=(n, 1, 1), threadgroup=(64, 1, 1))  # NumPy in and out
    for start, width in [(0, 32), (32, 32), (64, 20)]:
        v = x[start : start + width]
        lanes = np.arange(width)
        rows = out[start : start + width]
        np.testing.assert_array_equal(rows[:, 0], v.sum())
        np.testing.assert_array_equal(rows[:, 1], v.max())
        np.testing.assert_array_equal(rows[:, 2], v.min())
        src = (lanes * 7) % 32
        np.testing.assert_array_equal(rows[:, 3], np.where(src < width, v[np.minimum(src, width - 1)], v))
        down = lanes + 3
        np.testing.assert_array_equal(rows[:, 4], np.where(down < width, v[np.minimum(down, width - 1)], v))
        xor = lanes ^ 5
        np.testing.assert_array_equal(rows[:, 5], np.where(xor < width, v[np.minimum(xor, width - 1)], v))
        np.testing.assert_array_equal(rows[:, 6], v[4])
        np.testing.assert_array_equal(rows[:, 7], np.concatenate([[0], np.cumsum(v)[:-1]]))
        np.testing.assert_array_equal(rows[:, 8], (start % 64) // 32 * 100 + lanes)


REVERSE = """
uint t = thread_index_in_threadgroup;
threadgroup float buf[64];
buf[t] = inp[thread_position_in_grid.x];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[thread_position_in_grid.x] = buf[63 - t];
"""


@pytest.mark.parametrize("reverse", [False, True])
def test_a_missing_barrier_is_caught(reverse):
    x = mx.arange(128, dtype=mx.float32)
    expected = np.arange(128).reshape(2, 64)[:, ::-1].reshape(-1)
    for body, ok in [(REVERSE, True), (REVERSE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", ""), False)]:
        kern = metal_emu.metal_kernel("rev", ["inp"], ["out"], body)
        kern.reverse = reverse
        out = np.array(kern(inputs=[x], grid=(128, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(128,)],
                            output_dtypes=[mx.float32])[0])  # fmt: skip
        assert np.array_equal(out, expected) == ok


@pytest.mark.parametrize(
    "body,message",
    [
        ("if (thread_index_in_threadgroup < 10) return; threadgroup_barrier(mem_flags::mem_threadgroup); out[0] = 1;",
         "barrier not reached"),
        ("float v = 1; if (thread_index_in_simdgroup < 16) v = simd_sum(v); out[0] = simd_max(v);",
         "different collectives"),
        ("uint i = thread_position_in_grid.x; out[i] = inp[i + 1];", "out-of-bounds access to 'inp'"),
        ("uint i = thread_position_in_grid.x; out[i + 1] = inp[i];", "out-of-bounds access to 'out'"),
        ("threadgroup float big[9000]; big[thread_index_in_threadgroup] = 1; out[0] = big[0];", "32 KiB"),
        ("out[0] = undeclared_name;", "does not compile"),
    ],
)  # fmt: skip
def test_gpu_rule_violations_are_errors(body, message):
    kern = metal_emu.metal_kernel("bad", ["inp"], ["out"], body)
    with pytest.raises(metal_emu.EmulatorError, match=message):
        kern(inputs=[mx.zeros((64,))], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,)],
             output_dtypes=[mx.float32])  # fmt: skip


def test_unwritten_outputs_are_nan_and_16_bit_floats_round_like_mlx():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=500), [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 65504.0, 1e-6, -0.0]])
    body = ("uint i = thread_position_in_grid.x;"
            "if (i < n) { h[i] = static_cast<half>(inp[i]); b[i] = static_cast<bfloat16_t>(inp[i]); }")
    kern = metal_emu.metal_kernel("round", ["inp", "n"], ["h", "b"], body)
    n = x.size
    h, b = kern(inputs=[mx.array(x, dtype=mx.float32), n - 1], grid=(n, 1, 1), threadgroup=(64, 1, 1),
                output_shapes=[(n,), (n,)], output_dtypes=[mx.float16, mx.bfloat16])  # fmt: skip
    xs = mx.array(x[:-1], dtype=mx.float32)
    np.testing.assert_array_equal(np.array(h[:-1].view(mx.uint16)), np.array(xs.astype(mx.float16).view(mx.uint16)))
    np.testing.assert_array_equal(np.array(b[:-1].view(mx.uint16)), np.array(xs.astype(mx.bfloat16).view(mx.uint16)))
    assert np.isnan(np.array(h[-1])) and np.isnan(np.array(b[-1].astype(mx.float32)))


# ---- CUDA semantics ----

CUDA_BODY = """
auto rank = cooperative_groups::this_grid().thread_rank();
__shared__ float tile[64];
tile[threadIdx.x] = rank < n[0] ? inp[rank] : 0.0f;
__syncthreads();
float v = tile[63 - threadIdx.x];
for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
float down = __shfl_down_sync(0xffffffffu, tile[threadIdx.x], 1);
if (rank < n[0]) {
  out[rank * 3 + 0] = v;
  out[rank * 3 + 1] = down;
  out[rank * 3 + 2] = float(blockIdx.x * 1000 + blockDim.x * 10 + gridDim.x);
}
"""


def test_cuda_blocks_are_whole_and_shuffles_work():
    """CUDA launches ceil(grid / block) whole blocks (threads past the grid exist and must be guarded)."""
    n = 80
    x = np.arange(n, dtype=np.float32) + 1
    kern = metal_emu.cuda_kernel("cu", ["inp", "n"], ["out"], CUDA_BODY)
    out = np.array(kern(inputs=[mx.array(x), n], grid=(n, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(n * 3,)],
                        output_dtypes=[mx.float32])[0]).reshape(n, 3)  # fmt: skip
    padded = np.concatenate([x, np.zeros(128 - n, np.float32)]).reshape(2, 64)
    reversed_ = padded[:, ::-1]
    warp_sums = reversed_.reshape(2, 2, 32).sum(-1).repeat(32, axis=1).reshape(-1)
    np.testing.assert_array_equal(out[:, 0], warp_sums[:n])
    down = padded.reshape(4, 32)
    down = np.concatenate([down[:, 1:], down[:, -1:]], axis=1).reshape(-1)  # lane 31 keeps its own value
    np.testing.assert_array_equal(out[:, 1], down[:n])
    np.testing.assert_array_equal(out[:, 2], (np.arange(n) // 64) * 1000 + 640 + 2)


# ---- deliberately broken kernels ----


def mutate(monkeypatch, stem: str, old: str, new: str, count: int = 1) -> None:
    original = dispatch.body

    def body(name, which):
        text = original(name, which)
        if name != stem:
            return text
        assert text.count(old) >= count, f"mutation target not found in {name}"
        return text.replace(old, new, count)

    monkeypatch.setattr(dispatch, "body", body)


def test_attention_without_its_tile_barrier_is_caught(monkeypatch):
    """Drop the barrier that keeps a SIMD-group from overwriting the K/V tile another is still reading."""
    mutate(monkeypatch, "kv_attention_partial", "threadgroup_barrier(mem_flags::mem_threadgroup);  // every", "// ")
    rng = np.random.default_rng(4)
    q = mx.array(rng.normal(size=(1, 8, 3, 32)).astype(np.float32))
    kc, vc = random_codes(rng, (1, 2, 100, 32)), random_codes(rng, (1, 2, 100, 32))
    with emulated("metal"):
        with pytest.warns(RuntimeWarning, match="failed its self-check"):
            out = kv_attention(q, kc, vc, 0.02, 0.01, scale=0.2, kv_len=100)
        assert list(dispatch.verdicts().values()) == [False]
    np.testing.assert_allclose(f64(out), attention_oracle(q, kc, vc, 0.02, 0.01, 0.2, 100), rtol=1e-5, atol=1e-6)


def test_an_off_by_one_is_caught_and_the_reference_takes_over(monkeypatch):
    """An indexing slip (every row gets row 0's activation sum) fails the self-check: warning, then the
    reference for the rest of the process, without re-checking."""
    mutate(monkeypatch, "qmm_small", "bi[r] * xsum[m]", "bi[r] * xsum[0]")
    rng = np.random.default_rng(9)
    w, scales, biases = random_quantized(rng, 16, 128, 4, 32)
    x = mx.array(rng.normal(size=(4, 128)).astype(np.float32))
    expected = np.array(qmm_small_reference(x, w, scales, biases, bits=4, group_size=32))
    with emulated("metal"):
        with pytest.warns(RuntimeWarning, match="qmm_small.*failed its self-check"):
            first = qmm_small(x, w, scales, biases, bits=4, group_size=32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = qmm_small(x, w, scales, biases, bits=4, group_size=32)
        assert list(dispatch.verdicts().values()) == [False]
    np.testing.assert_array_equal(np.array(first), expected)
    np.testing.assert_array_equal(np.array(second), expected)


def test_the_missing_tile_barrier_changes_the_emulated_result(monkeypatch):
    """The same broken attention kernel run directly: the emulator's output is wrong, not just flagged."""
    mutate(monkeypatch, "kv_attention_partial", "threadgroup_barrier(mem_flags::mem_threadgroup);  // every", "// ")
    rng = np.random.default_rng(4)
    q = mx.array(rng.normal(size=(1, 8, 3, 32)).astype(np.float32))
    kc, vc = random_codes(rng, (1, 2, 100, 32)), random_codes(rng, (1, 2, 100, 32))
    with emulated("metal"):
        out = attention._launch("metal", q, kc, vc, mx.array(0.02 * 0.2), mx.array(0.01), 100, True)
    err = np.abs(f64(out) - attention_oracle(q, kc, vc, 0.02, 0.01, 0.2, 100)).max()
    assert not err < 1e-3, err
