"""Speculative decoding at controlled acceptance (afm_mlx.bench.controlled) on the tiny random family."""

from __future__ import annotations

import random

import pytest

from afm_mlx.bench import default_config, results_markdown, run_benchmark, tiny_workload
from afm_mlx.bench.controlled import controlled_run, cost_model, predicted_tps, proposals


@pytest.fixture(scope="module")
def workload():
    return tiny_workload(prompt_length=16, count=2)


@pytest.fixture(scope="module")
def continuation(workload):
    from afm_mlx.bench import AfmEngine

    return AfmEngine(workload.model, None, workload.vocab_size).run(workload.prompt(16, 0), 48, 0.0, None, 0).tokens


def test_proposals_match_the_continuation_with_probability_alpha():
    rng, hits, accepted = random.Random(0), 0, []
    for _ in range(4000):
        tokens, n = proposals([5, 6, 7, 8], 0, 4, 0.7, rng, 10)
        hits += sum(t == c for t, c in zip(tokens, [5, 6, 7, 8]))
        assert tokens[:n] == [5, 6, 7, 8][:n] and (n == 4 or tokens[n] == [5, 6, 7, 8][n] + 1)
        accepted.append(n)
    assert abs(hits / 16000 - 0.7) < 0.015
    assert abs(sum(n == 4 for n in accepted) / 4000 - 0.7 ** 4) < 0.03


@pytest.mark.parametrize("alpha, per_round", [(0.0, 1.0), (1.0, 4.0)])
def test_rounds_emit_the_base_continuation_at_the_set_acceptance(workload, continuation, alpha, per_round):
    prompt = workload.prompt(16, 0)
    run, agreed = controlled_run(workload.model, workload.draft, prompt, continuation, alpha, 3, 20, seed=1)
    assert run.tokens == continuation[:len(run.tokens)] and len(run.tokens) >= 20
    assert (len(run.tokens) - 1) / run.rounds == per_round
    assert agreed == 1.0  # float32 on the CPU: the verify's own greedy decision is the set one
    assert sum(run.accepted_by_position) == (0 if alpha == 0 else 3 * run.rounds)


def test_acceptance_follows_alpha_over_many_rounds(workload, continuation):
    run, agreed = controlled_run(workload.model, workload.draft, workload.prompt(16, 0), continuation, 0.6, 2, 40,
                                 seed=3)
    first = run.accepted_by_position[0] / run.proposed_by_position[0]
    assert 0.35 < first < 0.85 and agreed == 1.0
    assert run.accepted_by_position[1] <= run.accepted_by_position[0]


def test_cost_model_and_its_prediction(workload):
    costs = cost_model(workload.model, workload.draft, workload.prompt(16, 0), [3, 4], repeats=1)
    assert set(costs["verify_s_by_rows"]) == {3, 4} and costs["decode_step_s"] > 0 and costs["draft_step_s"] > 0
    round_s = 2 * costs["draft_step_s"] + costs["verify_s_by_rows"][3]
    assert predicted_tps(costs, 0.5, 2) == pytest.approx(1.75 / round_s)  # E = 1 + 0.5 + 0.25


def test_the_suite_reports_a_table_per_alpha_and_k(workload):
    config = default_config("tiny")
    config.controlled_alphas, config.controlled_ks, config.engines, config.adapter = [0.5, 0.9], [2, 3], \
        ["afm-mlx"], False
    results = run_benchmark(workload, config)
    settings = results["controlled"]["settings"]
    assert [(s["alpha"], s["k"]) for s in settings] == [(0.5, 2), (0.5, 3), (0.9, 2), (0.9, 3)]
    assert all(s["tps"] > 0 and s["speedup"] > 0 and s["predicted_tps"] > 0 and s["round_s"] > 0 for s in settings)
    assert "Speculative decoding at controlled acceptance" in results_markdown(results)
    assert default_config("full", "cuda").controlled_alphas == [0.6, 0.7, 0.8, 0.9]
    assert default_config("full", "cuda").controlled_ks == [2, 3, 4, 5, 6]
