"""Interoperability with mlx-lm's afm7: its directories load in afm-mlx, ours load in mlx-lm, same logits.

mlx-lm 0.32's `FusedLinear.to_quantized(group_size, bits)` lacks the `mode` argument that `nn.quantize` and
mlx-lm's own loader pass (mlx-notes.md section 0, bug 1), so no quantized afm7 can load in unpatched mlx-lm. The
`patched_mlx_lm` fixture adds the argument for these tests; it is a test-only patch of mlx-lm, not of afm-mlx.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from afm_mlx.converters import convert
from afm_mlx.converters.mapping import toolkit_to_mlx_arrays
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.loading import load_model
from afm_mlx.presets import tiny_base
from reference import reference_forward

afm7 = pytest.importorskip("mlx_lm.models.afm7", reason="interop tests need mlx-lm")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils", reason="interop tests need mlx-lm")

BASE = tiny_base(vocab_size=512)
TOKENS = np.array([1, 3, 17, 200, 5, 5, 99, 42, 7, 128, 4, 250])
TIE = {"output_transform.weight": "embedding.weight"}


@pytest.fixture
def patched_mlx_lm(monkeypatch):
    original = afm7.FusedLinear.to_quantized

    def to_quantized(self, group_size=64, bits=4, mode="affine", **kwargs):
        assert mode == "affine" and not kwargs
        return original(self, group_size, bits)

    monkeypatch.setattr(afm7.FusedLinear, "to_quantized", to_quantized)


def logits(model):
    return np.array(model(mx.array(TOKENS)[None])[0]).astype(np.float64)


def mlx_lm_model(config, arrays):
    model = afm7.Model(afm7.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in arrays.items()], strict=True)
    return model


@pytest.mark.parametrize("quantized", [False, True])
def test_mlx_lm_directory_loads_in_afm_mlx(tmp_path, patched_mlx_lm, quantized):
    config, arrays = toolkit_to_mlx_arrays(synthetic_dict(BASE, seed=31))
    config = {k: v for k, v in config.items() if k != "kv_quant"}  # mlx-lm's afm7 has no such field
    theirs = mlx_lm_model(config, arrays)
    if quantized:  # mlx-lm's own quantization path (mx.quantize), 4-bit g32 linears, 8-bit g64 embedding
        block = {"group_size": 32, "bits": 4, "model.embedding": {"group_size": 64, "bits": 8}}
        nn.quantize(theirs, group_size=32, bits=4,
                    class_predicate=lambda p, m: block.get(p, True) if hasattr(m, "to_quantized") else False)
        config["quantization"] = block
    mlx_lm_utils.save_model(tmp_path, theirs)
    mlx_lm_utils.save_config(config, tmp_path / "config.json")
    ours, our_config = load_model(tmp_path, dtype=mx.float32)
    assert our_config["kv_quant"] is True
    assert np.abs(logits(ours) - logits(theirs)).max() <= 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    sd = synthetic_dict(BASE, seed=32, grid=True)
    save_checkpoint(root / "base-model.pt", list(sd.items()), tie=TIE)
    outs = {}
    for name, options in {"auto": {}, "float32": dict(recipe="lossy", bits=32, embedding_bits=32)}.items():
        outs[name] = root / name
        convert(base=root / "base-model.pt", out=outs[name], **options)
    return sd, outs


@pytest.mark.parametrize("which", ["auto", "float32"])
def test_afm_mlx_output_loads_in_mlx_lm(converted, patched_mlx_lm, which):
    sd, outs = converted
    theirs, config = mlx_lm_utils.load_model(outs[which])
    assert isinstance(theirs, afm7.Model)
    assert ("quantization" in config) == (which == "auto")
    if which == "auto":  # the 2-bit linears really are quantized modules in mlx-lm too
        assert isinstance(theirs.model.layers[0].self_attn.qkv_proj, afm7.FusedQuantizedLinear)
        assert theirs.model.layers[0].mlp.down_proj.bits == 2
    ours, _ = load_model(outs[which], dtype=mx.float32)
    ref = reference_forward(sd, TOKENS, BASE.to_dict())
    assert np.abs(logits(theirs) - ref).max() <= 1e-4
    assert np.abs(logits(theirs) - logits(ours)).max() <= 1e-4


def test_unpatched_mlx_lm_fails_on_quantized_afm7(converted):
    # documents why the fixture exists: remove it (and this test) once mlx-lm accepts `mode`
    _, outs = converted
    with pytest.raises(TypeError, match="mode"):
        mlx_lm_utils.load_model(outs["auto"])
    theirs, _ = mlx_lm_utils.load_model(outs["float32"])  # unquantized output loads as is
    assert len(tree_flatten(theirs.parameters())) == len(json.loads(
        (outs["float32"] / "conversion_report.json").read_text())["base"]["tensors"])
