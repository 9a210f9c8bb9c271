"""Dispatch: which path runs where, and what happens when a kernel cannot be built or checked."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.kernels import backend, dispatch, qmm_small, qmm_small_reference, set_enabled
from kernel_oracles import emulated, kernel_verdicts, random_quantized


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    w, scales, biases = random_quantized(rng, 16, 64, 4, 32)
    return mx.array(rng.normal(size=(2, 64)).astype(np.float32)), w, scales, biases


def test_this_machine_takes_the_reference_path():
    assert not mx.metal.is_available() and not mx.cuda.is_available()
    assert backend() == "cpu"


def test_disabling_kernels_means_the_reference(inputs):
    with emulated("metal"):
        set_enabled(False)
        try:
            assert backend() == "cpu"
            qmm_small(*inputs, bits=4, group_size=32)
            assert dispatch.verdicts() == {}
        finally:
            set_enabled(True)
        assert backend() == "metal"
        qmm_small(*inputs, bits=4, group_size=32)
        assert kernel_verdicts("qmm_small") == [True]


def test_a_kernel_that_cannot_be_built_falls_back(monkeypatch, inputs):
    """mx.fast.cuda_kernel raises on a machine without CUDA: the entry point warns once and uses the reference."""

    def no_cuda(**kw):
        raise RuntimeError("[cuda_kernel] No CUDA back-end.")

    dispatch.force_backend("cuda")
    monkeypatch.setitem(dispatch.FACTORIES, "cuda", no_cuda)
    try:
        with pytest.warns(RuntimeWarning, match="No CUDA back-end"):
            y = qmm_small(*inputs, bits=4, group_size=32)
        assert kernel_verdicts("qmm_small") == [False]
    finally:
        dispatch.force_backend(None)
    np.testing.assert_array_equal(np.array(y), np.array(qmm_small_reference(*inputs, bits=4, group_size=32)))


@pytest.mark.parametrize("tf32, accepted", [("1", True), ("0", False)])
def test_float32_self_check_allows_for_a_tf32_oracle_unless_tf32_is_off(monkeypatch, tf32, accepted):
    """On a GPU MLX's float32 reference runs in TF32 by default: a float32 kernel off by 1e-3 of max|ref| (TF32's
    order, seen on an H200) passes the self-check then, and fails it with MLX_ENABLE_TF32=0."""
    monkeypatch.setenv("MLX_ENABLE_TF32", tf32)
    ref = mx.array(np.linspace(-25, 25, 64, dtype=np.float32))
    dispatch.force_backend("cuda")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dispatch.checked(("tf32-test", tf32), run_kernel=lambda: ref + 25 * 1.2e-3, run_oracle=lambda: ref,
                             run_fallback=lambda: ref, dtype=mx.float32)  # fmt: skip
        assert dispatch.verdicts()[("tf32-test", tf32)] is accepted
    finally:
        dispatch.force_backend(None)
    assert dispatch.self_check_dtype(mx.float32, "cpu") == mx.float32  # the CPU has no TF32
    assert dispatch.self_check_dtype(mx.bfloat16, "cuda") == mx.bfloat16


def test_inside_mx_compile_the_check_waits_for_an_eager_call(inputs):
    """A first call while mx.compile traces cannot evaluate the self-check: it uses the reference and records
    nothing; the next eager call checks and adopts the kernel."""
    x, w, scales, biases = inputs
    compiled = mx.compile(lambda x: qmm_small(x, w, scales, biases, bits=4, group_size=32))
    with emulated("metal"):
        traced = compiled(x)
        assert dispatch.verdicts() == {}
        eager = qmm_small(x, w, scales, biases, bits=4, group_size=32)
        assert kernel_verdicts("qmm_small") == [True]
    expected = np.array(qmm_small_reference(x, w, scales, biases, bits=4, group_size=32))
    np.testing.assert_allclose(np.array(traced), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(eager), expected, rtol=1e-5, atol=1e-5)
