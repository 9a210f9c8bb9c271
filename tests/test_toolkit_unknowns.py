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


# ---- the toolkit's tokenizer-config.json ----

AFM_PIECES = ["<turn_start>", "<turn_end>", "<n>"]


def _toolkit(root, tokenizer_config=None, specials=None, layout="assets"):
    """A toolkit dir whose tokenizer.model has `specials` trained in and, optionally, a tokenizer-config.json."""
    from tokenizer_fixture import build_tiny_tokenizer

    where = root / layout if layout else root
    build_tiny_tokenizer(where, special_pieces=AFM_PIECES if specials is None else specials)
    if tokenizer_config is not None:
        (where / "tokenizer-config.json").write_text(json.dumps(tokenizer_config))
    save_checkpoint(where / "base-model.pt", synthetic_dict(tiny_base(vocab_size=512), seed=3).items())
    return root


def _load_converted(out):
    from afm_mlx.tokenizer import load_tokenizer

    return load_tokenizer(out), json.loads((out / "tokenizer_config.json").read_text())


TAMM_CONFIG = {  # the shape tamm's JSON gives a tokenizer config: a type tag and the AFMTokenizer arguments
    "__tamm_type__": "tokenizers:AFMTokenizerConfig",
    "user_defined_tokens": AFM_PIECES,
    "extra_properties": {"eot_id": None},
}


@pytest.mark.parametrize("layout", ["assets", ""])
def test_special_pieces_from_the_toolkit_tokenizer_config(tmp_path, layout):
    root = _toolkit(tmp_path / "tk", TAMM_CONFIG, specials=[], layout=layout)
    source = root / layout / "tokenizer.model" if layout else root / "tokenizer.model"
    with pytest.raises(AFMError, match="no <turn_start> piece"):  # tokenizer.model alone is not enough
        from afm_mlx.tokenizer import load_tokenizer
        load_tokenizer(source)
    result = convert(root, tmp_path / "out")
    tok, saved = _load_converted(tmp_path / "out")
    base = tok.vocab_size - 3
    assert [tok.turn_start_id, tok.turn_end_id, tok.newline_id] == [base, base + 1, base + 2]  # appended in order
    assert [tok.sp.get_score(i) for i in range(base, base + 3)] == [0.0] * 3
    assert all(tok.sp.is_control(i) is False and tok.sp.is_unknown(i) is False for i in range(base, base + 3))
    assert tok.encode_prompt("Hi\nthere")[-1] != tok.sp.unk_id()
    assert "\n" in tok.decode(tok.encode("a\nb")) and result.report["tokenizer"]["added_pieces"] == 3
    assert "eot_id" not in saved


def test_pad_vocab_size_to_and_eot_id(tmp_path):
    config = {"tokenizer": {"user_defined_tokens": ["<extra_a>"], "pad_vocab_size_to": 420,
                            "extra_properties": {"eot_id": 5}}}  # nested one level, as a wrapped tamm config
    _toolkit(tmp_path / "tk", config)
    convert(tmp_path / "tk", tmp_path / "out")
    tok, saved = _load_converted(tmp_path / "out")
    assert tok.vocab_size == 420 and saved["eot_id"] == 5 and 5 in tok.stop_ids
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size - 4, tok.vocab_size)]
    assert pieces[0] != "<extra_a>" and tok.id_to_piece(tok.vocab_size - 1) == "<extra_id_0>"
    first_pad = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<extra_id_"))
    assert tok.id_to_piece(first_pad - 1) == "<extra_a>"  # user tokens first, then <extra_id_N> down to 0
    assert tok.id_to_piece(first_pad) == f"<extra_id_{tok.vocab_size - 1 - first_pad}>"


def test_without_a_tokenizer_config_the_model_file_is_copied_as_is(tmp_path):
    root = _toolkit(tmp_path / "tk")
    result = convert(root, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (root / "assets" / "tokenizer.model").read_bytes()
    assert result.report["tokenizer"]["toolkit_config"] is None and result.report["tokenizer"]["added_pieces"] == 0


@pytest.mark.parametrize("config, match", [
    ({"user_defined_tokens": "<n>"}, "list of non-empty strings"),
    ({"pad_vocab_size_to": "400"}, "pad_vocab_size_to"),
    ({"extra_properties": {"eot_id": 10**6}}, "eot_id"),
    ({"user_defined_tokens": ["<n>"]}, "cannot add"),  # already a piece of tokenizer.model
])
def test_bad_toolkit_tokenizer_config(tmp_path, config, match):
    _toolkit(tmp_path / "tk", config)
    with pytest.raises(AFMError, match=match):
        convert(tmp_path / "tk", tmp_path / "out")


@pytest.mark.parametrize("option, match", [
    (dict(draft_token_count=-1), "draft token count"), (dict(draft_token_count=0), "draft token count"),
    (dict(base_signature=""), "hex digest"), (dict(base_signature="XYZ1234"), "hex digest"),
    (dict(name="bad\udcff"), "adapter name"), (dict(name="two\nlines"), "adapter name"),
])
def test_export_options_metadata_json_could_not_carry(adapter, tmp_path, option, match):
    from afm_mlx.converters.adapter_formats import write_fmadapter

    options = {"name": "mail", **option}
    with pytest.raises(AFMError, match=match):
        write_fmadapter(adapter, tmp_path, options.pop("name"), TINY, **options)
    assert not list(tmp_path.iterdir())  # nothing half-written
