"""Speculative acceptance and speedup of the shipped demo family on held-out prompts (MLX, this machine).

    python benchmarks/demo/acceptance.py   # needs benchmarks/demo/work/corpus.json (from build_demo.py), ~2 min
    python benchmarks/demo/acceptance.py --model DIR --out benchmarks/results/demo_acceptance_v1.json  # another family

Prompts: the first 12 words of the first two long (> 30 words) held-out paragraphs of each novel, continued raw
(no chat template) for 64 tokens. For T = 0 and T = 0.7 (seeded per prompt) and k = 1..6 it sums accepted /
proposed draft tokens over all prompts and compares decode tokens/s with plain decoding (no draft).
Writes benchmarks/results/demo_acceptance.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import afm_mlx

REPO = Path(__file__).resolve().parent.parent.parent
OUT = REPO / "benchmarks" / "results" / "demo_acceptance.json"


def held_out_prompts() -> list[str]:
    splits = json.loads((REPO / "benchmarks" / "demo" / "work" / "corpus.json").read_text())
    prompts = []
    for paras in splits["held_out"].values():
        prompts += [" ".join(p.split()[:12]) for p in paras if len(p.split()) > 30][:2]
    return prompts


def run(model, tok, prompts: list[str], temperature: float, k: int) -> tuple[float | None, float]:
    """(acceptance = accepted / proposed, decode tokens/s) over all prompts; k = 0: plain decoding."""
    accepted = proposed = generated = 0
    seconds = 0.0
    for i, prompt in enumerate(prompts):
        options = dict(raw=True, max_tokens=64, temperature=temperature, seed=i)
        options.update(draft_model=False) if k == 0 else options.update(num_draft_tokens=k)
        stats = afm_mlx.generate(model, tok, prompt, **options).stats
        seconds += stats.decode_s
        generated += stats.generated_tokens
        if k:
            accepted, proposed = accepted + stats.speculative.accepted, proposed + stats.speculative.proposed
    return (accepted / proposed if proposed else None), generated / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="converted family directory with draft/ (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=OUT, help="results .json (a .md table is written beside it)")
    args = parser.parse_args()
    prompts = held_out_prompts()
    model, tok = afm_mlx.load(args.model, draft=True)
    afm_mlx.generate(model, tok, prompts[0], raw=True, max_tokens=8)  # warm-up
    rows = []
    for temperature in (0.0, 0.7):
        _, plain_tps = run(model, tok, prompts, temperature, 0)
        for k in range(1, 7):
            acceptance, tps = run(model, tok, prompts, temperature, k)
            rows.append({"temperature": temperature, "k": k, "acceptance": round(acceptance, 3),
                         "speedup": round(tps / plain_tps, 2), "plain_tokens_per_s": round(plain_tps, 1)})
            print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"prompts": len(prompts), "max_tokens": 64, "rows": rows}, indent=2) + "\n")
    lines = ["| T | k | acceptance | speedup vs plain |", "|---|---|---|---|"]
    lines += [f"| {r['temperature']} | {r['k']} | {r['acceptance']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
