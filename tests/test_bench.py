"""The benchmark harness (afm_mlx.bench): a CI-sized run on tiny random models, plus its bookkeeping."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from afm_mlx import bench
from afm_mlx.bench import driver
from afm_mlx.errors import AFMError
from afm_mlx.cli import app


@pytest.fixture(scope="module")
def tiny():
    return bench.tiny_workload(seed=3)


@pytest.fixture(scope="module")
def results(tiny):
    config = bench.default_config("tiny", "cpu")
    config.temperatures = [0.0, 0.7]
    return bench.run_benchmark(tiny, config)


def test_smoke_run_has_every_metric_with_sane_values(results):
    engines = results["engines"]
    assert set(engines) == {"afm-mlx", "mlx-lm"}
    for name, r in engines.items():
        assert [p["prompt_tokens"] for p in r["prefill"]] == [8, 16]
        assert all(p["ttft_s"] > 0 and p["prefill_tps"] > 0 for p in r["prefill"])
        for key in ("T=0", "T=0.7"):
            decode = r["decode"][key]
            assert decode["generated"] == 12 and decode["tps"] > 0 and decode["peak_memory_bytes"] > 0
            assert [s["k"] for s in r["speculative"][key]] == [1, 2]
            for s in r["speculative"][key]:
                assert 0 <= s["acceptance"] <= 1 and len(s["acceptance_by_position"]) == s["k"]
                assert s["rounds"] >= 1 and s["tps"] > 0
                assert s["speedup"] == pytest.approx(s["tps"] / decode["tps"])
        assert all(s["greedy_matches_plain"] == 1.0 for s in r["speculative"]["T=0"]), name
    assert engines["afm-mlx"]["adapter"]["status"] == "measured"
    assert engines["mlx-lm"]["adapter"]["status"] == "n/a"


def test_same_weights_give_the_same_greedy_tokens_in_both_engines(results):
    agreement = results["agreement_greedy"]
    assert agreement["identical_runs"] == agreement["runs"] == 1


def test_kv_bytes_per_token_int8_vs_mlx_lm_floats(results, tiny):
    args = tiny.model.args
    int8 = args.num_regular_layers * 2 * args.num_kv_heads * args.head_dim  # codes only, 1 byte each
    assert results["engines"]["afm-mlx"]["kv_bytes_per_token"] == int8
    assert results["engines"]["mlx-lm"]["kv_bytes_per_token"] == 4 * int8  # float32 K/V on the CPU backend
    assert results["ratios"]["decode_tps"]["T=0"] > 0


def test_results_files_are_json_and_markdown(results, tmp_path):
    written = bench.write_results(results, tmp_path, plots=False)
    assert [p.name for p in written] == ["tiny.json", "tiny.md"]
    loaded = json.loads(written[0].read_text())
    assert loaded["machine"]["backend"] == "cpu" and loaded["machine"]["git"]["commit"]
    assert loaded["machine"]["versions"]["mlx-lm"] != "not installed"
    md = written[1].read_text()
    for heading in ("| metric | afm-mlx | mlx-lm | afm-mlx / mlx-lm |", "Speculative decoding, T=0",
                    "Acceptance by draft position, afm-mlx, T=0.7", "plain decode >= 1.1x mlx-lm"):
        assert heading in md
    assert "prefill tok/s, 16-token prompt" in md
    table = bench.readme_table([written[0]])
    assert "| cpu / " in table and "| tiny |" in table
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_results_readme_tabulates_workloads_and_links_kernel_benchmarks(results, tmp_path):
    """benchmarks/run_bench.py readme: one row per workload file; a kernels_bench result beside them (its own
    schema, no workload) is linked, not read as a workload."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "run_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "run_bench.py")
    run_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_bench)
    machine = tmp_path / "cpu-test"
    written = bench.write_results(results, machine, plots=False)
    written[0].rename(machine / "demo.json")
    (machine / "kernels.json").write_text(json.dumps({"meta": {}, "qmm": [], "attention": []}))
    (machine / "kernels.md").write_text("# Kernel benchmark\n")
    readme = run_bench.write_readme(tmp_path).read_text()
    assert readme.count("| cpu / ") == 1 and "| tiny |" in readme  # the workload named in the file
    assert "[cpu-test/kernels.md](cpu-test/kernels.md)" in readme and "[cpu-test/demo.md](cpu-test/demo.md)" in readme


