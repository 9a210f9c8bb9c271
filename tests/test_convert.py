"""End to end: toolkit .pt files (genuine torch.save output) -> `convert` -> model directories whose logits equal
the float64 reference forward (tests/reference.py, which reads the toolkit names) on the original weights."""

import json

import mlx.core as mx
import numpy as np
import pytest

from afm_mlx.converters import convert
from afm_mlx.converters.mapping import map_toolkit_state_dict
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.errors import AFMError
from afm_mlx.loading import load_model
from afm_mlx.presets import tiny_base, tiny_draft
from reference import reference_forward
from tokenizer_fixture import build_tiny_tokenizer

torch = pytest.importorskip("torch", reason="fixtures are written with torch.save (torch is a dev dependency)")
torch.set_num_threads(1)

BASE = tiny_base(vocab_size=512)
DRAFT = tiny_draft(vocab_size=512)
TOKENS = np.array([1, 3, 17, 200, 5, 5, 99, 42, 7, 128, 4, 250, 64, 511])


def torch_save(path, state_dict, bf16=()):
    """torch.save a toolkit state dict; output_transform.weight shares the embedding's storage (tied);
    keys containing any of `bf16` are stored as bfloat16."""
    tensors = {}
    for name, value in state_dict.items():
        if name == "output_transform.weight":
            tensors[name] = tensors["embedding.weight"]  # same tensor object -> one storage, as in tamm
            continue
        t = torch.from_numpy(np.array(value))
        tensors[name] = t.to(torch.bfloat16) if any(part in name for part in bf16) else t
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)


def as_read(state_dict, bf16=()):
    """What the converter sees: the bf16-stored tensors rounded to bf16 and back to float32."""
    def rounded(name, value):
        if any(part in name for part in bf16):
            return torch.from_numpy(np.array(value)).to(torch.bfloat16).float().numpy()
        return value
    return {name: rounded(name, value) for name, value in state_dict.items()}


BASE_BF16 = ("norm.weight", "lora_0.a_transpose")  # norms and some LoRA A in bf16; linears stay on the fp32 grid


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory):
    """A toolkit directory: on-grid base (tied, partly bf16), bf16 draft, tiny tokenizer."""
    root = tmp_path_factory.mktemp("toolkit")
    base_sd = synthetic_dict(BASE, seed=11, grid=True)
    draft_sd = synthetic_dict(DRAFT, seed=12, draft=True, kv_quant=False)
    torch_save(root / "assets" / "base-model.pt", base_sd, bf16=BASE_BF16)
    torch_save(root / "assets" / "draft-model.pt", draft_sd, bf16=("",))  # everything bf16
    build_tiny_tokenizer(root / "assets")
    return root, as_read(base_sd, BASE_BF16), as_read(draft_sd, ("",))


@pytest.fixture(scope="module")
def converted(toolkit, tmp_path_factory):
    root, _, _ = toolkit
    out = tmp_path_factory.mktemp("converted") / "afm"
    result = convert(root, out)
    return out, result


def logits_of(model_dir):
    model, config = load_model(model_dir, dtype=mx.float32)
    return np.array(model(mx.array(TOKENS)[None])[0]).astype(np.float64), config


def test_on_grid_base_is_exact_to_fp32(toolkit, converted):
    out, result = converted
    _, base_sd, _ = toolkit
    ours, config = logits_of(out)
    ref = reference_forward(base_sd, TOKENS, BASE.to_dict(), kv_quant=True)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.1  # not a vacuous comparison
    report = json.loads((out / "conversion_report.json").read_text())["base"]
    assert report["tensors_lossy"] == 0 and report["max_abs_error"] == 0.0
    linears = [r for r in report["tensors"] if r["group_size"] and r["name"] != "model.embedding.weight"]
    assert {(r["bits"], r["storage"]) for r in linears} == {(2, "grid")}
    assert config["quantization"]["bits"] == 2 and config["quantization"]["model.embedding"] == {
        "group_size": 32, "bits": 4}


