"""Outputs whole or not at all, only where asked (issue #16 section 3): adapter export names, failed and
interrupted writes, concurrent conversions to one OUT, leftovers of killed runs."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapter_fixtures import toolkit_lora
from afm_mlx.adapters import export_adapter
from afm_mlx.cli import app
from afm_mlx.converters import adapter_formats, output, pipeline
from afm_mlx.converters.pipeline import convert
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.errors import AFMError
from afm_mlx.presets import tiny_base
from tokenizer_fixture import build_tiny_tokenizer

ARGS = tiny_base()
BASE = tiny_base(vocab_size=512)


@pytest.fixture(scope="module")
def adapter_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "adapter-final.pt"
    save_checkpoint(path, toolkit_lora(ARGS, seed=5, rank=8).items())
    model = path.parent / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(ARGS.to_dict()))
    return path


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolkit")
    save_checkpoint(root / "base-model.pt", list(synthetic_dict(BASE, seed=21, grid=True).items()),
                    tie={"output_transform.weight": "embedding.weight"})
    build_tiny_tokenizer(root)
    return root


def entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- export-adapter: names and failed writes


@pytest.mark.parametrize("to", ["fmadapter", "pt", "mlx-lm"])
@pytest.mark.parametrize("name", ["../X", "a/b", "..", ".hidden", ""])
def test_export_names_cannot_leave_the_output_dir(adapter_pt, tmp_path, to, name):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export-adapter", str(adapter_pt), "-o", str(out), "-n", name, "--to", to,
                                      "--model", str(adapter_pt.parent / "model")])
    assert result.exit_code == 1 and result.output.startswith("error: invalid adapter name"), result.output
    assert result.output.count("\n") == 1
    assert entries(tmp_path) == []  # neither X, X.pt nor -o itself


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("to, writer", [("mlx-lm", "mlx_save"), ("fmadapter", "write_mil_blob"),
                                        ("pt", "_write_tensor_data")])
def test_failed_export_leaves_nothing(adapter_pt, tmp_path, monkeypatch, to, writer):
    # the disk fills up after part of the file is written: no temporary file, no -o, no parents of -o
    import mlx.core as mx

    from afm_mlx.converters import torch_zip

    def partial_then_full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        _disk_full()

    target = {"mlx_save": (mx, "save_safetensors"), "write_mil_blob": (adapter_formats, "write_mil_blob"),
              "_write_tensor_data": (torch_zip, "_write_tensor_data")}[writer]
    monkeypatch.setattr(*target, partial_then_full if writer != "_write_tensor_data" else _disk_full)
    (tmp_path / "keep").mkdir()
    with pytest.raises(OSError, match="No space left"):
        export_adapter(adapter_pt, tmp_path / "new" / "out", "a", model=adapter_pt.parent / "model", to=to)
    assert entries(tmp_path) == ["keep"]


def test_overwrite_replaces_a_whole_mlx_lm_dir(adapter_pt, tmp_path):
    model = adapter_pt.parent / "model"
    export_adapter(adapter_pt, tmp_path, "a", model=model, to="mlx-lm")
    (tmp_path / "a" / "stray.txt").write_text("old")
    with pytest.raises(AFMError, match="exists"):
        export_adapter(adapter_pt, tmp_path, "a", model=model, to="mlx-lm")
    export_adapter(adapter_pt, tmp_path, "a", model=model, to="mlx-lm", overwrite=True)
    assert entries(tmp_path / "a") == ["adapter_config.json", "adapters.safetensors"]
    assert entries(tmp_path) == ["a"]


def test_pt_export_removes_a_killed_exports_temporary_file(adapter_pt, tmp_path):
    (tmp_path / f".a.pt.tmp-{_dead_pid()}").write_bytes(b"partial")
    export_adapter(adapter_pt, tmp_path, "a", model=adapter_pt.parent / "model", to="pt")
    assert entries(tmp_path) == ["a.pt"]


# ---- convert: failures, concurrent runs, leftovers


def test_failed_convert_leaves_no_new_parents(toolkit, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AFMError, match="not a PyTorch zip checkpoint"):
        convert(base=tmp_path / "bad.pt", out=tmp_path / "a" / "b" / "out")
    assert entries(tmp_path) == ["bad.pt"]


def test_concurrent_converts_to_one_out_the_second_fails_cleanly(toolkit, tmp_path, monkeypatch):
    # run B starts after run A's existence check and finishes first: A must fail at its rename, not replace B
    out = tmp_path / "out"
    real = pipeline._convert_into
    other_runs = []

    def racing(tmp, *args):
        result = real(tmp, *args)
        if not other_runs:
            other_runs.append("started")
            other_runs.append(convert(toolkit, out))
        return result

    monkeypatch.setattr(pipeline, "_convert_into", racing)
    with pytest.raises(AFMError, match="already exists"):
        convert(toolkit, out)
    assert len(other_runs) == 2 and json.loads((out / "config.json").read_text())["model_type"] == "afm7"
    assert entries(tmp_path) == ["out"]  # no staging folder of either run


def test_concurrent_pt_exports_the_second_fails_cleanly(adapter_pt, tmp_path, monkeypatch):
    from afm_mlx.converters import torch_zip

    model, real, other_runs = adapter_pt.parent / "model", torch_zip._write_archive, []

    def racing(*args):
        real(*args)
        if not other_runs:  # the other run starts after this one's existence check and finishes first
            other_runs.append("started")
            other_runs.append(export_adapter(adapter_pt, tmp_path, "a", model=model, to="pt"))

    monkeypatch.setattr(torch_zip, "_write_archive", racing)
    with pytest.raises(AFMError, match="already exists"):
        export_adapter(adapter_pt, tmp_path, "a", model=model, to="pt")
    assert entries(tmp_path) == ["a.pt"] and (tmp_path / "a.pt").stat().st_size > 0


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_convert_removes_leftovers_of_dead_runs_only(toolkit, tmp_path):
    dead, host = _dead_pid(), output._HOST
    leftovers = {f".out.converting-{dead}": False,  # as earlier versions named it
                 f".out.converting-{dead}@{host}-abc123": False, f".out.replaced-{dead}@{host}-x_9": False,
                 f".out.converting-{dead}@another-host-abc123": True,  # that host's process may be alive
                 f".out.converting-{sys.modules['os'].getpid()}@{host}-live": True,  # alive: this process
                 f".other.converting-{dead}": True}  # not this output's
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    convert(toolkit, tmp_path / "out")
    assert entries(tmp_path) == sorted(["out", *(n for n, kept in leftovers.items() if kept)])


_SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from afm_mlx.converters import convert
    convert(sys.argv[1], sys.argv[2], progress=lambda *args: time.sleep(1.0))
""")


