"""Guided JSON on real schemas no one here wrote: the JSONSchemaBench subset in tests/data/jsonschemabench/,
each schema answered by the embedded demo family at T = 1, without and with the draft, the schema rendered into
the prompt as the toolkit does. Every finished answer is validated with `jsonschema`; schemas the engine
rejects are counted and listed with llguidance's reason; answers the token budget cut short are counted.

    python benchmarks/guided_corpus.py [--max-tokens 192] [--limit N] [--out benchmarks/results/<machine>]

Writes guided_corpus.json (every answer's outcome) and guided_corpus.md (the summary).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import jsonschema

import afm_mlx
from afm_mlx.bench.machine import REPO_ROOT, machine_info, machine_slug
from afm_mlx.errors import AFMError
from afm_mlx.generation import generate

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "jsonschemabench" / "schemas.jsonl"
PROMPT = "Answer with a JSON object that follows the response format."


def load_corpus(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def answer(model, tokenizer, row: dict, seed: int, draft: bool, max_tokens: int) -> dict:
    """One schema, one mode: {'outcome': 'valid' | 'invalid' | 'incomplete' | 'rejected', ...}."""
    try:
        result = generate(model, tokenizer, PROMPT, schema=row["schema"], temperature=1.0, seed=seed,
                          max_tokens=max_tokens, draft_model=None if draft else False)
    except AFMError as err:
        return {"outcome": "rejected", "reason": str(err)}
    record = {"tokens": result.stats.generated_tokens, "decode_tps": result.stats.decode_tps}
    if result.stats.speculative is not None:
        record["acceptance"] = result.stats.speculative.acceptance_rate
    if result.parsed is None:
        return {**record, "outcome": "incomplete"}
    try:
        jsonschema.validate(result.parsed, row["schema"])
    except jsonschema.ValidationError as err:
        return {**record, "outcome": "invalid", "reason": err.message, "text": result.text}
    return {**record, "outcome": "valid"}


def run(max_tokens: int, limit: int | None, out: Path) -> dict:
    """Answer every schema; the report is rewritten every 20 schemas, so a stopped run keeps what it measured."""
    model, tokenizer = afm_mlx.load()
    rows = load_corpus(limit)
    report = {"machine": machine_info(), "max_tokens": max_tokens, "temperature": 1.0, "schemas": 0,
              "records": [], "seconds": 0.0}
    start = time.perf_counter()
    for seed, row in enumerate(rows):
        for draft in (False, True):
            report["records"].append({"id": row["id"], "draft": draft,
                                      **answer(model, tokenizer, row, seed, draft, max_tokens)})
        report["schemas"], report["seconds"] = seed + 1, time.perf_counter() - start
        if seed % 20 == 19 or seed + 1 == len(rows):
            write(report, out)
            print(f"{seed + 1}/{len(rows)} schemas, {report['seconds']:.0f} s", flush=True)
    return report


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "guided_corpus.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "guided_corpus.md").write_text(summary(report))


def summary(report: dict) -> str:
    lines = [f"# Guided JSON on {report['schemas']} JSONSchemaBench schemas (demo family, T = 1, "
             f"max_tokens = {report['max_tokens']})", "",
             "| mode | valid | invalid | incomplete (budget) | rejected by the engine |", "|---|---|---|---|---|"]
    for draft in (False, True):
        counts = Counter(r["outcome"] for r in report["records"] if r["draft"] == draft)
        mode = "speculative (draft, k = 4)" if draft else "plain"
        lines.append(f"| {mode} | {counts['valid']} | {counts['invalid']} | {counts['incomplete']} | "
                     f"{counts['rejected']} |")
    finished = [r for r in report["records"] if r["outcome"] in ("valid", "invalid")]
    valid = sum(r["outcome"] == "valid" for r in finished)
    lines += ["", f"Finished answers that validate with `jsonschema`: **{valid} / {len(finished)}**.", "",
              "Rejected schemas (llguidance's reason):", ""]
    lines += [f"- `{r['id']}`: {r['reason']}" for r in report["records"] if r["outcome"] == "rejected" and
              not r["draft"]]
    machine = report["machine"]
    lines += ["", f"Run at {machine.get('git', {}).get('commit', '?')[:10]} on {machine.get('device', '?')}, "
                  f"{report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--limit", type=int, default=None, help="only the first N schemas")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or REPO_ROOT / "benchmarks" / "results" / machine_slug(machine_info())
    print(summary(run(args.max_tokens, args.limit, out)))


if __name__ == "__main__":
    main()
