"""Guided rows in the batch engine: a JSON / regex / tool-call row decodes inside its grammar next to free rows,
and every row equals the same request run alone with afm_mlx.generate (greedy and seeded sampling)."""

import jsonschema
import pytest

import afm_mlx
from afm_mlx.batch import batch_generate
from afm_mlx.generation import generate
from test_guided import PERSON, WEATHER

OPTIONS = [dict(schema=PERSON, temperature=1.0, seed=1), dict(temperature=0.7, seed=2),
           dict(regex=r"[A-Z][a-z]+ [0-9]{2}"), dict(schema=PERSON),
           dict(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=5), dict()]
PROMPTS = ["Who is Emma?", "Tell me about Bath.", "Name and age?", "Who is Mr. Knightley?", "Weather in Bath?",
           "Hello"]


@pytest.fixture(scope="module")
def demo():
    return afm_mlx.load()


def test_guided_rows_in_a_batch_equal_each_request_alone(demo):
    model, tok = demo
    batched = batch_generate(model, tok, PROMPTS, options=OPTIONS, max_tokens=96, max_batch=4)
    for prompt, options, result in zip(PROMPTS, OPTIONS, batched):
        alone = generate(model, tok, prompt, max_tokens=96, draft_model=False, **options)
        assert result.tokens == alone.tokens and result.text == alone.text
        assert result.parsed == alone.parsed and result.tool_calls == alone.tool_calls
    person = batched[0]
    assert person.finish_reason == "stop"
    jsonschema.validate(person.parsed, PERSON)
    assert batched[1].guided is None and batched[4].tool_calls[0]["name"] == "get_weather"
