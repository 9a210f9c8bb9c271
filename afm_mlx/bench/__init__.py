"""Benchmarks: afm-mlx and mlx-lm's `afm7` on the same weights, side by side in one run.

    workload = demo_workload()                    # or full_workload(), model_dir_workload(path), tiny_workload()
    results = run_benchmark(workload, default_config(workload.name))
    write_results(results, Path("benchmarks/results") / machine_slug(results["machine"]))

Measurement (both engines are timed the same way, from outside, with `time.perf_counter`):
- TTFT: from the call to the first generated token on the host; prefill tok/s = prompt tokens / TTFT
  (mlx-lm's `prompt_tps` definition). Measured with max_tokens=1 at each prompt length.
- decode tok/s: (generated - 1) / (time of the last token - time of the first), so the prompt is excluded and
  plain and speculative decoding are compared on the same footing. Generation never stops early: the stop ids are
  switched off (afm-mlx gets a tokenizer without stop ids; mlx-lm's generate_step never stops by itself).
- Every setting runs `warmup` untimed runs, then `trials` timed runs over different prompts; the report gives
  medians. Acceptance counts are summed over the trials. Peak memory is `mx.get_peak_memory()` after
  `mx.reset_peak_memory()` before each run (it includes everything resident: the weights, shared by both engines).

mlx-lm side: the same parameter arrays are loaded into `mlx_lm.models.afm7.Model` (identical names, no copy).
Inside the harness only, and said so in the report: `FusedLinear.to_quantized` is patched to accept `mode` (mlx-lm
0.32 lacks it, so quantized afm7 models cannot be built otherwise), a draft without kv-quant scales skips
`fake_8bit_quant` (mlx-lm always fake-quantises, with scale 1.0), and the speculative path gets
`prompt_cache=None` (it splits a given cache at len(model.layers) = 56, not at the 35 caches afm7 makes).

Modules: machine (device, bandwidth, versions), workloads (models and prompts), engines (the two generators, timed
from outside), suite (settings, measurements, goals, run_benchmark), report (markdown, JSON, plots), driver (the
command line). Everything is re-exported here.
"""

from .machine import (
    BANDWIDTH_GBPS, device_name, GB, git_commit, machine_info, machine_slug, memory_bandwidth, REPO_ROOT,
)
from .workloads import (
    demo_workload, describe_weights, find_held_out_texts, full_workload, HELD_OUT_CANDIDATES,
    model_dir_workload, parameter_bytes, parameter_bytes_16bit, random_passages, read_prompt_texts,
    synthetic_model, text_passages, tiny_workload, Workload,
)
from .engines import (
    AfmEngine, mlx_lm_mirror, mlx_lm_patches, MlxLmEngine, rounds_from_flags, Run, timed,
)
from .suite import (
    add_roofline, bench_adapter, bench_speeds, BenchConfig, Budget, count_runs, decode_bytes, decode_summary,
    default_config, ENGINES, goals, harness_notes, make_engines, measure, memory_summary, paired_ratio,
    prefill_summary, random_adapter, ratios, run_benchmark, SCHEMA_VERSION, speculative_summary,
    temperature_key, Tick, token_agreement,
)
from .report import (
    make_plots, readme_table, results_markdown, side_by_side_rows, speculative_rows, write_results,
)
from .driver import (
    build_workload, configure, parse_floats, parse_ints, run_workloads,
)
