"""Exact-grid affine packing against MLX's own kernels, and the streaming safetensors writer."""

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.converters.quantize import (
    QuantSetting,
    grid_fit,
    pack_codes,
    quantize_tensor,
    unpack_codes,
)
from afm_mlx.converters.synthetic import grid_tensor
from afm_mlx.converters.writer import ShardWriter
from afm_mlx.errors import AFMError


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_mlx_quantize(bits):
    w = np.random.default_rng(bits).normal(size=(6, 256)).astype(np.float32)
    packed, scales, biases = mx.quantize(mx.array(w), group_size=64, bits=bits)
    codes = unpack_codes(np.array(packed), bits, 256)
    assert codes.max() == 2**bits - 1
    assert np.array_equal(pack_codes(codes, bits), np.array(packed))
    # and the codes mean what MLX says: w = scale * q + bias per group
    expected = np.repeat(np.array(scales), 64, 1) * codes + np.repeat(np.array(biases), 64, 1)
    np.testing.assert_allclose(np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits)),
                               expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits, group", [(2, 128), (2, 32), (3, 64), (4, 32), (8, 128)])
def test_grid_weights_are_packed_exactly_at_their_own_setting(bits, group):
    w = grid_tensor(np.random.default_rng(group + bits), (40, 512), bits, group, step=0.01 / bits)
    packed = quantize_tensor(w, QuantSetting(2, 128))
    assert (packed.bits, packed.group_size, packed.exact, packed.method) == (bits, group, True, "grid")
    dq = mx.dequantize(*(mx.array(packed.arrays[k]) for k in ("weight", "scales", "biases")),
                       group_size=group, bits=bits)
    assert np.array_equal(np.array(dq), w)
    # the same products through the quantized matmul kernel: equal to the dense float64 product to fp32 rounding
    x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), *(mx.array(packed.arrays[k]) for k in ("weight", "scales", "biases")),
                            transpose=True, group_size=group, bits=bits)
    np.testing.assert_allclose(np.array(y), x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=2e-5)


def test_mx_quantize_alone_would_lose_the_grid():
    # why the converter packs itself (mlx-notes section 6): MLX's rule moves the scale off the QAT grid
    w = grid_tensor(np.random.default_rng(1), (16, 256), 2, 128, step=0.015)
    q = mx.quantize(mx.array(w), group_size=128, bits=2)
    err = np.abs(np.array(mx.dequantize(*q, group_size=128, bits=2)) - w).max()
    assert err > 1e-3
    assert quantize_tensor(w, QuantSetting(2, 128), recipe="lossy").exact  # same setting, own grid: exact


def test_groups_that_skip_a_grid_end_still_fit():
    w = grid_tensor(np.random.default_rng(2), (8, 256), 2, 128, step=0.02).reshape(8, 2, 128)
    lo, hi = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    step = ((hi - lo) / 3).astype(np.float16).astype(np.float32)
    codes = np.minimum(np.rint((w - lo) / step), 2)  # top code never used: max - min spans 2 steps
    skipped = (step * codes + lo).astype(np.float32).reshape(8, 256)
    fit = grid_fit(skipped, 2, 128)
    assert fit is not None
    codes, scales, biases = fit
    assert np.array_equal(np.repeat(scales, 128, 1) * codes + np.repeat(biases, 128, 1), skipped)


def test_off_grid_weights_fall_back_with_measured_error():
    w = np.random.default_rng(3).normal(0, 0.02, (64, 256)).astype(np.float32)
    packed = quantize_tensor(w, QuantSetting(4, 64))
    assert (packed.bits, packed.group_size, packed.exact, packed.method) == (4, 64, False, "lossy")
    assert packed.notes and "no exact grid" in packed.notes[0]
    dq = np.array(mx.dequantize(*(mx.array(packed.arrays[k]) for k in ("weight", "scales", "biases")),
                                group_size=64, bits=4)).astype(np.float64)
    assert packed.max_abs_error == np.abs(dq - w).max()
    assert packed.relative_error == pytest.approx(np.linalg.norm(dq - w) / np.linalg.norm(w.astype(np.float64)))


def test_float_storage_and_fp16_representable_weights():
    w = np.random.default_rng(4).normal(0, 0.02, (8, 64)).astype(np.float16).astype(np.float32)
    packed = quantize_tensor(w, QuantSetting(2, 64))  # auto: not on a grid, but float16 holds it exactly
    assert packed.method == "float16" and packed.exact and packed.arrays["weight"].dtype == np.float16
    off = w + np.float32(1e-6)
    assert quantize_tensor(off, QuantSetting(32), recipe="lossy").exact
    half = quantize_tensor(off, QuantSetting(16), recipe="lossy")
    assert not half.exact and 0 < half.max_abs_error < 1e-4


def test_requested_group_falls_back_to_one_that_divides():
    w = np.random.default_rng(5).normal(0, 0.02, (8, 96)).astype(np.float32)
    packed = quantize_tensor(w, QuantSetting(4, 128), recipe="lossy")
    assert packed.group_size == 32 and any("does not divide" in n for n in packed.notes)
    with pytest.raises(AFMError, match="not a multiple of 32"):
        quantize_tensor(np.zeros((4, 40), np.float32), QuantSetting(4, 32), recipe="lossy")


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=4, group_size=16)])
def test_invalid_settings(bad):
    with pytest.raises(AFMError):
        QuantSetting(**bad)


def test_writer_shards_round_trip(tmp_path):
    arrays = {
        "a": np.arange(300, dtype=np.float32).reshape(30, 10).T,  # non-contiguous input
        "scalar": np.array(0.25, np.float32),  # 0-d stays 0-d
        "codes": np.arange(500, dtype=np.uint32),
        "half": np.ones(7, np.float16),
    }
    writer = ShardWriter(tmp_path, shard_bytes=1500)
    for name, value in arrays.items():
        writer.add(name, value)
    files = writer.close()
    assert len(files) == 3 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = {}
    for f in files:
        loaded.update(mx.load(str(f)))
    for name, value in arrays.items():
        assert loaded[name].shape == value.shape and np.array_equal(np.array(loaded[name]), value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
