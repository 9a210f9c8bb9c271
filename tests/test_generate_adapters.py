"""Adapters picked per generation call (API), by `--adapter` (generate) and switched in a chat (`/adapter`)."""

import json

import pytest
from typer.testing import CliRunner

from afm_mlx.adapters import active_adapter, load_adapter
from afm_mlx.cli import app
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.generation import PromptCache, generate
from afm_mlx.tokenizer import load_tokenizer
from adapter_fixtures import toolkit_lora
from generation_fixtures import base_model
from tokenizer_fixture import build_tiny_tokenizer

PROMPT = "Tell me a story"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model dir with its tokenizer, and two strong toolkit adapters (.pt) for it."""
    root = tmp_path_factory.mktemp("gen_adapters")
    build_tiny_tokenizer(root / "tok")
    tokenizer = load_tokenizer(root / "tok")
    model = base_model(vocab_size=tokenizer.vocab_size, seed=4)
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(model.args.to_dict()))
    model.save_weights(str(model_dir / "model.safetensors"))
    (model_dir / "tokenizer.model").write_bytes((root / "tok" / "tokenizer.model").read_bytes())
    adapters = {}
    for name, seed in [("a", 11), ("b", 12)]:
        adapters[name] = root / f"{name}.pt"
        save_checkpoint(adapters[name], toolkit_lora(model.args, seed, rank=4, gain=400.0).items())
    return model, tokenizer, model_dir, adapters


def test_adapter_is_picked_per_call_and_restored(setup):
    model, tokenizer, _, paths = setup
    for name, path in paths.items():
        load_adapter(model, path, name=name)
    try:
        bare = generate(model, tokenizer, PROMPT, max_tokens=12, draft_model=False).tokens
        with_a = generate(model, tokenizer, PROMPT, max_tokens=12, adapter="a", draft_model=False).tokens
        with_b = generate(model, tokenizer, PROMPT, max_tokens=12, adapter="b", draft_model=False).tokens
        assert active_adapter(model) is None  # restored after each call
        assert len({tuple(bare), tuple(with_a), tuple(with_b)}) == 3  # the adapters really change the output
        assert generate(model, tokenizer, PROMPT, max_tokens=12, adapter="a", draft_model=False).tokens == with_a
    finally:
        from afm_mlx.adapters import unload_adapter
        for name in paths:
            unload_adapter(model, name)


def test_prompt_cache_is_not_reused_across_adapters(setup):
    model, tokenizer, _, paths = setup
    load_adapter(model, paths["a"], name="cache-a")
    try:
        cache = PromptCache(model)
        bare = generate(model, tokenizer, PROMPT, max_tokens=8, prompt_cache=cache, draft_model=False)
        adapted = generate(model, tokenizer, PROMPT, max_tokens=8, prompt_cache=cache, adapter="cache-a",
                           draft_model=False)
        assert adapted.stats.cached_prompt_tokens == 0  # K/V computed without the adapter are not reused
        fresh = generate(model, tokenizer, PROMPT, max_tokens=8, adapter="cache-a", draft_model=False)
        assert adapted.tokens == fresh.tokens != bare.tokens
    finally:
        from afm_mlx.adapters import unload_adapter
        unload_adapter(model, "cache-a")


def test_generate_cli_takes_an_adapter(setup):
    _, _, model_dir, paths = setup
    runner = CliRunner()
    plain = runner.invoke(app, ["generate", PROMPT, "--model", str(model_dir), "-n", "12"])
    adapted = runner.invoke(app, ["generate", PROMPT, "--model", str(model_dir), "-n", "12",
                                  "--adapter", str(paths["a"])])
    assert plain.exit_code == 0 and adapted.exit_code == 0, adapted.output
    assert plain.stdout != adapted.stdout
    missing = runner.invoke(app, ["generate", PROMPT, "--model", str(model_dir), "--adapter", "nope.pt"])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.output


def test_chat_switches_adapters_without_reloading(setup):
    _, _, model_dir, paths = setup
    runner = CliRunner()
    turns = f"{PROMPT}\n/adapter none\n{PROMPT}\n/adapter b\n/reset\n{PROMPT}\n/adapter zzz\n"
    result = runner.invoke(app, ["chat", "--model", str(model_dir), "-n", "8", "--adapter", f"a={paths['a']}",
                                 "--adapter", f"b={paths['b']}"], input=turns)
    assert result.exit_code == 0, result.output
    assert "adapter: none (loaded: a, b)" in result.stderr and "adapter: b (loaded: a, b)" in result.stderr
    assert "error: " in result.stderr and "zzz" in result.stderr  # an unknown name is reported, the chat goes on
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) == 3 and replies[0] != replies[2]  # adapter a, then b after /reset: different replies
