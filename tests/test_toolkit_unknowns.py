"""What we do where Apple's real files may differ from what the public code shows (issue #16, section 4)."""

import json

import numpy as np
import pytest

from afm_mlx.converters import convert
from afm_mlx.converters.mapping import map_toolkit_state_dict
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.errors import AFMError
from afm_mlx.presets import tiny_base

TINY = tiny_base(vocab_size=64)
OBSERVER = "layers.segment_0.layer_{i}.attention.kv_quantizer.{kind}_quantizer."


def _with_extra_observer_state(sd):
    """An EMA-observer FakeQuantize may keep more than `range`/`num_samples`: min/max, flags, a cached scale."""
    sd = dict(sd)
    for i in range(TINY.num_regular_layers):
        for kind in ("key", "value"):
            prefix = OBSERVER.format(i=i, kind=kind)
            sd[prefix + "activation_post_process.min_val"] = np.float32(-3.0)
            sd[prefix + "fake_quant_enabled"] = np.array([1], np.int64)
    return sd


def test_unknown_kv_quantizer_buffers_are_ignored_and_listed(tmp_path):
    sd = _with_extra_observer_state(synthetic_dict(TINY, seed=2))
    mapped = map_toolkit_state_dict(sd)
    assert len(mapped.unknown_buffers) == 4 * TINY.num_regular_layers and mapped.config["kv_quant"]
    save_checkpoint(tmp_path / "base-model.pt", sd.items())
    result = convert(base=tmp_path / "base-model.pt", out=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["base"]["ignored_unknown_buffers"] == mapped.unknown_buffers
    assert result.base.unknown_buffers == mapped.unknown_buffers


@pytest.mark.parametrize("name, message", [
    ("key_quantizer.observer.weight", "unknown key"),  # a learned tensor is never ignored
    ("key_quantizer.activation_post_process.bias", "unknown key"),
    ("query_quantizer.activation_post_process.range", "unknown key"),  # not a quantizer we know
])
def test_unknown_weights_under_the_quantizer_still_refuse(name, message):
    sd = synthetic_dict(TINY, seed=2)
    sd[f"layers.segment_0.layer_0.attention.kv_quantizer.{name}"] = np.zeros(2, np.float32)
    with pytest.raises(AFMError, match=message):
        map_toolkit_state_dict(sd)


def test_observer_state_without_a_range_is_refused():
    sd = {k: v for k, v in synthetic_dict(TINY, seed=2).items() if not k.endswith(".range")}
    sd = _with_extra_observer_state(sd)
    with pytest.raises(AFMError, match="without `range`"):
        map_toolkit_state_dict(sd)


# ---- template and exporter parity ----


def test_empty_tool_calls_render_tamms_empty_block():
    from afm_mlx.tokenizer import render_chat_template

    text = render_chat_template([{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "ok", "tool_calls": []}])
    assert text.endswith("<turn_start> assistant<n>ok<executable_start> ```function\n[]```<executable_end><turn_end>")
    absent = render_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}])
    assert absent.endswith("<turn_start> assistant<n>ok<turn_end>")


@pytest.fixture(scope="module")
def adapter():
    from adapter_fixtures import toolkit_lora
    from afm_mlx.converters.adapter_formats import AdapterWeights, toolkit_key_to_name

    sd = toolkit_lora(TINY, seed=1, rank=4)
    tensors = {toolkit_key_to_name(k)[0]: v for k, v in sd.items()}
    return AdapterWeights(tensors, 4, 0.5, "memory", "test")


def test_exporter_identifier_keeps_a_fmadapter_suffix_as_the_toolkit_does(adapter, tmp_path):
    from afm_mlx.converters.adapter_formats import write_fmadapter

    path = write_fmadapter(adapter, tmp_path, "mail.fmadapter", TINY)
    assert path == tmp_path / "mail.fmadapter"  # not mail.fmadapter.fmadapter
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["adapterIdentifier"] == "fmadapter-mail.fmadapter-9799725"  # the toolkit's f"fmadapter-{name}-..."
    plain = write_fmadapter(adapter, tmp_path / "plain", "mail", TINY)
    assert json.loads((plain / "metadata.json").read_text())["adapterIdentifier"] == "fmadapter-mail-9799725"


def test_hyphenated_adapter_names_warn(adapter, tmp_path):
    from afm_mlx.converters.adapter_formats import write_fmadapter

    with pytest.warns(UserWarning, match="hyphen"):
        write_fmadapter(adapter, tmp_path, "my-mail", TINY)
