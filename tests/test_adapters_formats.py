"""Adapter files: .fmadapter round trip and byte layout, parameter counts, and one-line errors for bad files."""

import json
import struct

import numpy as np
import pytest

from adapter_fixtures import SIGNATURE, fmadapter_tensors, toolkit_lora, write_test_fmadapter
from afm_mlx.adapters import export_fmadapter, load_adapter, runtime_lora_shapes
from afm_mlx.converters.adapter_formats import (
    AdapterWeights,
    fmadapter_blob_size,
    import_fmadapter_draft,
    lora_layout,
    lora_parameter_count,
    read_adapter,
    read_fmadapter,
    read_mil_blob,
    read_toolkit_adapter,
    to_half_split,
    to_interleaved,
    write_fmadapter,
    write_mlx_adapter,
    write_toolkit_adapter,
)
from afm_mlx.converters.synthetic import synthetic_dict
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.errors import AFMError
from afm_mlx.presets import BASE_3B, count_parameters, tiny_base

ARGS = tiny_base()
RANK = 8


@pytest.fixture(scope="module")
def lora():
    return toolkit_lora(ARGS, seed=5, rank=RANK)


@pytest.fixture(scope="module")
def pt(tmp_path_factory, lora):
    path = tmp_path_factory.mktemp("pt") / "adapter-final.pt"
    save_checkpoint(path, lora.items())
    return path


@pytest.fixture
def fm(tmp_path, lora):
    return write_test_fmadapter(lora, ARGS, tmp_path / "chat.fmadapter", RANK)


