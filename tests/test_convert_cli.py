"""`afm-mlx convert` on good, hostile and broken inputs: one-line errors, exit code 1, no output directory."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from afm_mlx.cli import app
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.presets import tiny_base
from tokenizer_fixture import build_tiny_tokenizer

BASE = tiny_base(vocab_size=512)
TIE = {"output_transform.weight": "embedding.weight"}
runner = CliRunner()


def write(path, state_dict):
    save_checkpoint(path, list(state_dict.items()), tie=TIE if "output_transform.weight" in state_dict else None)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    write(root / "base-model.pt", synthetic_dict(BASE, seed=21, grid=True))
    build_tiny_tokenizer(root)
    return root


def test_cli_converts_and_prints_summary(good, tmp_path):
    result = runner.invoke(app, ["convert", str(good), str(tmp_path / "out")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "conversion summary" in result.output and "2-bit g64 (exact grid)" in result.output
    assert "all tensors exact" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "afm7"
    again = runner.invoke(app, ["convert", str(good), str(tmp_path / "out")])
    assert again.exit_code == 1 and "--force" in again.output


def test_cli_lossy_settings_reach_config(good, tmp_path):
    result = runner.invoke(app, ["convert", "--base", str(good / "base-model.pt"), str(tmp_path / "o"),
                                 "--recipe", "lossy", "--bits", "4", "--group-size", "32", "--embedding-bits", "8",
                                 "--embedding-group-size", "64", "--override", "model.layers.0.mlp.down_proj=3:32"])
    assert result.exit_code == 0, result.output
    quant = json.loads((tmp_path / "o" / "config.json").read_text())["quantization"]
    assert (quant["bits"], quant["group_size"]) == (4, 32)
    assert quant["model.embedding"] == {"group_size": 64, "bits": 8}
    assert quant["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 3}


class _Payload:
    """Unpickling this would run os.system (creating a marker file)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _torch_like_zip(path, payload_bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload_bytes)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


def _hostile(tmp_path, marker):
    return _torch_like_zip(tmp_path / "evil.pt", pickle.dumps({"embedding.weight": _Payload(f"touch {marker}")},
                                                              protocol=2))


def _eval_payload(tmp_path, marker):
    class Evil:
        def __reduce__(self):
            return eval, (f"open({str(marker)!r}, 'w').write('ran')",)
    return _torch_like_zip(tmp_path / "evil.pt", pickle.dumps(Evil(), protocol=2))


def _truncated(tmp_path, good):
    data = (good / "base-model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pt"


def _edited(tmp_path, edit):
    sd = synthetic_dict(BASE, seed=21)
    edit(sd)
    return write(tmp_path / "edited.pt", sd)


CASES = {
    "os.system pickle": lambda tmp, good, marker: _hostile(tmp, marker),
    "eval pickle": lambda tmp, good, marker: _eval_payload(tmp, marker),
    "truncated zip": lambda tmp, good, marker: _truncated(tmp, good),
    "missing tensor": lambda tmp, good, marker: _edited(
        tmp, lambda sd: sd.pop("layers.segment_0.layer_1.attention.qk_norm.key_norm.weight")),
    "wrong shape": lambda tmp, good, marker: _edited(
        tmp, lambda sd: sd.update({"layers.segment_1.layer_0.attention.norm.weight": np.ones(65, np.float32)})),
    "unknown key": lambda tmp, good, marker: _edited(
        tmp, lambda sd: sd.update({"layers.segment_0.layer_0.attention.extra.weight": np.ones(3, np.float32)})),
    "not a checkpoint": lambda tmp, good, marker: _text_file(tmp),
    "untied, different head": lambda tmp, good, marker: _untied(tmp),
}
EXPECTED = {
    "os.system pickle": "refusing to unpickle global (posix|os).system",
    "eval pickle": "refusing to unpickle global builtins.eval",
    "truncated zip": "cut.pt: not a PyTorch zip checkpoint",
    "missing tensor": r"edited.pt \(base\): .*missing tensors 1: layers.segment_0.layer_1.attention.qk_norm.key_norm.weight",
    "wrong shape": r"layers.segment_1.layer_0.attention.norm.weight: shape \(65,\), expected \(64,\)",
    "unknown key": "unknown key layers.segment_0.layer_0.attention.extra.weight",
    "not a checkpoint": "notes.pt: not a PyTorch zip checkpoint",
    "untied, different head": "neither tied",
}


def _text_file(tmp):
    (tmp / "notes.pt").write_text("these are my notes, not weights\n")
    return tmp / "notes.pt"


def _untied(tmp):
    sd = synthetic_dict(BASE, seed=21)
    sd["output_transform.weight"] = sd["embedding.weight"] + np.float32(1e-3)
    save_checkpoint(tmp / "untied.pt", list(sd.items()))
    return tmp / "untied.pt"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_error_and_leaves_nothing(case, good, tmp_path):
    marker = tmp_path / "PWNED"
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = CASES[case](inputs, good, marker)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    result = runner.invoke(app, ["convert", "--base", str(source), "--tokenizer", str(good / "tokenizer.model"),
                                 str(out_parent / "model")])
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    import re
    assert re.search(EXPECTED[case], lines[0]), lines[0]
    assert list(out_parent.iterdir()) == []  # no output directory, no temporary sibling
    assert not marker.exists()  # the payload never ran


def test_missing_source_and_bad_options(tmp_path, good):
    cases = [
        (["convert", str(tmp_path / "nowhere"), str(tmp_path / "o")], "source not found"),
        (["convert", str(tmp_path), str(tmp_path / "o")], "no base checkpoint"),
        (["convert", str(good), str(tmp_path / "o"), "--bits", "5"], "bits must be one of"),
        (["convert", str(good), str(tmp_path / "o"), "--group-size", "16"], "group size must be"),
        (["convert", str(good), str(tmp_path / "o"), "--recipe", "best"], "recipe must be"),
        (["convert", str(good), str(tmp_path / "o"), "--override", "nonsense"], "PATTERN=BITS"),
        (["convert", str(good), str(tmp_path / "o"), "--tokenizer", str(good / "base-model.pt")],
         "not a SentencePiece model"),
    ]
    for argv, message in cases:
        result = runner.invoke(app, argv)
        assert result.exit_code == 1 and message in result.output, (argv, result.output)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr  # one line
        assert not (tmp_path / "o").exists()


def test_help_explains(tmp_path):
    result = runner.invoke(app, ["convert", "--help"])
    assert result.exit_code == 0
    for flag in ("--bits", "--group-size", "--embedding-bits", "--draft-bits", "--recipe", "--force", "--override"):
        assert flag in result.output
