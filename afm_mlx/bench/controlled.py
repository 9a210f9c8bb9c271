"""Speculative decoding at controlled acceptance: the real draft and base forwards, with the acceptance set.

Without Apple's weights the full-size draft is unrelated to the base (0% acceptance), so the full-size speculative
rows only show what a rejected round costs. Here every round still runs k real draft steps and one real (k + 1)-row
verify, but the k proposals are decided beforehand: draft token i is the base's own greedy continuation (from one
plain greedy run) with probability alpha, else a different token. Proposals are accepted up to the first one that
is not the continuation and the tokens emitted are the continuation's, so acceptance is i.i.d. at alpha exactly and
tokens/s and speedup over plain decoding are what AFM's own speculation would reach at that acceptance. The verify
forward's own greedy decision is computed and read back every round, as in a real round, and counted against
the set one (`verify_agreed`: 1.0 in float32 on the CPU, where both are the same argmax).

The cost model beside it, each forward timed alone after a sync (medians): one draft step, one base verify of r
rows, one base decode step; it predicts E(alpha, k) / (k * draft + verify(k + 1)) tokens/s, E the expected tokens
per round (speculative.expected_tokens).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import mlx.core as mx

from ..model import Model
from ..speculative import accept_greedy, expected_tokens, rollback
from .engines import Run


def proposals(continuation: list[int], start: int, k: int, alpha: float, rng: random.Random,
              vocab_size: int) -> tuple[list[int], int]:
    """k draft tokens for positions start.. of the continuation, and how many of them will be accepted."""
    out = [t if rng.random() < alpha else (t + 1) % vocab_size for t in continuation[start:start + k]]
    accepted = next((i for i, (p, t) in enumerate(zip(out, continuation[start:])) if p != t), k)
    return out, accepted


def draft_steps(draft: Model, cache: list, pending: list[int], tokens: list[int]) -> mx.array:
    """The k real draft forwards of a round, fed the set proposals; returns them [1, k]. The draft's own greedy
    choice is computed at every step, as in a real round, and then replaced."""
    x = mx.array([pending], dtype=mx.int32)
    for token in tokens:
        mx.async_eval(mx.argmax(draft(x, cache, num_logits=1)[:, -1], axis=-1))
        x = mx.array([[token]], dtype=mx.int32)
    return mx.array([tokens], dtype=mx.int32)


def controlled_run(model: Model, draft: Model, prompt: list[int], continuation: list[int], alpha: float, k: int,
                   max_tokens: int, seed: int) -> tuple[Run, float]:
    """Greedy speculative decoding of at least max_tokens (<= len(continuation) - k) at acceptance alpha: the
    timed Run and the share of rounds whose verify decided as the set proposals did."""
    rng = random.Random(seed)
    base_cache, draft_cache = model.make_cache(), draft.make_cache()
    for m, cache in ((model, base_cache), (draft, draft_cache)):
        m.prefill(mx.array([prompt[:-1]], dtype=mx.int32), cache)
    start = time.perf_counter()
    mx.eval(mx.argmax(model(mx.array([prompt[-1:]], dtype=mx.int32), base_cache, num_logits=1), axis=-1))
    first = time.perf_counter()
    history, produced = list(prompt) + continuation[:1], 1
    run = Run(len(prompt), [], first - start, 0.0, 0, [0] * k, [0] * k)
    agreed = 0
    while produced < max_tokens:
        tokens, accepted = proposals(continuation, produced, k, alpha, rng, model.args.vocab_size)
        drafts = draft_steps(draft, draft_cache, history[draft_cache[0].offset:], tokens)
        logits = model(mx.concatenate([mx.array([history[-1:]], dtype=mx.int32), drafts], axis=1), base_cache,
                       num_logits=k + 1)
        agreed += accept_greedy(logits, drafts)[0].item() == accepted  # the round's one host sync
        history += continuation[produced:produced + accepted + 1]
        produced += accepted + 1
        rollback(base_cache, len(history) - 1)
        rollback(draft_cache, len(history) - 1)
        run.rounds += 1
        for i in range(k):
            run.proposed_by_position[i] += 1
            run.accepted_by_position[i] += i < accepted
    run.decode_s = time.perf_counter() - first
    run.tokens = history[len(prompt):]  # the last round may overshoot max_tokens; its tokens were paid for
    return run, agreed / max(run.rounds, 1)


# ---- the cost model


def cost_model(model: Model, draft: Model, prompt: list[int], rows: list[int], repeats: int = 3) -> dict[str, Any]:
    """Median seconds of one draft step, one base decode step and one base verify of r rows for each r in rows,
    each forward evaluated alone after a prefill of `prompt` (then rolled back, so all run at one length)."""
    caches = {id(m): m.make_cache() for m in (model, draft)}
    for m in (model, draft):
        m.prefill(mx.array([prompt], dtype=mx.int32), caches[id(m)])

    def seconds(m: Model, r: int) -> float:
        cache, times = caches[id(m)], []
        for _ in range(repeats + 1):  # the first call traces the step
            start = time.perf_counter()
            mx.eval(m(mx.array([prompt[-r:]], dtype=mx.int32), cache, num_logits=r))
            times.append(time.perf_counter() - start)
            rollback(cache, len(prompt))
        return statistics.median(times[1:])

    return {"draft_step_s": seconds(draft, 1), "decode_step_s": seconds(model, 1),
            "verify_s_by_rows": {r: seconds(model, r) for r in rows}, "context": len(prompt)}


def predicted_tps(costs: dict[str, Any], alpha: float, k: int) -> float:
    """Tokens/s the cost model predicts at i.i.d. acceptance alpha with k drafts per round."""
    round_s = k * costs["draft_step_s"] + costs["verify_s_by_rows"][k + 1]
    return expected_tokens(alpha, k) / round_s


# ---- in the suite


def bench_controlled(workload, config, tick, budget) -> dict[str, Any]:
    """Plain greedy decoding (whose tokens are the continuation) and every (alpha, k) at controlled acceptance,
    interleaved trial by trial; then the cost model, and its prediction beside each measurement."""
    from .engines import AfmEngine

    model, draft, ks = workload.model, workload.draft, config.controlled_ks
    plain_engine = AfmEngine(model, None, workload.vocab_size)
    settings = [(alpha, k) for alpha in config.controlled_alphas for k in ks]
    plain, runs, agreed = [], {s: [] for s in settings}, {s: [] for s in settings}
    for trial in range(-1, config.trials):  # trial -1: one short untimed run of each (the steps' traces)
        prompt = workload.prompt(config.decode_prompt_length, max(trial, 0))
        tokens = config.max_tokens if trial >= 0 else max(ks) + 2
        reference = plain_engine.run(prompt, tokens + max(ks) + 1, 0.0, None, config.seed)
        tick("afm-mlx controlled")
        for alpha, k in settings:
            if trial >= 0 and not budget.allows(f"controlled alpha={alpha:g} k={k} trial {trial}"):
                continue
            run, share = controlled_run(model, draft, prompt, reference.tokens, alpha, k, tokens,
                                        config.seed + trial)
            tick("afm-mlx controlled")
            if trial >= 0:
                runs[(alpha, k)].append((run, reference))
                agreed[(alpha, k)].append(share)
        if trial >= 0:
            plain.append(reference)
    costs = cost_model(model, draft, workload.prompt(config.decode_prompt_length, 0), [k + 1 for k in ks])
    return {"label": LABEL, "plain_tps": statistics.median(r.decode_tps for r in plain) if plain else 0.0,
            "cost_model": costs, "settings": [controlled_summary(alpha, k, runs[(alpha, k)], agreed[(alpha, k)],
                                                                 costs) for alpha, k in settings if runs[(alpha, k)]]}


LABEL = ("controlled acceptance: the real draft and verify forwards, each proposal set to the base's own "
         "greedy continuation with probability alpha, else another token")


def controlled_summary(alpha: float, k: int, pairs: list[tuple[Run, Run]], agreed: list[float],
                       costs: dict[str, Any]) -> dict[str, Any]:
    """One (alpha, k): tokens/s, speedup over plain (median of per-trial ratios to that trial's plain run)."""
    accepted = sum(sum(r.accepted_by_position) for r, _ in pairs)
    proposed = sum(sum(r.proposed_by_position) for r, _ in pairs)
    predicted = predicted_tps(costs, alpha, k)
    round_s = statistics.median(r.decode_s / r.rounds for r, _ in pairs if r.rounds)
    return {"alpha": alpha, "k": k, "tps": statistics.median(r.decode_tps for r, _ in pairs),
            "round_s": round_s,  # what a round took in the run, against the forwards' own times:
            "round_overhead_s": round_s - k * costs["draft_step_s"] - costs["verify_s_by_rows"][k + 1],
            "speedup": statistics.median(r.decode_tps / p.decode_tps for r, p in pairs if p.decode_tps),
            "acceptance": accepted / proposed if proposed else 0.0,
            "tokens_per_round": sum(len(r.tokens) - 1 for r, _ in pairs) / max(sum(r.rounds for r, _ in pairs), 1),
            "predicted_tps": predicted, "predicted_speedup": predicted * costs["decode_step_s"],
            "verify_agreed": statistics.median(agreed)}
