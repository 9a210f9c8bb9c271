"""Guided generation in the benchmark: decode speed under a JSON schema against free decoding of the same prompt
(plain and speculative, trials interleaved), the host time of one grammar mask and its share of a decode step,
and the draft's acceptance under the schema next to free text's."""

from __future__ import annotations

import time
from typing import Any

from ..guided import make_guide
from .engines import AfmEngine, Run
from .suite import _median

# A long free-text field, so greedy runs last the whole budget (the demo family loops inside the string), and a
# few structured fields the grammar forces token by token.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "year", "married", "story"],
          "properties": {"title": {"type": "string", "maxLength": 40}, "year": {"type": "integer"},
                         "married": {"type": "boolean"}, "story": {"type": "string"}}}
PROMPT = "Tell a short story about Mr. Darcy, in the response format."


def bench_guided(model, draft, tokenizer, config, tick) -> dict[str, Any]:
    """{'plain' | 'speculative': {free/guided tok/s, ratio, acceptance}, 'mask': {...}} at T = 0."""
    guide = make_guide(tokenizer, schema=SCHEMA)
    ids = tokenizer.encode_prompt(PROMPT, response_format=guide.response_format)  # the prompt a guided call sends
    k = max(config.ks) if draft is not None and config.ks else None
    modes = {"plain": None} | ({"speculative": k} if k else {})
    runs: dict[tuple[str, str], list[Run]] = {(m, g): [] for m in modes for g in ("free", "guided")}
    for trial in range(-config.warmup, config.trials):
        for mode, mode_k in modes.items():
            for kind in ("free", "guided"):
                tokens = config.warmup_tokens if trial < 0 else config.max_tokens
                run = _run(model, draft, tokenizer, ids, kind == "guided", mode_k, tokens, config.seed)
                tick(f"afm-mlx guided {mode} {kind}")
                if trial >= 0:
                    runs[mode, kind].append(run)
    result = {mode: _summary(runs[mode, "free"], runs[mode, "guided"]) for mode in modes}
    result["mask"] = _mask_cost(guide, model.args.vocab_size, runs["plain", "guided"], result["plain"])
    result["schema"], result["prompt_tokens"], result["k"] = SCHEMA, len(ids), k
    return result


def _run(model, draft, tokenizer, ids, guided: bool, k: int | None, max_tokens: int, seed: int) -> Run:
    """One greedy generation of `ids`: free (no stop ids, the whole budget) or under SCHEMA."""
    engine = AfmEngine(model, draft, tokenizer.vocab_size)
    if guided:
        return engine.run(ids, max_tokens, 0.0, k, seed, tokenizer=tokenizer, schema=SCHEMA)
    return engine.run(ids, max_tokens, 0.0, k, seed)


def _acceptance(runs: list[Run]) -> float | None:
    proposed = sum(sum(r.proposed_by_position) for r in runs)
    return sum(sum(r.accepted_by_position) for r in runs) / proposed if proposed else None


def _summary(free: list[Run], guided: list[Run]) -> dict[str, Any]:
    ratios = [g.decode_tps / f.decode_tps for f, g in zip(free, guided) if f.decode_tps > 0]
    return {"free_tps": _median([r.decode_tps for r in free]), "guided_tps": _median([r.decode_tps for r in guided]),
            "ratio": _median(ratios) if ratios else None, "guided_tokens": _median([len(r.tokens) for r in guided]),
            "free_acceptance": _acceptance(free), "guided_acceptance": _acceptance(guided)}


def _mask_cost(guide, vocab_size: int, runs: list[Run], plain: dict[str, Any]) -> dict[str, Any]:
    """Host seconds per mask (computing it and advancing the matcher), replayed over the guided runs' tokens."""
    seconds, count = 0.0, 0
    for run in runs:
        constraint = guide.constraint(vocab_size)
        for token in run.tokens:
            start = time.perf_counter()
            constraint.allowed()
            constraint.consume([token])
            seconds += time.perf_counter() - start
            count += 1
    per_mask = seconds / count if count else None
    step = 1.0 / plain["free_tps"] if plain["free_tps"] else None
    return {"seconds_per_mask": per_mask, "share_of_step": per_mask / step if per_mask and step else None,
            "masks": count}
