"""The terminal front ends of the engine: `afm-mlx generate` and `afm-mlx chat` (loading, option checks, printing
the stream, the chat loop). Decoding itself lives in afm_mlx.generation; the server (afm_mlx.server) is the other
front end over the same engine.
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

from .adapters import active_adapter, list_adapters, load_adapter, set_active_adapter
from .errors import AFMError
from .generation import ChatSession, GenerationResponse, _check_positive_int, stream_generate
from .model import Model
from .sampling import SamplingParams


def load_for_generation(model_dir: str | None, draft_dir: str | None, no_draft: bool,
                        adapters: Sequence[str] = (), allow_signature_mismatch: bool = False):
    """(model, tokenizer) for the CLI: the embedded demo model by default, its `draft/` unless told otherwise.

    adapters: `PATH` or `NAME=PATH` specs, all loaded (base weights stay shared), the first one active.
    """
    from pathlib import Path

    from .loading import DEMO_MODEL_DIR, load

    root = Path(model_dir) if model_dir is not None else DEMO_MODEL_DIR
    if model_dir is None and not (root / "config.json").is_file():
        raise AFMError(f"the embedded demo model is not installed ({root} is missing): pass --model DIR "
                       "(a directory written by `afm-mlx convert`)")
    if no_draft and draft_dir is not None:
        raise AFMError("--draft and --no-draft exclude each other")
    if draft_dir is not None and not Path(draft_dir).is_dir():
        raise AFMError(f"draft directory not found: {draft_dir}")
    model, tokenizer = load(root, draft=False if no_draft else draft_dir)  # None: MODEL/draft when present
    names = [load_adapter(model, path, name, allow_signature_mismatch=allow_signature_mismatch)
             for name, path in map(parse_adapter_spec, adapters)]
    if names:
        set_active_adapter(model, names[0])
    return model, tokenizer


def parse_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a bare `PATH` -> (None, PATH): the name comes from the file name."""
    name, sep, path = spec.partition("=")
    if not sep:
        return None, spec
    if not name or not path:
        raise AFMError(f"--adapter {spec!r}: expected NAME=PATH or PATH")
    return name, path


def print_stream(responses: Iterator[GenerationResponse], out, err, show_stats: bool) -> GenerationResponse | None:
    """Write the text to `out` as it comes (flushed), a final newline, and the stats to `err` if asked.

    Returns the last response (its stats, and for a guided answer what it means); AFMError after printing when a
    guided answer was cut short (its text is incomplete JSON, a regex match not yet whole, ...).
    """
    text_end, last = "\n", None
    for response in responses:
        if response.text:
            out.write(response.text)
            out.flush()
            text_end = response.text[-1]
        last = response if response.stats is not None else last
    if text_end != "\n":
        out.write("\n")
    out.flush()  # before the stats: on a terminal stdout and stderr interleave
    if show_stats and last is not None:
        err.write(last.stats.summary() + "\n")
    if last is not None and last.guided is not None and last.guided.incomplete:
        raise AFMError(f"{last.guided.incomplete} (raise --max-tokens or --max-context)")
    return last


