"""`afm-mlx generate` and `afm-mlx chat` end to end on a tiny model directory, and every bad-input case."""

import json

import pytest
from typer.testing import CliRunner

import afm_mlx.loading
from afm_mlx.cli import app
from afm_mlx.errors import AFMError
from afm_mlx.frontend import read_prompt
from afm_mlx.tokenizer import load_tokenizer
from generation_fixtures import base_model, draft_model, noisy_copy
from tokenizer_fixture import build_tiny_tokenizer

runner = CliRunner()


def write_model_dir(path, model, tokenizer_dir=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.args.to_dict()))
    model.save_weights(str(path / "model.safetensors"))
    if tokenizer_dir is not None:
        (path / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """MODEL/ (base + tokenizer) with MODEL/draft/, plus a draft over another vocabulary next to it."""
    root = tmp_path_factory.mktemp("cli")
    build_tiny_tokenizer(root / "tok")
    vocab = load_tokenizer(root / "tok").vocab_size
    base = base_model(vocab_size=vocab, seed=4)
    write_model_dir(root / "model", base, root / "tok")
    write_model_dir(root / "model" / "draft", noisy_copy(base))
    write_model_dir(root / "wrong_draft", draft_model(vocab_size=vocab - 8))
    return root / "model"


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, message):
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_generate_streams_text_and_stats(model_dir):
    result = run("generate", "Hello there", "--model", model_dir, "--max-tokens", 12, "--stats")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert "generated: " in result.stderr and "accepted" in result.stderr  # MODEL/draft used by default
    plain = run("generate", "Hello there", "--model", model_dir, "--max-tokens", 12, "--no-draft", "--stats")
    assert plain.exit_code == 0 and plain.stdout == result.stdout  # greedy: the draft changes nothing
    assert "accepted" not in plain.stderr


def test_generate_reads_stdin_and_takes_sampling_flags(model_dir):
    args = ["generate", "--model", model_dir, "-n", 10, "--temp", 0.8, "--top-k", 40, "--top-p", 0.9,
            "--min-p", 0.02, "--seed", 3, "--num-draft-tokens", 2, "--system", "Be brief."]
    a = run(*args, input="Hello there\n")
    b = run(*args[:1], "Hello there", *args[1:])
    assert a.exit_code == 0 and a.stdout == b.stdout
    raw = run("generate", "--model", model_dir, "--raw", "-n", 5, "--draft", model_dir / "draft", "Once upon")
    assert raw.exit_code == 0


def test_chat_keeps_the_cache_across_turns(model_dir):
    result = run("chat", "--model", model_dir, "-n", 6, "--stats", input="Hello!\nTell me more.\n/reset\nHi\n")
    assert result.exit_code == 0, result.output
    reused = [int(line.split("(")[1].split()[0]) for line in result.stderr.splitlines() if line.startswith("prompt:")]
    assert len(reused) == 3 and reused[0] == 0 and reused[1] > 20  # turn 2 prefills only its own tokens
    assert reused[2] > 0  # after /reset the system prompt is still reused


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "the prompt is empty"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "Hello " * 40, "--max-context", 32], "context limit of 32"),
    (["generate", "Hi", "--temp", -1], "temperature must be >= 0"),
    (["generate", "Hi", "--top-p", 0], "top_p must be in (0, 1]"),
    (["generate", "Hi", "--top-p", 1.5], "top_p must be in (0, 1]"),
    (["generate", "Hi", "--max-tokens", 0], "max_tokens"),
    (["generate", "Hi", "--num-draft-tokens", 0], "num_draft_tokens"),
    (["generate", "Hi", "-k", 1000000], "num_draft_tokens must be at most 32"),
    (["generate", "Hi", "--draft", "WRONG"], "vocabulary"),
    (["generate", "Hi", "--draft", "MISSING"], "draft directory not found"),
    (["generate", "Hi", "--draft", "DRAFT", "--no-draft"], "exclude each other"),
    (["chat", "--temp", -2], "temperature"),
])
def test_bad_input_gives_one_line_errors(model_dir, args, message):
    paths = {"WRONG": model_dir.parent / "wrong_draft", "MISSING": model_dir / "nope", "DRAFT": model_dir / "draft"}
    args = [paths.get(a, a) for a in args]
    assert_one_line_error(run(*args, "--model", model_dir), message)


def test_bad_model_directories(model_dir, tmp_path, monkeypatch):
    assert_one_line_error(run("generate", "Hi", "--model", tmp_path / "absent"), "model directory not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("generate", "Hi", "--model", tmp_path / "empty"), "config.json is missing")
    monkeypatch.setattr(afm_mlx.loading, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    assert_one_line_error(run("generate", "Hi"), "demo model is not installed")


def test_missing_prompt(model_dir):
    assert_one_line_error(run("generate", "--model", model_dir, input=""), "the prompt is empty")

    class Terminal:
        def isatty(self):
            return True

    with pytest.raises(AFMError, match="no prompt"):
        read_prompt(None, Terminal())  # nothing piped in: the CLI refuses to wait for a terminal


def test_help_explains_the_default_temperature():
    result = run("generate", "--help")
    assert result.exit_code == 0 and "greedy" in result.stdout and "--no-draft" in result.stdout
