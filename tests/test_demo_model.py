"""The shipped demo family (afm_mlx/demo_model/, built by benchmarks/demo/build_demo.py): its files, that the
default `afm_mlx.load()` gives it, that generation is deterministic, and that speculative decoding with its draft
reproduces plain greedy decoding token for token."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import afm_mlx

DEMO = Path(afm_mlx.__file__).parent / "demo_model"
pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built in this checkout")

PROMPTS = [("It is a truth universally acknowledged", True), ("Tell me about Mr. Darcy.", False)]


@pytest.fixture(scope="module")
def family():
    return afm_mlx.load(draft=True)


def test_files_are_a_2bit_base_a_float_draft_and_fit_the_budget():
    base = json.loads((DEMO / "config.json").read_text())
    draft = json.loads((DEMO / "draft" / "config.json").read_text())
    assert base["quantization"]["bits"] == 2 and base["quantization"]["group_size"] == 128
    assert base["quantization"]["model.embedding"] == {"group_size": 32, "bits": 4}
    assert base["num_kv_reuse_layers"] > 0 and base["num_kv_heads"] < base["num_heads"] and base["kv_quant"]
    assert draft["num_kv_reuse_layers"] == 0 and draft["vocab_size"] == base["vocab_size"]
    report = json.loads((DEMO / "conversion_report.json").read_text())
    assert report["base"]["tensors_lossy"] == 0 and report["draft"]["tensors_lossy"] == 0  # exact grids / fp16
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 30e6


def test_tokenizer_has_the_toolkit_specials(family):
    _, tok = family
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    for piece in ("<turn_start>", "<turn_end>", "<n>", "<executable_start>", "<executable_end>"):
        assert tok.sp.piece_to_id(piece) > 2
    assert tok.decode(tok.encode("One.\nTwo.")) == "One.\nTwo."


@pytest.mark.parametrize("prompt,raw", PROMPTS)
def test_greedy_is_deterministic_readable_and_speculative_equals_plain(family, prompt, raw):
    model, tok = family
    assert model.draft is not None
    plain = afm_mlx.generate(model, tok, prompt, raw=raw, max_tokens=32, temperature=0.0, draft_model=False)
    again = afm_mlx.generate(model, tok, prompt, raw=raw, max_tokens=32, temperature=0.0, draft_model=False)
    spec = afm_mlx.generate(model, tok, prompt, raw=raw, max_tokens=32, temperature=0.0, num_draft_tokens=4)
    assert plain.tokens == again.tokens
    assert spec.tokens == plain.tokens and spec.text == plain.text
    words = re.findall(r"[A-Za-z]+", plain.text)
    assert len(words) >= 8 and sum(len(w) for w in words) >= 0.6 * len(plain.text.replace(" ", ""))


def test_sampling_with_a_seed_is_reproducible(family):
    model, tok = family
    runs = [afm_mlx.generate(model, tok, "Tell me a story.", max_tokens=24, temperature=0.7, seed=3).tokens
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_load_attaches_the_draft_by_default_as_the_cli_does():
    model, _ = afm_mlx.load()
    assert model.draft is not None and model.draft.args.vocab_size == model.args.vocab_size
    assert afm_mlx.load(draft=False)[0].draft is None


# ---- family v2 (issue #15): AFM's proportions. It missed the perplexity bar, so v1 stays embedded and v2 is
# built into benchmarks/demo/work/v2/demo_model by `build_demo.py --family v2`; these tests run where it exists.

V2 = Path(__file__).resolve().parent.parent / "benchmarks" / "demo" / "work" / "v2" / "demo_model"
needs_v2 = pytest.mark.skipif(not (V2 / "draft" / "config.json").exists(), reason="demo family v2 not built here")


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def family_v2():
    return afm_mlx.load(V2, draft=True)


@needs_v2
def test_v2_has_afm_proportions_and_a_quantized_draft():
    """>= 16 layers with regular : KV-reuse at AFM's ~5:3, 2-bit base; a QAT draft of <= 4 bits with <= 1/4 of the
    base's layers and <= 10% of its weight bytes; every tensor on an exact grid; <= 30 MB in all."""
    base = json.loads((V2 / "config.json").read_text())
    draft = json.loads((V2 / "draft" / "config.json").read_text())
    regular = base["num_layers"] - base["num_kv_reuse_layers"]
    assert base["num_layers"] >= 16 and regular / base["num_kv_reuse_layers"] == pytest.approx(5 / 3, rel=0.1)
    assert base["quantization"]["bits"] == 2 and base["quantization"]["model.embedding"] == {"group_size": 32, "bits": 4}
    assert draft["num_layers"] * 4 <= base["num_layers"] and draft["quantization"]["bits"] <= 4
    assert weight_bytes(V2 / "draft") <= 0.10 * weight_bytes(V2)
    report = json.loads((V2 / "conversion_report.json").read_text())
    assert report["base"]["tensors_lossy"] == 0 and report["draft"]["tensors_lossy"] == 0
    assert sum(f.stat().st_size for f in V2.rglob("*") if f.is_file()) <= 30e6


@needs_v2
@pytest.mark.parametrize("k", [1, 2, 4, 6])
@pytest.mark.parametrize("prompt,raw", PROMPTS)
def test_v2_speculative_greedy_equals_plain_greedy(family_v2, prompt, raw, k):
    model, tok = family_v2
    plain = afm_mlx.generate(model, tok, prompt, raw=raw, max_tokens=32, temperature=0.0, draft_model=False)
    spec = afm_mlx.generate(model, tok, prompt, raw=raw, max_tokens=32, temperature=0.0, num_draft_tokens=k)
    assert spec.tokens == plain.tokens and spec.text == plain.text
