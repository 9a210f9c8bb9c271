"""Guided JSON on 240 real-world schemas no one here wrote (tests/data/jsonschemabench/, from JSONSchemaBench):
every schema is compiled (the ones llguidance rejects are counted and listed, each with a one-line reason), and
every accepted one is answered by the demo family at T = 1 without and with the draft. The matcher never refuses
a sampled token (it would raise), and every answer that finishes validates with `jsonschema`.

The budget here is short (the suite must stay fast, and the schema is not rendered into the prompt); the full
run -- schemas rendered as the toolkit does, 192 tokens, finished-answer counts -- is
benchmarks/guided_corpus.py, with its results in benchmarks/results/.
"""

import json
from pathlib import Path

import jsonschema
import pytest

import afm_mlx
from afm_mlx.errors import AFMError
from afm_mlx.generation import generate
from afm_mlx.guided import make_guide

CORPUS = Path(__file__).parent / "data" / "jsonschemabench" / "schemas.jsonl"
REJECTED_AT_MOST = 18  # llguidance 1.9.1: oneOf, dependencies, if/then/else, not, uniqueItems, unknown formats
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def corpus():
    return [json.loads(line) for line in CORPUS.read_text().splitlines()]


@pytest.fixture(scope="module")
def compiled(corpus):
    """(accepted [(row, guide)], rejected [(id, reason)]) for the whole corpus, with the demo tokenizer."""
    model, tok = afm_mlx.load()
    accepted, rejected = [], []
    for row in corpus:
        try:
            accepted.append((row, make_guide(tok, schema=row["schema"])))
        except AFMError as err:
            rejected.append((row["id"], str(err)))
    return model, tok, accepted, rejected


def test_corpus_is_real_and_large(corpus):
    assert len(corpus) == 240 and len({row["id"] for row in corpus}) == 240
    for row in corpus:
        jsonschema.validators.validator_for(row["schema"]).check_schema(row["schema"])


def test_rejected_schemas_are_counted_and_named(compiled):
    _, _, accepted, rejected = compiled
    print(f"\n{len(rejected)} of 240 schemas rejected:\n" + "\n".join(f"  {i}: {r}" for i, r in rejected))
    assert len(accepted) + len(rejected) == 240 and len(rejected) <= REJECTED_AT_MOST
    for _, reason in rejected:
        assert reason.startswith("unsupported or invalid JSON schema: ") and "\n" not in reason


@pytest.mark.parametrize("draft", [False, None], ids=["plain", "speculative"])
def test_every_finished_answer_validates(compiled, draft):
    model, tok, accepted, _ = compiled
    prompt = tok.encode_prompt("Answer in JSON.")  # ids: the schema is not rendered, the constraint applies
    finished = 0
    for seed, (row, _) in enumerate(accepted):
        result = generate(model, tok, prompt, schema=row["schema"], temperature=1.0, seed=seed,
                          max_tokens=MAX_TOKENS, draft_model=draft)
        if result.parsed is not None:
            jsonschema.validate(result.parsed, row["schema"])
            finished += 1
        else:
            assert result.finish_reason == "length" and result.incomplete
    print(f"\n{finished} of {len(accepted)} answers finished within {MAX_TOKENS} tokens, all valid")
    assert finished > 0
