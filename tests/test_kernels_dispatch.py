"""Dispatch: which path runs where, and what happens when a kernel cannot be built or checked."""

from __future__ import annotations

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