def _start_slow_convert(toolkit, out: Path, sighup) -> subprocess.Popen:
    """A convert in a child whose SIGHUP disposition is `sighup`: set explicitly, because a child inherits an
    ignored SIGHUP (a suite run under nohup) and the converter rightly leaves such a choice alone."""
    return subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(toolkit), str(out)], stderr=subprocess.PIPE,
                            preexec_fn=lambda: [signal.signal(s, h) for s, h in
                                                ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGHUP, sighup))])


def _signal_once_staging(root: Path, process: subprocess.Popen, signum: int) -> None:
    deadline = time.monotonic() + 60
    while not ((root / "new").exists() and any(p.name.startswith(".out.converting-")
                                               for p in (root / "new").iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.05)
    process.send_signal(signum)


def test_sigterm_and_sighup_during_convert_leave_nothing(toolkit, tmp_path):
    runs = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        root = tmp_path / signum.name
        root.mkdir()
        runs[signum] = (root, _start_slow_convert(toolkit, root / "new" / "out", signal.SIG_DFL))
    for signum, (root, process) in runs.items():
        _signal_once_staging(root, process, signum)
    for signum, (root, process) in runs.items():
        assert process.wait(timeout=60) == 128 + signum, process.stderr.read().decode()[-2000:]
        assert entries(root) == []  # no staging folder, no OUT, no parent made for it


def test_convert_under_nohup_ignores_sighup_and_finishes(toolkit, tmp_path):
    process = _start_slow_convert(toolkit, tmp_path / "new" / "out", signal.SIG_IGN)
    _signal_once_staging(tmp_path, process, signal.SIGHUP)
    assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    assert entries(tmp_path / "new") == ["out"]
