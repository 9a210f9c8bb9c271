"""benchmarks/kernels_bench.py end to end on this machine's backend, at toy sizes: it measures every row it
promises and writes both reports (the GPU numbers come from running it on a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_bench.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("kernels_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "K", 128)
    monkeypatch.setattr(module, "N", 24)
    monkeypatch.setattr(module, "ATTENTION_SHAPES", [("base", 4, 2, 64)])
    monkeypatch.setattr(module, "QUICK_LENGTHS", [40])
    monkeypatch.setattr(module, "TIMING", {"quick": (0.0, 1), "full": (0.0, 1)})
    return module


def test_quick_run_writes_json_and_markdown(bench, tmp_path):
    assert bench.main(["--quick", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert [(r["bits"], r["M"]) for r in result["qmm"]] == [(b, m) for b in (2, 4) for m in bench.QUICK_ROWS]
    assert [(r["kv_len"], r["L"]) for r in result["attention"]] == [(40, l) for l in (1, 2, 4, 8)]
    assert all(r["kernel_us"] > 0 and r["mlx_us"] > 0 for r in result["qmm"])
    report = (tmp_path / "kernels.md").read_text()
    assert "| 2 | 128 | 4 |" in report and "Goal (2-bit, kernel M = 4 <= 1.3x M = 1)" in report
    if result["meta"]["backend"] == "cpu":
        assert "not a custom kernel" in report and result["sweep"] == []
    assert not list(tmp_path.glob("*.tmp"))
