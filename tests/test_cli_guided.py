"""`afm-mlx generate` / `chat` with --json-schema, --regex, --grammar, --tools on the embedded demo family:
valid answers, an incomplete answer reported (exit 1), and every bad constraint one `error:` line, exit 1."""

import json

import jsonschema
import pytest
from typer.testing import CliRunner

from afm_mlx.cli import app

runner = CliRunner()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 15},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Bath", "London"]}}, "required": ["city"],
    "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    contents = {"schema.json": json.dumps(SCHEMA), "tools.json": json.dumps(TOOLS),
                "grammar.lark": 'start: "Yes" | "No"',
                "format.json": json.dumps({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}),
                "bad_schema.json": '{"type": "strin"}', "not_json.json": "{", "no_name.json": '[{"function": {}}]'}
    for name, text in contents.items():
        (root / name).write_text(text)
    return root


def _run(*args, input=None):
    return runner.invoke(app, list(map(str, args)), input=input)


@pytest.mark.parametrize("file", ["schema.json", "format.json"])
def test_json_schema_answer_validates(files, file):
    result = _run("generate", "Who is Emma?", "--json-schema", files / file, "-t", "1", "--seed", "1")
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_regex_and_grammar(files):
    year = _run("generate", "When?", "--regex", "1[0-9]{3}", "-t", "1", "--seed", "4")
    assert year.exit_code == 0 and year.stdout.strip().isdigit() and len(year.stdout.strip()) == 4
    answer = _run("generate", "Will she?", "--grammar", files / "grammar.lark", "--no-draft")
    assert answer.exit_code == 0 and answer.stdout.strip() in ("Yes", "No")


def test_tools_required_prints_the_call_block(files):
    result = _run("generate", "Weather in Bath?", "--tools", files / "tools.json", "--tool-choice", "required",
                  "--one-tool-call", "-t", "1", "--seed", "2")
    assert result.exit_code == 0, result.output
    block = result.stdout.strip()
    assert block.startswith("<executable_start> ```function\n") and block.endswith("```<executable_end>")
    call, = json.loads(block[len("<executable_start> ```function\n"):-len("```<executable_end>")])
    assert call["name"] == "get_weather" and call["arguments"]["city"] in ("Bath", "London")


def test_incomplete_answer_is_printed_and_reported(files):
    result = _run("generate", "Who is Emma?", "--json-schema", files / "schema.json", "-n", "3")
    assert result.exit_code == 1
    assert result.stdout.startswith("{") and not result.stdout.strip().endswith("}")
    assert result.stderr.strip().splitlines() == [
        "error: the answer is incomplete: max_tokens ended it before the JSON was complete "
        "(raise --max-tokens or --max-context)"]


def test_chat_answers_every_turn_inside_the_schema(files):
    result = _run("chat", "--json-schema", files / "schema.json", "-t", "1", "--seed", "3",
                  input="Who?\nAnd her sister?\n")
    assert result.exit_code == 0, result.output
    replies = result.stdout.strip().splitlines()
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMA)


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "missing.json"], "--json-schema missing.json: cannot read it"),
    (["--json-schema", "not_json.json"], "not valid JSON"),
    (["--json-schema", "bad_schema.json"], "unsupported or invalid JSON schema: Invalid type: strin"),
    (["--regex", "("], "invalid regex"),
    (["--regex", "[^\\s\\S]"], "the regex cannot match anything"),
    (["--tools", "no_name.json"], "a tool has no name"),
    (["--tools", "tools.json", "--tool-choice", "get_time"], "'get_time', which is not among the tools"),
    (["--tool-choice", "auto"], "tool_choice and parallel_tool_calls need tools"),
    (["--regex", "a", "--json-schema", "schema.json"], "pass only one of"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_constraints_are_one_line_errors(files, monkeypatch, args, message, command):
    monkeypatch.chdir(files)
    result = _run(command, *(["Hi"] if command == "generate" else []), *args, input="Hi\n")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output