def test_output_directory_layout(converted):
    out, result = converted
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    for model in ("", "draft/"):
        for file in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                     "conversion_report.json"):
            assert model + file in names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left over
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "afm7" and config["kv_quant"] is True and config["rope_theta"] == 500000.0
    special = json.loads((out / "tokenizer_config.json").read_text())
    assert special["eos_id"] == 1 and special["pad_id"] == 0 and special["turn_end_id"] > 2
    assert "all B = 0" in result.report["base"]["lora"] and not (out / "base_adapter").exists()
    assert json.loads((out / "draft" / "config.json").read_text())["kv_quant"] is False


def stored_weights(model_dir):
    """{our name: float64 array} as the directory stores them (quantized modules dequantized by MLX)."""
    config = json.loads((model_dir / "config.json").read_text())
    raw = {}
    for f in model_dir.glob("model*.safetensors"):
        raw.update(mx.load(str(f)))
    quant = config.get("quantization") or {}
    out = {}
    for name, value in raw.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if f"{module}.scales" in raw:
            setting = quant.get(module) or quant
            value = mx.dequantize(value, raw[f"{module}.scales"], raw[f"{module}.biases"],
                                  group_size=setting["group_size"], bits=setting["bits"])
        out[name] = np.array(value.astype(mx.float32)).astype(np.float64)
    return out, config


def check_report_is_honest(model_dir, original_sd, report):
    """Every reported error equals the error of what is stored; returns the state dict as stored (toolkit names)."""
    stored, _ = stored_weights(model_dir)
    mapped = map_toolkit_state_dict(original_sd)
    effective = dict(original_sd)
    for row in report["tensors"]:
        name = row["name"]
        if name.endswith(("quant_key_scale", "quant_value_scale")):
            assert stored[name] == mapped.load(name, original_sd)
            continue
        original = np.asarray(original_sd[row["source"]], dtype=np.float64)
        err = np.abs(stored[name] - original)
        assert err.max() == pytest.approx(row["max_abs_error"], rel=1e-6, abs=1e-12)
        assert row["exact"] == (err.max() == 0)
        rel = np.linalg.norm(stored[name] - original) / np.linalg.norm(original)
        assert rel == pytest.approx(row["relative_error"], rel=1e-4, abs=1e-12)
        effective[row["source"]] = stored[name].astype(np.float32)
    effective["output_transform.weight"] = effective["embedding.weight"]
    return effective


def test_bf16_draft_within_reported_error(toolkit, converted):
    out, result = converted
    _, _, draft_sd = toolkit
    report = json.loads((out / "draft" / "conversion_report.json").read_text())
    effective = check_report_is_honest(out / "draft", draft_sd, report)
    ours, _ = logits_of(out / "draft")
    # the model computes exactly on what is stored ...
    assert np.abs(ours - reference_forward(effective, TOKENS, DRAFT.to_dict(), kv_quant=False)).max() <= 1e-4
    # ... and what is stored is the bf16 original up to the reported error (random weights: 2-bit is lossy)
    assert report["tensors_lossy"] > 0 and 0 < report["max_abs_error"] < 0.1


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64), (16, 64)])
def test_lossy_settings_within_reported_error(tmp_path, bits, group):
    sd = synthetic_dict(BASE, seed=13)  # off-grid weights: every quantized setting loses something
    torch_save(tmp_path / "base-model.pt", sd)
    out = tmp_path / "out"
    result = convert(base=tmp_path / "base-model.pt", out=out, recipe="lossy", bits=bits, group_size=group,
                     embedding_bits=bits, embedding_group_size=group)
    report = result.report["base"]
    effective = check_report_is_honest(out, sd, report)
    ours, _ = logits_of(out)
    assert np.abs(ours - reference_forward(effective, TOKENS, BASE.to_dict())).max() <= 1e-4
    # against the original weights the logits move (by an amount the weight error alone does not bound: the
    # int8 K/V fake-quant can flip a code), but stay in range
    drift = np.abs(ours - reference_forward(sd, TOKENS, BASE.to_dict())).max()
    assert 0 < drift < 0.5
    linears = [r for r in report["tensors"] if len(r["shape"]) == 2]
    assert {r["bits"] for r in linears} == {bits} and not any(r["exact"] for r in linears)


