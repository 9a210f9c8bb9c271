"""`afm-mlx serve` with guided generation, through the real `openai` client: response_format (json_schema and
json_object) and tools / tool_choice, streamed or not; a conversation continued with a tool result."""

import json

import jsonschema
import pytest

import afm_mlx
from test_guided import PERSON, WEATHER
from test_server import KEY, Server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ASK = [{"role": "user", "content": "Who is Emma?"}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--max-tokens", "256", "--max-context", "1024")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def demo():
    return afm_mlx.load(draft=False)


def test_response_format_equals_generate_alone_and_validates(server, demo):
    model, tok = demo
    reply = server.client().chat.completions.create(model="afm", messages=ASK, temperature=0, max_tokens=60,
                                                    response_format=FORMAT)
    alone = afm_mlx.generate(model, tok, ASK, response_format=FORMAT, max_tokens=60, draft_model=False)
    content = reply.choices[0].message.content
    assert content == alone.text
    if reply.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(content), PERSON)
    sampled = server.client().chat.completions.create(model="afm", messages=ASK, temperature=1.0, seed=3, n=3,
                                                      max_tokens=80, response_format=FORMAT)
    finished = [c for c in sampled.choices if c.finish_reason == "stop"]
    assert finished
    for choice in finished:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_starts_an_object(server):
    reply = server.client().chat.completions.create(model="afm", messages=ASK, max_tokens=12,
                                                    response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith("{")


def test_required_tool_call_in_openai_shape(server):
    reply = server.client().chat.completions.create(
        model="afm", messages=[{"role": "user", "content": "Weather in Bath?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    call, = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_call_arrives_as_a_tool_calls_delta(server):
    chunks = list(server.client().chat.completions.create(
        model="afm", messages=[{"role": "user", "content": "Weather in Bath?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=120, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "executable" not in content and "get_weather" not in content
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [t.function.name for t in calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_conversation_continues_with_the_tool_result(server):
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Bath?"}]
    first = client.chat.completions.create(model="afm", messages=messages, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=2, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model="afm", messages=messages, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8)
    assert second.choices[0].message.tool_calls is None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