def one_line_error(call, match):
    with pytest.raises(AFMError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


# ---- counts (no allocation) ----


def test_full_3b_counts():
    assert count_parameters(BASE_3B, lora_rank=32) == 3_178_001_792
    assert lora_parameter_count(BASE_3B, 32) == 66_633_728
    assert len(lora_layout(BASE_3B, 32)) == 700
    shapes = runtime_lora_shapes(BASE_3B, 32)  # what the LoRA wrappers would allocate
    assert len(shapes) == 35 * 5 + 21 * 5  # wrapped projections; tamm's 350 LoRA modules count Q, K, V apart
    assert sum(a[1] // 32 for a, _ in shapes.values()) == 350  # one r-wide A per LoRA module
    assert sum(a[0] * a[1] + 32 * b[1] for a, b in shapes.values()) == 66_633_728  # A + the B blocks
    # the fused Q|K|V B is block-diagonal [96, 2048 + 256 + 256]: its zero blocks are allocated too
    zero_blocks = 35 * (96 - 32) * (2048 + 2 * 256)
    assert sum(int(np.prod(a)) + int(np.prod(b)) for a, b in shapes.values()) == 66_633_728 + zero_blocks
    assert fmadapter_blob_size(BASE_3B, 32) == 133_312_320  # "~133 MB" (docs/format.md 3.4)


def test_layout_follows_state_dict_order():
    names = [k for k in synthetic_dict(ARGS, lora_rank=RANK) if ".adapters." in k]
    assert [s.toolkit_key for s in lora_layout(ARGS, RANK)] == names


# ---- .fmadapter ----


def test_qk_permutation_is_evens_then_odds_per_head():
    rows = np.arange(8, dtype=np.float32)[:, None]  # 2 heads of head dim 4
    assert to_half_split(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    assert np.array_equal(to_interleaved(to_half_split(x, 4), 4), x)


def test_fmadapter_reads_back_the_fp16_checkpoint(fm, lora):
    adapter = read_fmadapter(fm, ARGS)
    assert adapter.rank == RANK and adapter.scale == 0.5 and adapter.metadata["baseModelSignature"] == SIGNATURE
    by_key = {s.toolkit_key: s.name for s in lora_layout(ARGS, RANK)}
    assert len(adapter.tensors) == len(lora)
    for key, tensor in lora.items():
        assert np.array_equal(adapter.tensors[by_key[key]], tensor.astype(np.float16).astype(np.float32)), key


def test_exporter_writes_the_toolkit_bytes_and_metadata(pt, lora, tmp_path):
    adapter = read_toolkit_adapter(pt)
    out = write_fmadapter(adapter, tmp_path, "chat", ARGS)
    assert out == tmp_path / "chat.fmadapter"
    theirs = write_test_fmadapter(lora, ARGS, tmp_path / "ref" / "chat.fmadapter", RANK)
    assert (out / "adapter_weights.bin").read_bytes() == (theirs / "adapter_weights.bin").read_bytes()
    meta = (out / "metadata.json").read_text()
    assert meta == json.dumps(json.loads((theirs / "metadata.json").read_text()), sort_keys=True, indent=4)
    assert list(json.loads(meta)) == ["adapterIdentifier", "author", "baseModelSignature", "creatorDefined",
                                      "description", "license", "loraRank", "speculativeDecodingDraftTokenCount"]
    assert json.loads(meta)["adapterIdentifier"] == "fmadapter-chat-9799725"


def test_round_trip_from_a_loaded_model_is_identical(pt, tmp_path):
    from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights

    model = mlx_model_from_toolkit(toolkit_weights(ARGS, seed=1, lora=False))
    load_adapter(model, pt, name="a", activate=True)
    first = export_fmadapter(model, tmp_path / "1", "a", author="me", description="test adapter")
    again = read_fmadapter(first, ARGS)
    second = export_fmadapter(again, tmp_path / "2", "a", args=ARGS, author="me", description="test adapter")
    assert (first / "adapter_weights.bin").read_bytes() == (second / "adapter_weights.bin").read_bytes()
    assert (first / "metadata.json").read_text() == (second / "metadata.json").read_text()
    halves = {n: t.astype(np.float16).astype(np.float32) for n, t in read_toolkit_adapter(pt).tensors.items()}
    assert all(np.array_equal(again.tensors[n], t) for n, t in halves.items())
    one_line_error(lambda: export_fmadapter(model, tmp_path / "1", "a"), "exists")


def test_scale_is_folded_into_b_on_export(pt, tmp_path):
    adapter = read_toolkit_adapter(pt)
    doubled = AdapterWeights({n: t.copy() for n, t in adapter.tensors.items()}, RANK, 1.0, "memory", "x")
    back = read_fmadapter(write_fmadapter(doubled, tmp_path, "s", ARGS), ARGS)
    name = "model.layers.0.mlp.down_proj.lora_b"
    np.testing.assert_array_equal(back.tensors[name], (2 * adapter.tensors[name]).astype(np.float16))


def test_other_writers_round_trip(pt, tmp_path):
    adapter = read_toolkit_adapter(pt)
    write_mlx_adapter(adapter, tmp_path / "mlx", ARGS)
    write_toolkit_adapter(adapter, tmp_path / "again.pt")
    for path in (tmp_path / "mlx", tmp_path / "again.pt"):
        other = read_adapter(path, ARGS)
        assert other.rank == RANK and other.scale == 0.5
        assert all(np.array_equal(other.tensors[n], t) for n, t in adapter.tensors.items())


def test_embedded_draft_is_recognised_but_not_importable(lora, tmp_path):
    path = write_test_fmadapter(lora, ARGS, tmp_path / "d.fmadapter", RANK, draft=True)
    assert read_fmadapter(path, ARGS).draft_files == ["draft.mil", "draft_weights.bin"]
    one_line_error(lambda: import_fmadapter_draft(path), "weights_spec yaml")
    one_line_error(lambda: import_fmadapter_draft(tmp_path), "embeds no draft")


# ---- bad files ----


def test_wrong_sentinel(fm):
    blob = fm / "adapter_weights.bin"
    data = bytearray(blob.read_bytes())
    data[64:68] = struct.pack("<I", 0xCAFEF00D)
    blob.write_bytes(bytes(data))
    one_line_error(lambda: read_fmadapter(fm, ARGS), "sentinel 0xcafef00d")


def test_truncated_blob(fm):
    blob = fm / "adapter_weights.bin"
    blob.write_bytes(blob.read_bytes()[:-100])
    one_line_error(lambda: read_fmadapter(fm, ARGS), "truncated")
    blob.write_bytes(b"\0" * 10)
    one_line_error(lambda: read_fmadapter(fm, ARGS), "too short")


def test_wrong_rank_in_metadata(lora, tmp_path):
    path = write_test_fmadapter(lora, ARGS, tmp_path / "r.fmadapter", RANK, lora_rank=4)
    one_line_error(lambda: read_fmadapter(path, ARGS), "rank 8, but metadata.json says loraRank 4")


def test_fmadapter_for_another_base(tmp_path):
    other = tiny_base(num_layers=6, num_kv_reuse_layers=2)
    path = write_test_fmadapter(toolkit_lora(other, 5, RANK), other, tmp_path / "o.fmadapter", RANK)
    one_line_error(lambda: read_fmadapter(path, ARGS), "holds 76 tensors.*has 48")


def test_other_base_signature(lora, tmp_path):
    path = write_test_fmadapter(lora, ARGS, tmp_path / "s.fmadapter", RANK, signature="0123456789" * 4)
    one_line_error(lambda: read_fmadapter(path, ARGS), "exported for base model 0123456")
    with pytest.warns(UserWarning, match="0123456"):
        assert read_fmadapter(path, ARGS, allow_signature_mismatch=True).rank == RANK


def test_wrong_shapes(tmp_path):
    narrow = tiny_base(hidden_dim=32)
    path = tmp_path / "narrow.pt"
    save_checkpoint(path, toolkit_lora(narrow, 5, RANK).items())
    one_line_error(lambda: read_adapter(path, ARGS), r"has shape \(32, 8\), this base .* needs \(64, 8\)")


def test_mixed_ranks_and_incomplete_modules(lora, tmp_path):
    items = dict(lora)
    key = next(k for k in items if k.endswith("output_transform.adapters.base_adapter.a_transpose"))
    bad = {**items, key: items[key][:, :4]}
    save_checkpoint(tmp_path / "mixed.pt", bad.items())
    one_line_error(lambda: read_adapter(tmp_path / "mixed.pt", ARGS), "mixed LoRA ranks")
    del items[key.replace("a_transpose", "b_transpose")]
    save_checkpoint(tmp_path / "part.pt", items.items())
    one_line_error(lambda: read_adapter(tmp_path / "part.pt", ARGS), "incomplete LoRA module")


def test_not_an_adapter(tmp_path):
    save_checkpoint(tmp_path / "base.pt", synthetic_dict(ARGS, lora=False).items())
    one_line_error(lambda: read_adapter(tmp_path / "base.pt", ARGS), "not an adapter checkpoint")
    one_line_error(lambda: read_adapter(tmp_path / "nope", ARGS), "adapter not found")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: read_adapter(tmp_path / "empty", ARGS), "not an adapter")


def test_mlx_lm_config_mismatch(pt, tmp_path):
    out = write_mlx_adapter(read_toolkit_adapter(pt), tmp_path / "m", ARGS)
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 16
    (out / "adapter_config.json").write_text(json.dumps(config))
    one_line_error(lambda: read_adapter(out, ARGS), "rank 8, but adapter_config.json says rank 16")
    config["fine_tune_type"] = "dora"
    (out / "adapter_config.json").write_text(json.dumps(config))
    one_line_error(lambda: read_adapter(out, ARGS), "only LoRA")


def test_blob_reader_reports_dtype(fm):
    blob = fm / "adapter_weights.bin"
    data = bytearray(blob.read_bytes())
    data[68:72] = struct.pack("<I", 4)
    blob.write_bytes(bytes(data))
    one_line_error(lambda: read_mil_blob(blob), "data type int8")


def test_fixture_writer_matches_spec_size():
    tensors = fmadapter_tensors(toolkit_lora(ARGS, 5, RANK), ARGS)
    assert 64 + sum(64 + -(-t.nbytes // 64) * 64 for t in tensors) == fmadapter_blob_size(ARGS, RANK)


# ---- CLI ----


def test_cli_export_adapter(pt, tmp_path):
    from typer.testing import CliRunner

    from afm_mlx.cli import app

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(ARGS.to_dict()))
    runner = CliRunner()
    ok = runner.invoke(app, ["export-adapter", str(pt), "-o", str(tmp_path), "-n", "cli", "--model", str(model_dir),
                             "--author", "me"])
    assert ok.exit_code == 0, ok.output
    assert read_fmadapter(tmp_path / "cli.fmadapter", ARGS).metadata["author"] == "me"
    again = runner.invoke(app, ["export-adapter", str(pt), "-o", str(tmp_path), "-n", "cli", "--model", str(model_dir)])
    assert again.exit_code == 1 and "exists" in again.output and "Traceback" not in again.output
    wrong = runner.invoke(app, ["export-adapter", str(pt), "-o", str(tmp_path), "-n", "big"])  # 3B shapes
    assert wrong.exit_code == 1 and wrong.output.count("\n") == 1 and "another model size" in wrong.output
    assert not (tmp_path / "big.fmadapter").exists()