def test_auto_finds_mixed_grids_and_writes_per_module_overrides(tmp_path):
    from afm_mlx.converters.synthetic import grid_tensor

    sd = synthetic_dict(BASE, seed=14, grid=True)
    down = "layers.segment_1.layer_0.feed_forward.output_transform.wrapped.weight"
    sd[down] = grid_tensor(np.random.default_rng(0), sd[down].shape, bits=3, group=32, step=0.005)
    torch_save(tmp_path / "base-model.pt", sd)
    result = convert(base=tmp_path / "base-model.pt", out=tmp_path / "out")
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quant["model.kv_reuse_layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 3}
    assert result.report["base"]["tensors_lossy"] == 0
    ours, _ = logits_of(tmp_path / "out")
    assert np.abs(ours - reference_forward(sd, TOKENS, BASE.to_dict())).max() <= 1e-4


def test_override_and_nonzero_lora_are_written(tmp_path):
    sd = synthetic_dict(BASE, seed=15, grid=True, lora_nonzero=True)
    torch_save(tmp_path / "base-model.pt", sd)
    result = convert(base=tmp_path / "base-model.pt", out=tmp_path / "out", overrides=["model.embedding=8:64"])
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["quantization"]["model.embedding"] == {
        "group_size": 64, "bits": 8}
    adapters = mx.load(str(out / "base_adapter" / "adapters.safetensors"))
    key = "model.layers.1.self_attn.qkv_proj.lora_b.2"
    src = "layers.segment_0.layer_1.attention.qkv_transform.adapters.base_adapter.lora_2.b_transpose"
    assert np.array_equal(np.array(adapters[key]), sd[src]) and "non-zero" in result.report["base"]["lora"]
    assert json.loads((out / "base_adapter" / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 0.5


def test_failure_leaves_nothing_and_existing_output_needs_force(tmp_path, toolkit, monkeypatch):
    import afm_mlx.converters.pipeline as pipeline

    root, _, _ = toolkit
    out = tmp_path / "out"
    calls = {"n": 0}
    real = pipeline.quantize_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise AFMError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_tensor", failing)
    with pytest.raises(AFMError, match="simulated"):
        convert(root, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pipeline, "quantize_tensor", real)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AFMError, match="--force"):
        convert(root, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(root, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_toolkit_files_at_top_level_and_explicit_paths(tmp_path, toolkit):
    root, _, _ = toolkit
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("base-model.pt", "tokenizer.model"):
        (flat / name).symlink_to(root / "assets" / name)
    result = convert(flat, tmp_path / "a")
    assert result.draft is None and not (tmp_path / "a" / "draft").exists()
    result = convert(out=tmp_path / "b", base=root / "assets" / "base-model.pt",
                     draft=root / "assets" / "draft-model.pt")
    assert result.special_tokens is None and (tmp_path / "b" / "draft" / "config.json").exists()


def test_off_grid_float_draft_defaults_to_4_bits_while_the_base_stays_2_bit(tmp_path):
    """A float draft (Apple's is not QAT-trained) is not squeezed to the base's 2 bits unless asked."""
    from afm_mlx.converters import convert
    from afm_mlx.converters.synthetic import synthetic_dict
    from afm_mlx.converters.torch_zip import save_checkpoint
    from afm_mlx.presets import tiny_base, tiny_draft
    from tokenizer_fixture import build_tiny_tokenizer

    base, draft = tiny_base(vocab_size=512, hidden_dim=128), tiny_draft(vocab_size=512, hidden_dim=64)
    save_checkpoint(tmp_path / "base.pt", synthetic_dict(base, seed=1, grid=True).items())
    save_checkpoint(tmp_path / "draft.pt", synthetic_dict(draft, seed=2, draft=True, kv_quant=False).items())
    tok = build_tiny_tokenizer(tmp_path / "tok")
    convert(base=tmp_path / "base.pt", draft=tmp_path / "draft.pt", tokenizer=tok, out=tmp_path / "out")
    base_q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    draft_q = json.loads((tmp_path / "out" / "draft" / "config.json").read_text())["quantization"]
    assert base_q["bits"] == 2 and draft_q["bits"] == 4
    convert(base=tmp_path / "base.pt", draft=tmp_path / "draft.pt", tokenizer=tok, out=tmp_path / "out2",
            draft_bits=2)
    assert json.loads((tmp_path / "out2" / "draft" / "config.json").read_text())["quantization"]["bits"] == 2