def test_cli_smoke_run(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--tiny", "--out", str(tmp_path), "--no-plots", "--ks", "2",
                                      "--no-adapter", "--engines", "afm-mlx"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert list(data["engines"]) == ["afm-mlx"] and data["config"]["ks"] == [2]
    assert data["engines"]["afm-mlx"]["adapter"]["status"] == "n/a"


@pytest.mark.parametrize("args, message", [
    (["--tiny", "--ks", "1-x"], "--ks"), (["--tiny", "--engines", "vllm"], "engines must be"),
    (["--no-demo"], "nothing to benchmark"), (["--tiny", "--trials", "0"], "trials"),
    (["--model", "/nonexistent/model"], "not found")])
def test_cli_bad_settings_fail_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), *args])
    assert result.exit_code == 1 and message in result.output
    assert not list(tmp_path.iterdir())


def test_a_failing_workload_is_one_error_line_and_the_others_still_run(tmp_path, monkeypatch):
    """A backend fault in one workload (seen: MLX's CUDA graph error on the 3B) must not lose the other results."""
    real_run = bench.run_benchmark

    def run(workload, config, progress=None):
        if workload.name == "tiny" and not calls:
            calls.append(1)
            raise RuntimeError("cuGraphAddKernelNode(&node, graph_, NULL, 0, &params) failed: invalid argument\nmore")
        return real_run(workload, config, progress)

    calls = []
    monkeypatch.setattr(driver, "run_benchmark", run)  # as the driver looks it up
    with pytest.raises(AFMError, match=r"^1 workload\(s\) failed: tiny: cuGraphAddKernelNode.*argument$"):
        bench.run_workloads(["tiny", "tiny"], out_dir=tmp_path, plots=False,
                            overrides={"ks": [1], "adapter": False, "engines": ["afm-mlx"]})
    assert (tmp_path / "tiny.json").is_file()  # the second run of the workload was written


def test_ratios_pair_the_interleaved_trials():
    """The demo's CPU decode trials of one run (tok/s): a slow spell of the shared machine hit trial 2 of both
    engines. Pairs divide it out (1.14, 1.20, 0.97 -> 1.14); the ratio of the medians (135 / 139 = 0.97) does not."""
    ours, theirs = [160.3, 124.3, 135.2], [140.4, 103.5, 139.3]
    assert bench.paired_ratio(ours, theirs) == pytest.approx(160.3 / 140.4)
    assert bench.paired_ratio(ours, []) is None


def test_rounds_from_mlx_lm_flags():
    # k=3, 9 tokens: round 1 accepts 2 (T T F), round 2 none (F), round 3 all 3 + target (T T T F),
    # round 4 proposes min(3, 9 - 8) = 1 and stops at max_tokens after accepting it (T).
    flags = [True, True, False, False, True, True, True, False, True]
    proposed, accepted, rounds = bench.rounds_from_flags(flags, 3, 9)
    assert (proposed, accepted, rounds) == ([4, 3, 3], [3, 2, 1], 4)


def test_synthetic_weights_lie_on_the_affine_grid():
    model = bench.synthetic_model(bench.tiny_workload().model.args, bits=2, group_size=32, seed=1)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 2
    w = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=2))
    s, b = np.array(layer.scales), np.array(layer.biases)
    codes = (w.reshape(w.shape[0], -1, 32) - b[..., None]) / s[..., None]
    assert np.abs(codes - np.round(codes)).max() < 1e-4 and set(np.unique(np.round(codes))) <= {0, 1, 2, 3}
    assert np.abs(w).max() <= 1.5 / np.sqrt(w.shape[1]) + 1e-6


def test_synthetic_model_computes_in_the_dtype_asked_for():
    """Every float parameter in the compute dtype, norms included (a float32 norm weight turned the 3B's GPU
    activations float32, where MLX's CUDA quantized matmul fails past 128 rows); kv-quant scales stay float32
    (here they are set after the cast, so this says nothing about loading.cast_floats: tests/test_regressions.py
    builds half-precision models through it)."""
    model = bench.synthetic_model(bench.tiny_workload().model.args, bits=2, group_size=32, seed=1,
                                  dtype=mx.bfloat16)
    dtypes = {path: a.dtype for path, a in tree_flatten(model.parameters()) if mx.issubdtype(a.dtype,
                                                                                                  mx.floating)}
    kv_scales = {p for p in dtypes if p.endswith(("quant_key_scale", "quant_value_scale"))}
    assert kv_scales and all(dtypes[p] == mx.float32 for p in kv_scales)
    assert {dtypes[p] for p in dtypes.keys() - kv_scales} == {mx.bfloat16}
    assert any(p.endswith("input_layernorm.weight") for p in dtypes)
    tokens = mx.array([[1, 2, 3]])
    assert model(tokens, model.make_cache()).dtype == mx.bfloat16


