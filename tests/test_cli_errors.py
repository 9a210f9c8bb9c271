"""Every bad input to the CLI ends in one stderr line and a documented exit code, never a traceback.

Exit 1 with `error: ...` for bad files and values; exit 2 with `error: ... (see `afm-mlx CMD --help`)` for usage
errors that click finds while parsing the command line (afm_mlx.cli._OneLineErrors).
"""

import pytest
from typer.testing import CliRunner

from afm_mlx.cli import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["generate", "hi", "--temp", "hot"], "--temp"),
    (["generate", "hi", "-n", "abc"], "--max-tokens"),
    (["generate", "hi", "--bogus"], "--bogus"),
    (["info", "--lora-rank", "x"], "--lora-rank"),
    (["convert", "a", "b", "c"], "[TOOLKIT_DIR] OUT_DIR"),
])
def test_usage_errors_are_one_line_with_exit_2(args, fragment):
    assert_one_line(run(*args), 2, fragment, "--help`")


def test_non_utf8_prompt_system_and_stdin(tmp_path):
    # Python hands undecodable argv / stdin bytes over as lone surrogates (surrogateescape).
    assert_one_line(run("generate", "hi \udcff", "-n", 1), 1, "not valid UTF-8")
    assert_one_line(run("generate", "hi", "--system", "sys \udcfe", "-n", 1), 1, "not valid UTF-8")
    assert_one_line(run("generate", "--raw", "x\udcff", "-n", 1), 1, "not valid UTF-8")
    result = run("generate", "-n", 1, input=b"hi \xff\n")  # a strict UTF-8 stdin raises UnicodeDecodeError
    assert_one_line(result, 1, "utf-8")


def test_os_errors_from_device_files():
    # /proc/self/mem is a "regular file" that fails on read: an OSError, not an AFMError.
    assert_one_line(run("generate", "hi", "--adapter", "/proc/self/mem", "-n", 1), 1, "Input/output error")
    assert_one_line(run("export-adapter", "/proc/self/mem", "-o", "/nonexistent-dir", "-n", "a"), 1,
                    "Input/output error")


def test_unexpected_exceptions_keep_their_traceback(monkeypatch):
    import afm_mlx.report

    def broken(*_args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(afm_mlx.report, "presets_table", broken)
    result = run("info")
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a one-line "error:"


def test_permission_errors_are_one_line(monkeypatch, tmp_path):
    # Tests run as root here, so chmod cannot make a file unreadable: the read itself is made to fail.
    import afm_mlx.loading

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(afm_mlx.loading, "read_weights", denied)
    assert_one_line(run("generate", "hi", "-n", 1), 1, "Permission denied")


def test_warnings_are_one_line(monkeypatch):
    import warnings

    import afm_mlx.report

    monkeypatch.setattr(afm_mlx.report, "presets_table", lambda *a: warnings.warn("careful:\n  two lines"))
    result = run("info")
    assert result.exit_code == 0 and result.stderr.strip() == "warning: careful: two lines"