def guided_options(json_schema: str | None = None, regex: str | None = None, grammar: str | None = None,
                   tools: str | None = None, tool_choice: str | None = None,
                   parallel_tool_calls: bool = True) -> dict:
    """stream_generate's guided options from the CLI's flags: the files read, their JSON parsed (one-line errors).

    --json-schema FILE holds a JSON schema or a whole response_format ({'type': 'json_schema', ...}); --tools FILE
    a list of tools (or {'tools': [...]}); --tool-choice is auto, required, none or a tool's name.
    """
    options: dict = {}
    if json_schema is not None:
        value = _read_json(json_schema, "--json-schema")
        key = "response_format" if isinstance(value, dict) and value.get("type") == "json_schema" else "schema"
        options[key] = value
    if regex is not None:
        options["regex"] = regex
    if grammar is not None:
        options["grammar"] = _read_text(grammar, "--grammar")
    if tools is not None:
        value = _read_json(tools, "--tools")
        options["tools"] = value.get("tools") if isinstance(value, dict) else value
    if tool_choice is not None:
        options["tool_choice"] = tool_choice if tool_choice in ("auto", "required", "none") else \
            {"type": "function", "function": {"name": tool_choice}}
    if not parallel_tool_calls:
        options["parallel_tool_calls"] = False
    return options


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise AFMError(f"{flag} {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None


def _read_json(path: str, flag: str):
    try:
        return json.loads(_read_text(path, flag))
    except (json.JSONDecodeError, RecursionError) as err:
        raise AFMError(f"{flag} {path}: not valid JSON ({getattr(err, 'msg', 'nested too deeply')})") from None


def chat_loop(session: ChatSession, lines: Iterator[str], out, err, show_stats: bool, interactive: bool) -> None:
    """One user message per line; `/reset` forgets the conversation, `/adapter NAME|none` switches adapters
    (the conversation stays; its K/V are recomputed under the new adapter), `/exit` (or end of input) leaves.

    An AFMError in a turn (e.g. the conversation outgrew the context) is printed and the chat goes on.
    """
    prompt = lambda: err.write("> ") if interactive else None  # noqa: E731
    prompt()
    for line in lines:
        message = line.rstrip("\n")
        if message.strip() == "/exit":
            return
        if message.strip() == "/reset":
            session.reset()
        elif message.startswith("/adapter"):
            switch_adapter(session.model, message[len("/adapter"):].strip(), err)
        elif message.strip():
            try:
                print_stream(session.send(message), out, err, show_stats)
            except AFMError as e:
                err.write(f"error: {e}\n")
        prompt()


def switch_adapter(model: Model, name: str, err) -> None:
    """The chat's `/adapter NAME` (or `none`): a warm switch, the base weights stay where they are."""
    loaded = list_adapters(model)
    try:
        set_active_adapter(model, None if name in ("", "none") else name)
        err.write(f"adapter: {active_adapter(model) or 'none'} (loaded: {', '.join(loaded) or 'none'})\n")
    except AFMError as e:
        err.write(f"error: {e}\n")


def check_options(options: dict) -> None:
    """Validate generation options before a model is loaded (bad flags fail fast, with one line)."""
    sampling = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    SamplingParams(**{name: options[name] for name in sampling if name in options})
    for name in ("max_tokens", "max_context", "num_draft_tokens"):
        if name in options:
            _check_positive_int(name, options[name])


def read_prompt(prompt: str | None, stdin) -> str:
    """The PROMPT argument, or stdin when it is piped (one trailing newline dropped)."""
    if prompt is not None:
        return prompt
    if stdin.isatty():
        raise AFMError("no prompt: pass it as an argument or pipe it on stdin")
    text = stdin.read()
    return text[:-1] if text.endswith("\n") else text


def run_generate(prompt: str | None, *, model_dir, draft_dir, no_draft: bool, show_stats: bool, options: dict,
                 stdin, out, err, adapters: Sequence[str] = (), allow_signature_mismatch: bool = False) -> None:
    """`afm-mlx generate`: validate, load, stream the text to `out` and the stats to `err`."""
    check_options(options)
    prompt = read_prompt(prompt, stdin)
    if not prompt.strip():
        raise AFMError("the prompt is empty")
    model, tokenizer = load_for_generation(model_dir, draft_dir, no_draft, adapters, allow_signature_mismatch)
    print_stream(stream_generate(model, tokenizer, prompt, **options), out, err, show_stats)


def run_chat(*, model_dir, draft_dir, no_draft: bool, show_stats: bool, system: str | None, options: dict,
             stdin, out, err, adapters: Sequence[str] = (), allow_signature_mismatch: bool = False) -> None:
    """`afm-mlx chat`: a multi-turn conversation over stdin lines, replies streamed to `out`."""
    check_options(options)
    model, tokenizer = load_for_generation(model_dir, draft_dir, no_draft, adapters, allow_signature_mismatch)
    session = ChatSession(model, tokenizer, system=system, **options)
    interactive = stdin.isatty()
    if interactive:
        err.write("Chat with the model: one message per line; /reset starts over, /adapter NAME|none "
                  "switches adapters, /exit or Ctrl-D leaves.\n")
    chat_loop(session, iter(stdin.readline, ""), out, err, show_stats, interactive)
