"""Reports: the results as markdown tables, JSON, plots, and the README summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .machine import GB, REPO_ROOT
from .suite import ENGINES


def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 1 else f"{x:.{digits + 2}f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _size(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GB:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,.0f} B"


def _machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    git = m["git"]
    commit = git["commit"][:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    bandwidth = f"{m['bandwidth_gbps']:,.0f} GB/s" if m["bandwidth_gbps"] else "bandwidth unknown"
    v = m["versions"]
    streams = f", afm-mlx matmuls over {m['cpu_streams']} CPU stream(s)" if m.get("cpu_streams") else ""
    return (f"{m['backend']} backend on {m['device']} ({bandwidth}, {m['cpu_count']} CPU cores{streams}, "
            f"{m['compute_dtype']}); mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, afm-mlx {v['afm-mlx']}, "
            f"commit {commit}, {m['date']}")


def side_by_side_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    e, r = results["engines"], results["ratios"]
    names = list(e)
    cell = lambda name, f: f(e[name]) if name in e else "n/a"  # noqa: E731
    rows = []
    for i, p in enumerate(e[names[0]]["prefill"]):
        label = f"prefill tok/s, {p['prompt_tokens']}-token prompt (TTFT)"
        def fmt(x, i=i):
            return f"{_num(x['prefill'][i]['prefill_tps'])} ({x['prefill'][i]['ttft_s'] * 1e3:,.1f} ms)"
        rows.append((label, cell("afm-mlx", fmt), cell("mlx-lm", fmt),
                     _ratio(r.get("prefill_tps", {}).get(p["prompt_tokens"]))))
    for key in e[names[0]]["decode"]:
        fmt = lambda x, key=key: _num(x["decode"][key]["tps"])  # noqa: E731
        rows.append((f"plain decode tok/s, {key}", cell("afm-mlx", fmt), cell("mlx-lm", fmt),
                     _ratio(r.get("decode_tps", {}).get(key))))
        if e[names[0]]["speculative"].get(key):
            def best(x, key=key):
                s = max(x["speculative"][key], key=lambda s: s["tps"])
                return f"{_num(s['tps'])} (k={s['k']}, {s['speedup']:.2f}x, accept {s['acceptance']:.0%})"
            rows.append((f"best speculative tok/s, {key}", cell("afm-mlx", best), cell("mlx-lm", best), ""))
    first = next(iter(e[names[0]]["decode"]))
    rows += [
        ("peak memory, plain decode", *(cell(n, lambda x: _size(x["decode"][first]["peak_memory_bytes"]))
                                        for n in ENGINES), ""),
        ("KV cache bytes / token (base)", *(cell(n, lambda x: f"{x['kv_bytes_per_token']:,.0f}") for n in ENGINES),
         _ratio(e["afm-mlx"]["kv_bytes_per_token"] / e["mlx-lm"]["kv_bytes_per_token"])
         if len(e) == 2 else ""),
        ("bytes read / decoded token", *(cell(n, lambda x: _size(x["decode"][first]["bytes_per_token"]["total"]))
                                         for n in ENGINES), ""),
        ("achieved GB/s (fraction of roofline)", *(cell(n, lambda x: _roofline(x["decode"][first])) for n in ENGINES),
         ""),
        ("decode with adapter vs none", *(cell(n, _adapter_cell) for n in ENGINES), ""),
    ]
    return rows


def _roofline(decode: dict[str, Any]) -> str:
    fraction = decode.get("roofline_fraction")
    return f"{decode['achieved_gbps']:.2f}" + (f" ({fraction:.0%})" if fraction is not None else "")


def _adapter_cell(x: dict[str, Any]) -> str:
    a = x.get("adapter", {})
    if a.get("status") != "measured":
        return "n/a"
    return f"{_num(a['tps_with'])} vs {_num(a['tps_without'])} tok/s (rank {a['rank']}, {-a['slowdown']:+.0%})"


def speculative_rows(results: dict[str, Any], key: str) -> list[list[str]]:
    e = results["engines"]
    ours, theirs = e.get("afm-mlx", {}).get("speculative", {}).get(key, []), \
        e.get("mlx-lm", {}).get("speculative", {}).get(key, [])
    rows = []
    for i, s in enumerate(ours or theirs):
        row = [str(s["k"])]
        for spec in (ours, theirs):
            x = spec[i] if i < len(spec) else None
            row += [_num(x["tps"]), f"{x['speedup']:.2f}x", f"{x['acceptance']:.0%}", f"{x['tokens_per_step']:.2f}"] \
                if x else ["n/a"] * 4
        row.append(_ratio(results["ratios"].get("speculative_tps", {}).get(key, {}).get(s["k"])))
        rows.append(row)
    return rows


def _table(header: list[str], rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def results_markdown(results: dict[str, Any]) -> str:
    w = results["workload"]
    lines = [f"## {w['name']}: {w['description']}", "", _machine_line(results), "",
             f"Prompts: {w['prompt_source']}. Settings: {_settings_line(results['config'])}.", ""]
    lines += _table(["metric", "afm-mlx", "mlx-lm", "afm-mlx / mlx-lm"], side_by_side_rows(results))
    for key in results["engines"][next(iter(results["engines"]))]["speculative"]:
        rows = speculative_rows(results, key)
        if rows:
            lines += ["", f"Speculative decoding, {key} (speedup over the same engine's plain decode; tokens/step = "
                          "tokens per verify forward):", ""]
            lines += _table(["k", "afm-mlx tok/s", "speedup", "acceptance", "tokens/step",
                             "mlx-lm tok/s", "speedup", "acceptance", "tokens/step", "afm-mlx / mlx-lm"], rows)
    lines += _controlled_lines(results.get("controlled"))
    lines += _position_table(results) + _guided_lines(results) + _goal_lines(results) + _memory_lines(results)
    lines += _agreement_lines(results)
    lines += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    if results.get("skipped"):
        lines.append(f"- Time budget ({results['config']['time_budget_s']:g} s) spent; not measured: "
                     f"{', '.join(results['skipped'])}.")
    return "\n".join(lines) + "\n"


def _guided_lines(results: dict[str, Any]) -> list[str]:
    g = results.get("guided") or {}
    if g.get("status") != "measured":
        return []
    rows = [[mode, _num(g[mode]["free_tps"]), _num(g[mode]["guided_tps"]), _ratio(g[mode]["ratio"]),
             _num(g[mode]["free_acceptance"], 2), _num(g[mode]["guided_acceptance"], 2)]
            for mode in ("plain", "speculative") if mode in g]
    mask = g["mask"]
    lines = ["", f"Guided decoding (afm-mlx, greedy, a JSON schema rendered into a {g['prompt_tokens']}-token prompt; "
                 f"free = the same prompt without the mask; speculative k = {g['k']}):", ""]
    lines += _table(["mode", "free tok/s", "guided tok/s", "guided / free", "acceptance free", "acceptance guided"],
                    rows)
    if mask["seconds_per_mask"] is not None:
        lines += ["", f"One grammar mask (compute + advance the matcher, on the host): "
                      f"{mask['seconds_per_mask'] * 1e6:.0f} us, {100 * mask['share_of_step']:.1f}% of a free "
                      f"decode step ({mask['masks']} masks replayed)."]
    return lines


def _controlled_lines(controlled: dict[str, Any] | None) -> list[str]:
    """Speculative decoding at controlled acceptance (bench/controlled.py) and the cost model it implies."""
    if not controlled:
        return []
    c = controlled["cost_model"]
    verify = ", ".join(f"{r} rows {s * 1e3:,.2f} ms ({s / c['decode_step_s']:.2f}x)"
                       for r, s in c["verify_s_by_rows"].items())
    rows = [[f"{s['alpha']:g}", s["k"], _num(s["tps"]), f"{s['speedup']:.2f}x", f"{s['acceptance']:.0%}",
             f"{s['tokens_per_round']:.2f}", _num(s["predicted_tps"]), f"{s['predicted_speedup']:.2f}x",
             f"{s['round_s'] * 1e3:,.2f}", f"{s['round_overhead_s'] * 1e3:,.2f}", f"{s['verify_agreed']:.0%}"]
            for s in controlled["settings"]]
    return ["", f"Speculative decoding at controlled acceptance, afm-mlx, T = 0 ({controlled['label']}; plain "
                f"{_num(controlled['plain_tps'])} tok/s; speedup: median of per-trial ratios to the plain run "
                "that gave the continuation):", ""] + \
        _table(["alpha", "k", "tok/s", "speedup", "acceptance", "tokens/round", "predicted tok/s",
                "predicted speedup", "ms/round", "of which not forwards", "verify agreed"], rows) + \
        ["", f"Cost model (each forward alone, medians, at {c['context']} tokens of context): draft step "
             f"{c['draft_step_s'] * 1e3:,.2f} ms ({c['draft_step_s'] / c['decode_step_s']:.2f}x a decode step), "
             f"decode step {c['decode_step_s'] * 1e3:,.2f} ms, verify {verify}; predicted tok/s = "
             "E(alpha, k) / (k * draft step + verify(k + 1 rows)); 'not forwards' is a round's time in the run "
             "less those forwards' own times (host work, syncs, rollback)."]


def _settings_line(c: dict[str, Any]) -> str:
    return (f"prefill at {', '.join(map(str, c['prompt_lengths']))} tokens; decode {c['max_tokens']} tokens after "
            f"{c['decode_prompt_length']}; k in {c['ks']}; T in {c['temperatures']}; {c['trials']} trial(s) "
            f"(medians) after {c['warmup']} warm-up run(s) per setting, the engines' trials interleaved; "
            "afm-mlx / mlx-lm is the median of the per-trial ratios")


def _position_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, result in results["engines"].items():
        for key, specs in result["speculative"].items():
            if not specs:
                continue
            width = max(s["k"] for s in specs)
            rows = [[s["k"]] + [f"{a:.2f}" for a in s["acceptance_by_position"]] + [""] * (width - s["k"])
                    for s in specs]
            lines += ["", f"Acceptance by draft position, {name}, {key} (share of rounds whose i-th draft token was "
                          "accepted; it needs every earlier one accepted too):", ""]
            lines += _table(["k"] + [f"pos {i + 1}" for i in range(width)], rows)
    return lines


def _goal_lines(results: dict[str, Any]) -> list[str]:
    if not results["goals"]:
        return []
    mark = {True: "met", False: "not met", None: "n/a here"}
    rows = [[g["goal"], f"{g['value']:.3f}" + (f" (k={g['k']})" if "k" in g else ""), mark[g["met"]]
             + (f": {g['note']}" if g.get("note") else "")] for g in results["goals"]]
    return ["", "Goals:", ""] + _table(["goal", "measured", "status"], rows)


def _memory_lines(results: dict[str, Any]) -> list[str]:
    m = results["memory"]
    items = [f"base weights {_size(m['base_weight_bytes'])}", f"draft weights {_size(m['draft_weight_bytes'])}"]
    items.append(f"all weights with 16-bit scales/biases (the GPU dtype) {_size(m['weights_16bit_scales_bytes'])}")
    items += [f"{k} {_size(v)}" for k, v in m.items() if k.endswith("KV bytes")]
    return ["", "Memory (resident arrays): " + "; ".join(items) + "."]


def _agreement_lines(results: dict[str, Any]) -> list[str]:
    """Sanity checks: both engines compute the same greedy tokens; speculative greedy equals plain greedy."""
    lines = []
    a = results.get("agreement_greedy")
    if a:
        lines.append(f"Same weights, same tokens: afm-mlx and mlx-lm greedy outputs identical in {a['identical_runs']}"
                     f"/{a['runs']} decode runs (common prefixes {a['common_prefix_tokens']} of {a['generated']}).")
    for name, result in results["engines"].items():
        matches = [s["greedy_matches_plain"] for s in result["speculative"].get("T=0", [])]
        if matches:
            lines.append(f"{name}: greedy speculative output equal to plain greedy output in "
                         f"{sum(matches) / len(matches):.0%} of the runs (k = {results['config']['ks']}).")
    return ["", *lines] if lines else []


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_results(results: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """`<workload>.json` and `<workload>.md` (and PNG plots when matplotlib is there) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = results["workload"]["name"]
    written = [out / f"{name}.json", out / f"{name}.md"]
    _atomic_write(written[0], (json.dumps(results, indent=1, default=_json_default) + "\n").encode())
    _atomic_write(written[1], results_markdown(results).encode())
    if plots:
        written += make_plots(results, out)
    return written


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return str(x)


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots via benchmarks/plots.py (a checkout's script; matplotlib is a dev dependency)."""
    script = REPO_ROOT / "benchmarks" / "plots.py"
    if not script.is_file():
        print(f"plots skipped: {script} not found (run from a checkout: python benchmarks/plots.py RESULTS.json)")
        return []
    import importlib.util

    spec = importlib.util.spec_from_file_location("afm_bench_plots", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plot_results(results, out_dir)


def readme_table(result_files: list[Path]) -> str:
    """One summary row per results file (machine x workload), for the README."""
    rows = []
    for path in sorted(result_files):
        r = json.loads(Path(path).read_text())
        e, m = r["engines"], r["machine"]
        ours, theirs = e.get("afm-mlx"), e.get("mlx-lm")
        key = "T=0" if "T=0" in ours["decode"] else next(iter(ours["decode"]))
        prefill = ours["prefill"][-1]
        spec = ours["speculative"].get(key) or []
        best = max(spec, key=lambda s: s["tps"]) if spec else None
        rows.append([
            f"{m['backend']} / {m['device']}", r["workload"]["name"],
            f"{_num(prefill['prefill_tps'])} ({prefill['prompt_tokens']} tok)",
            f"{_num(ours['decode'][key]['tps'])} / {_num(theirs['decode'][key]['tps'])} "
            f"({_ratio(r['ratios']['decode_tps'][key])})" if theirs else _num(ours["decode"][key]["tps"]),
            f"{_num(best['tps'])} (k={best['k']}, {best['speedup']:.2f}x, {best['acceptance']:.0%})" if best else "n/a",
            _size(ours["decode"][key]["peak_memory_bytes"]),
            m["git"]["commit"][:10],
        ])
    header = ["machine", "workload", "afm-mlx prefill tok/s", "plain decode tok/s, afm-mlx / mlx-lm (ratio)",
              "best speculative tok/s (k, speedup, acceptance)", "peak memory", "commit"]
    return "\n".join(_table(header, rows)) + "\n"