def test_mlx_lm_mirror_shares_arrays_and_matches_logits(tiny):
    from mlx_lm.models import afm7

    before = (afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant)
    for model in (tiny.model, tiny.draft):  # the draft has no kv-quant scales
        mirror = bench.mlx_lm_mirror(model)
        ours = dict(tree_flatten(model.parameters()))
        theirs = dict(tree_flatten(mirror.parameters()))
        assert ours.keys() == theirs.keys() and all(theirs[k] is ours[k] for k in ours)
        tokens = mx.array([tiny.prompt(12, 0)])
        with bench.mlx_lm_patches():
            reference = mirror(tokens)
        assert mx.abs(model(tokens) - reference).max().item() <= 1e-4
    assert (afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant) == before  # the patches are undone


def test_bandwidth_table_and_bytes_per_token():
    assert bench.memory_bandwidth("Apple M4 Max") == 546 and bench.memory_bandwidth("Apple M4") == 120
    assert bench.memory_bandwidth("NVIDIA H100 80GB HBM3") == 3350 and bench.memory_bandwidth("NVIDIA H200") == 4800
    assert bench.memory_bandwidth("AMD EPYC") is None and bench.memory_bandwidth("NVIDIA H100 PCIe") is None
    from afm_mlx.presets import BASE_3B, kv_bytes_per_token

    moved = bench.decode_bytes(10**9, kv_bytes_per_token(BASE_3B), BASE_3B, context=1000)
    assert moved["kv"] == 1000 * 512 * 56  # 512 int8 bytes per layer and token, read by 35 + 21 layers


def test_parse_lists():
    assert bench.parse_ints("1-4,8", "--ks") == [1, 2, 3, 4, 8]
    assert bench.parse_floats("0,0.7", "--temperatures") == [0.0, 0.7]


def test_text_passages_per_group_round_robin(tmp_path):
    from tokenizer_fixture import build_tiny_tokenizer

    from afm_mlx.tokenizer import load_tokenizer

    build_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"held_out": {"a": ["The quick brown fox jumps over the lazy dog."] * 6,
                                                "b": ["The weather is nice today."] * 6}}))
    groups = bench.read_prompt_texts(prompts)
    assert [len(g) for g in groups] == [6, 6]
    passages = bench.text_passages(tok, groups, 20, 10)
    assert len(passages) >= 2 and all(p[0] == tok.eos_id and len(p) >= 20 for p in passages)
    assert "fox" in tok.decode(passages[0]) and "weather" in tok.decode(passages[1])  # alternating groups
    assert all(not ("fox" in tok.decode(p) and "weather" in tok.decode(p)) for p in passages)
    with pytest.raises(AFMError, match="no passage of 10000 tokens"):
        bench.text_passages(tok, groups, 10000, 4)


def test_demo_workload_uses_held_out_text():
    workload = bench.demo_workload(max_length=64, count=3)
    assert workload.prompt_source == "benchmarks/prompts_held_out.json"
    assert workload.draft is not None and len(workload.passages) == 3
    assert not any(k.startswith("draft.") for k, _ in tree_flatten(workload.model.parameters()))


def test_time_budget_skips_a_setting_that_would_end_past_it(monkeypatch):
    """A setting is expected to last as long as the last one timed: skipped when it would end past the deadline,
    not only when it would start past it."""
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    budget = bench.Budget(10.0)  # deadline 110
    with budget.timed():
        clock[0] += 4.0  # a setting took 4 s; now 104
    assert budget.allows("a") and budget.last_s == 4.0  # 104 + 4 <= 110
    clock[0] += 3.0  # 107: 107 + 4 would end past 110
    assert not budget.allows("b") and budget.skipped == ["b"]
    assert bench.Budget(None).allows("c")


def test_time_budget_skips_speculative_settings_and_says_so(tiny, tmp_path):
    config = bench.default_config("tiny", "cpu")
    config.time_budget_s = 1e-9  # spent at once: prefill and plain decode still run
    results = bench.run_benchmark(tiny, config)
    assert results["skipped"] == ["speculative T=0 k=1", "speculative T=0 k=2", "adapter"]
    assert results["engines"]["afm-mlx"]["decode"]["T=0"]["tps"] > 0
    assert results["engines"]["afm-mlx"]["speculative"]["T=0"] == []
    md = bench.results_markdown(results)
    assert "not measured: speculative T=0 k=1" in md
    assert [p.name for p in bench.write_results(results, tmp_path)][:2] == ["tiny.json", "tiny.md"]
