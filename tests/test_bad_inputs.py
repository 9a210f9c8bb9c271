"""Malformed files and values are refused with one AFMError line (and, from the CLI, exit 1), never accepted
silently and never a traceback: config.json, tokenizer_config.json, adapter_config.json, .fmadapter metadata and
weights, checkpoint dtypes, convert options, info and bench options (issue #16, section 2)."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from adapter_fixtures import toolkit_lora, write_test_fmadapter
from afm_mlx.cli import app
from afm_mlx.converters import convert
from afm_mlx.converters.adapter_formats import read_adapter, read_fmadapter_metadata, read_mlx_adapter
from afm_mlx.converters.mapping import map_toolkit_state_dict
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.errors import AFMError
from afm_mlx.loading import DEMO_MODEL_DIR, load_model
from afm_mlx.presets import tiny_base
from afm_mlx.tokenizer import load_tokenizer

runner = CliRunner()
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
HUGE_INT = "1" * 5000  # json.loads: ValueError (beyond Python's int digit limit)


def one_line(call, match):
    with pytest.raises(AFMError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def cli_one_line(args, match):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "model"
    shutil.copytree(DEMO_MODEL_DIR, path, ignore=shutil.ignore_patterns("draft"))
    return path


CONFIG_EDITS = [
    ({"vocab_size": "8192"}, "vocab_size must be an integer"),
    ({"num_heads": 0}, "num_heads = 0 is outside"),
    ({"num_kv_heads": 0}, "num_kv_heads = 0 is outside"),
    ({"num_layers": 100_000_000}, "num_layers = 100000000 is outside"),  # used to build layers for hours
    ({"hidden_dim": 256.0}, "hidden_dim must be an integer"),
    ({"num_layers": True}, "num_layers must be an integer"),
    ({"rope_theta": -1}, "rope_theta = -1 must be finite"),
    ({"rope_theta": 1e999}, "rope_theta = inf must be finite"),  # JSON 1e999 parses as inf
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number"),
    ({"kv_quant": "yes"}, "kv_quant must be true or false"),
    ({"quantization": [2, 128]}, "`quantization` must be an object"),
    ({"quantization": {"bits": "2", "group_size": 128}}, "quantization.bits must be one of"),
    ({"quantization": {"bits": 2, "group_size": 128, "model.embedding": {"bits": 4}}},
     "quantization.model.embedding.group_size"),
]


@pytest.mark.parametrize("edit, match", CONFIG_EDITS)
def test_malformed_config_json(demo_copy, edit, match):
    original = (demo_copy / "config.json").read_text()
    config = {**json.loads(original), **edit}
    (demo_copy / "config.json").write_text(json.dumps(config).replace("Infinity", "1e999"))
    try:
        one_line(lambda: load_model(demo_copy), match)
        cli_one_line(["generate", "hi", "-m", demo_copy, "-n", 1], match)
    finally:
        (demo_copy / "config.json").write_text(original)


@pytest.mark.parametrize("text, match", [
    (DEEP, "nested too deeply"), ('{"vocab_size": ' + HUGE_INT + "}", "invalid JSON"),
    ('{"rope_theta": NaN}', "NaN is not valid JSON"), (b'{"a": "\xff"}', "not UTF-8"), ("[1, 2]", "JSON object"),
])
def test_config_json_that_is_not_strict_json(tmp_path, text, match):
    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line(lambda: load_model(tmp_path), match)


def test_malformed_tokenizer_config(tmp_path):
    shutil.copy(DEMO_MODEL_DIR / "tokenizer.model", tmp_path)
    for text, match in [(DEEP, "nested too deeply"), (b"\xfe\xff", "not UTF-8"), ('{"eos_id": 1e999}', "eos_id"),
                        ('{"eos_id": "1"}', "eos_id='1' but"), ('{"eot_id": true}', "eot_id must be a token id")]:
        (tmp_path / "tokenizer_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        one_line(lambda: load_tokenizer(tmp_path), match)


@pytest.fixture(scope="module")
def lora():
    return toolkit_lora(tiny_base(), seed=3, rank=4)


@pytest.mark.parametrize("edit, match", [
    ({"loraRank": "4"}, "`loraRank` must be int"), ({"loraRank": True}, "`loraRank` must be int"),
    ({"loraRank": 10**30}, "outside 1..4096"), ({"baseModelSignature": 7}, "`baseModelSignature` must be str"),
])
def test_malformed_fmadapter_metadata(lora, tmp_path, edit, match):
    path = write_test_fmadapter(lora, tiny_base(), tmp_path / "a.fmadapter", 4)
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, **edit}))
    one_line(lambda: read_fmadapter_metadata(path), match)


def test_nan_weights_in_a_fmadapter_are_refused(lora, tmp_path):
    damaged = dict(lora)
    key = next(k for k in damaged if k.endswith("b_transpose"))
    damaged[key] = damaged[key].copy()
    damaged[key][0, 0] = np.nan
    path = write_test_fmadapter(damaged, tiny_base(), tmp_path / "nan.fmadapter", 4)
    one_line(lambda: read_adapter(path, tiny_base()), "NaN or infinite")


@pytest.mark.parametrize("params, match", [
    ({"rank": "4", "scale": 0.5}, "`rank` must be int"), ({"rank": 4, "scale": "x"}, "`scale` must be"),
    ({"rank": 4}, "`scale` must be"), (None, "`lora_parameters` must be dict"), ({"rank": -4, "scale": 1}, "1..4096"),
])
def test_malformed_adapter_config(tmp_path, params, match):
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": params}))
    one_line(lambda: read_mlx_adapter(tmp_path), match)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_or_bool_weights_are_not_quantized_as_exact(dtype):
    sd = synthetic_dict(dict(vocab_size=64, hidden_dim=64, num_layers=2, num_kv_reuse_layers=1, num_heads=4,
                             num_kv_heads=2, hidden_dim_scale_factor=1.5))
    sd["embedding.weight"] = (sd["embedding.weight"] > 0).astype(dtype)
    sd.pop("output_transform.weight")
    one_line(lambda: map_toolkit_state_dict(sd), f"embedding.weight \\({np.dtype(dtype).name}\\)")


@pytest.mark.parametrize("option", [dict(rope_theta=float("inf")), dict(rope_theta=float("nan")),
                                    dict(rope_theta=-1.0), dict(draft_rope_theta=0.0)])
def test_bad_rope_theta_is_never_written(tmp_path, option):
    base = tmp_path / "base-model.pt"
    save_checkpoint(base, synthetic_dict(tiny_base(vocab_size=64)).items())
    one_line(lambda: convert(base=base, out=tmp_path / "out", draft=base, **option), "invalid model config: rope_")
    assert not (tmp_path / "out").exists()


def test_info_and_bench_options(tmp_path):
    cli_one_line(["info", "--lora-rank", -1], "--lora-rank")
    cli_one_line(["bench", "--tiny", "--prompts", tmp_path / "missing.txt"], "--prompts feeds")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    cli_one_line(["bench", "--prompts", tmp_path / "bad.txt", "--out", tmp_path], "not UTF-8")
    (tmp_path / "bad.json").write_text(DEEP)
    cli_one_line(["bench", "--prompts", tmp_path / "bad.json", "--out", tmp_path], "nested too deeply")
    cli_one_line(["bench", "--prompts", tmp_path / "missing.txt", "--out", tmp_path], "not found")
