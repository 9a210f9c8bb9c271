"""The `afm-mlx` command line: thin typer wrappers over library functions whose parameters match the flags.

Bad input ends in exactly one line on stderr, never a traceback (`_OneLineErrors`, the one place that decides):
- `error: ...` and exit code 1 for a bad file or value: AFMError, OSError (missing, unreadable, a device file),
  UnicodeError (text that is not UTF-8);
- `error: ... (see `afm-mlx CMD --help`)` and exit code 2 for a usage error click finds (an unknown option,
  `--temp hot`, `-n abc`).
Warnings are one `warning: ...` line each.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors

from .errors import AFMError

# Exception classes that mean "bad input" wherever they come from (a library call may raise them unwrapped).
EXPECTED_ERRORS = (AFMError, OSError, UnicodeError)
_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())  # click >= 8.2 only
USAGE_EXIT_CODE = 2  # click's convention, kept: scripts can tell a mistyped command line from bad data


def _error_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message held
    return f"error: {text}"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (an untrained adapter, a hyphenated name) as one `warning:` line, without Python's source line."""
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


class _OneLineErrors(TyperGroup):
    """Runs a command and turns expected errors into one stderr line (see the module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with warnings.catch_warnings():  # restores Python's own display afterwards
                warnings.showwarning = _warning_line
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as err:
            typer.echo(err.ctx.get_help(), err=True)
            code = USAGE_EXIT_CODE
        except click_errors.UsageError as err:
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            typer.echo(_error_line(err.format_message()) + where, err=True)
            code = USAGE_EXIT_CODE
        except click_errors.ClickException as err:
            typer.echo(_error_line(err.format_message()), err=True)
            code = err.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        except EXPECTED_ERRORS as err:
            typer.echo(_error_line(err), err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Run Apple's on-device foundation model (AFMTextV7), its draft model and adapters with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """afm-mlx: Apple's on-device foundation model on MLX. See each command's --help."""


# ---- commands (one block each; keep them thin) ----


@app.command()
def bench(
    full: bool = typer.Option(False, "--full", help="Also the full-size 3B base + 48.8M draft with synthetic "
                                                    "on-grid weights (2-bit g128, 4-bit embeddings): speed and "
                                                    "memory only; slow on a CPU."),
    demo: bool = typer.Option(True, "--demo/--no-demo", help="The demo family on held-out real text."),
    model: Optional[Path] = typer.Option(None, "--model", help="Benchmark this converted model directory (and its "
                                                               "draft/) instead of the demo family."),
    tiny: bool = typer.Option(False, "--tiny", help="Only a tiny random model: a seconds-long smoke run."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt texts: .txt (blank-line separated) or .json list."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: benchmarks/results/<backend>-<device>)."),
    trials: Optional[int] = typer.Option(None, help="Timed runs per setting (medians are reported)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed warm-up runs per setting."),
    max_tokens: Optional[int] = typer.Option(None, help="Tokens generated per decode run."),
    prompt_lengths: Optional[str] = typer.Option(None, help="Prefill/TTFT prompt lengths, e.g. 32,128,512."),
    decode_prompt_length: Optional[int] = typer.Option(None, help="Prompt length before decode runs."),
    ks: Optional[str] = typer.Option(None, "--ks", help="Draft lengths for speculative decoding, e.g. 1-8 or 2,4."),
    temperatures: Optional[str] = typer.Option(None, help="Sampling temperatures, e.g. 0,0.7."),
    engines: Optional[str] = typer.Option(None, help="afm-mlx,mlx-lm (default both, side by side)."),
    adapter: Optional[bool] = typer.Option(None, "--adapter/--no-adapter", help="Decode with a random LoRA adapter "
                                                                              "vs none (afm-mlx)."),
    guided: Optional[bool] = typer.Option(None, "--guided/--no-guided", help="Decode under a JSON schema vs free "
                                                                          "(afm-mlx; workloads with a tokenizer): "
                                                                          "speed ratio, mask cost, acceptance."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="PNG plots (needs matplotlib)."),
    time_budget: Optional[float] = typer.Option(None, help="Seconds per workload; a speculative setting (or the adapter "
                                                           "run) that would end past it is skipped, and listed."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Speculative decoding at these controlled acceptance "
                                         "rates, e.g. 0.6,0.7,0.8,0.9 (the --full default): real draft and verify "
                                         "forwards, each proposal the base's own greedy token with probability "
                                         "alpha; with the cost model it implies."),
    controlled_ks: Optional[str] = typer.Option(None, "--controlled-ks", help="Draft lengths for --alphas "
                                                                              "(default 2-6)."),
):
    """Benchmark afm-mlx against mlx-lm's afm7 on the same weights: prefill/TTFT, decode, speculative k sweep,
    acceptance by draft position, memory, KV bytes, roofline; writes JSON, markdown and PNG plots.

    Defaults per workload and backend are sized to finish in minutes (see afm_mlx.bench.default_config).
    """
    from .bench import parse_floats, parse_ints, run_workloads

    names = ["tiny"] if tiny else (["model"] if model else ["demo"] if demo else []) + (["full"] if full else [])
    if not names:
        raise AFMError("nothing to benchmark: --no-demo needs --full or --model")
    overrides = {"trials": trials, "warmup": warmup, "max_tokens": max_tokens,
                 "decode_prompt_length": decode_prompt_length,
                 "prompt_lengths": parse_ints(prompt_lengths, "--prompt-lengths") if prompt_lengths else None,
                 "ks": parse_ints(ks, "--ks") if ks else None,
                 "temperatures": parse_floats(temperatures, "--temperatures") if temperatures else None,
                 "engines": [e.strip() for e in engines.split(",")] if engines else None, "adapter": adapter,
                 "guided": guided, "time_budget_s": time_budget,
                 "controlled_alphas": parse_floats(alphas, "--alphas") if alphas else None,
                 "controlled_ks": parse_ints(controlled_ks, "--controlled-ks") if controlled_ks else None}
    run_workloads(names, model_dir=model, prompts=prompts, out_dir=out, plots=plots, overrides=overrides)


_MODEL_HELP = ("Model directory from `afm-mlx convert` (default: the embedded small demo model, trained by this "
               "project on Jane Austen's novels; not Apple's weights).")
_DRAFT_HELP = "Draft model directory for speculative decoding (default: MODEL/draft when it exists)."
_TEMP_HELP = ("Sampling temperature; 0 = greedy (the default: the same prompt gives the same text, which is what "
              "evaluating a model or adapter needs, and speculative decoding gains most). The toolkit's generate.py "
              "samples with --temp 1.0 --top-k 50.")


def _generation_options(max_tokens, temp, top_k, top_p, min_p, repetition_penalty, seed, num_draft_tokens,
                        adaptive_draft, stop, max_context) -> dict:
    return dict(max_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, num_draft_tokens=num_draft_tokens,
                adaptive_draft=adaptive_draft, stop=stop or None, max_context=max_context)


_JSON_SCHEMA_HELP = ("Guided JSON: a file holding a JSON schema (or an OpenAI/toolkit response_format object); "
                     "every token is drawn inside it, and the schema is shown to the model as the toolkit does.")
_REGEX_HELP = "Guided text: the answer is a full match of this regular expression."
_GRAMMAR_HELP = "Guided text: a file holding a Lark grammar (llguidance's dialect) the answer must follow."
_TOOLS_HELP = ("Tool calling: a JSON file with a list of tools [{\"type\": \"function\", \"function\": {\"name\", "
               "\"description\", \"parameters\"}}]; a call is written as the toolkit's <executable_start> block, its "
               "arguments drawn inside the tool's parameter schema.")
_TOOL_CHOICE_HELP = "With --tools: auto (text or calls), required (calls), none (text only) or a tool's name."
_PARALLEL_HELP = "With --tools: allow several calls in one reply (--one-tool-call: at most one)."


def _guided(json_schema, regex, grammar, tools, tool_choice, parallel_tool_calls) -> dict:
    from .frontend import guided_options

    return guided_options(str(json_schema) if json_schema else None, regex, str(grammar) if grammar else None,
                          str(tools) if tools else None, tool_choice, parallel_tool_calls)


_ADAPTER_HELP = ("LoRA adapter to generate with: a toolkit checkpoint (adapter-final.pt), a .fmadapter package or "
                 "an mlx-lm adapter dir; applied at runtime on the (quantized) base.")
_SIGNATURE_HELP = "Load a .fmadapter whose baseModelSignature is not toolkit 26.0.0's base."


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The user message (or, with --raw, the exact text); read "
                                                      "from stdin when omitted."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    draft: Optional[Path] = typer.Option(None, "--draft", help=_DRAFT_HELP),
    no_draft: bool = typer.Option(False, "--no-draft", help="Plain decoding, even when a draft is available."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (default: the toolkit's)."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: continue the prompt text as it is."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", "-t", help=_TEMP_HELP),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Keep the most likely tokens up to this mass, in (0, 1]."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="CTRL penalty over the last 20 "
                                                                               "tokens (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text."),
    num_draft_tokens: int = typer.Option(4, "--num-draft-tokens", "-k", help="Tokens the draft proposes per "
                                                                            "verify step (the maximum with "
                                                                            "--adaptive-draft)."),
    adaptive_draft: bool = typer.Option(False, "--adaptive-draft", help="Pick the draft length per step from the "
                                                                        "running acceptance rate."),
    stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable); EOS and <turn_end> "
                                                      "always stop."),
    max_context: int = typer.Option(4096, "--max-context", help="Context limit: prompt + generated tokens."),
    stats: bool = typer.Option(False, "--stats", help="Print token counts, speeds, memory and draft acceptance "
                                                      "to stderr."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    allow_signature_mismatch: bool = typer.Option(False, help=_SIGNATURE_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help=_JSON_SCHEMA_HELP),
    regex: Optional[str] = typer.Option(None, "--regex", help=_REGEX_HELP),
    grammar: Optional[Path] = typer.Option(None, "--grammar", help=_GRAMMAR_HELP),
    tools: Optional[Path] = typer.Option(None, "--tools", help=_TOOLS_HELP),
    tool_choice: Optional[str] = typer.Option(None, "--tool-choice", help=_TOOL_CHOICE_HELP),
    parallel_tool_calls: bool = typer.Option(True, "--parallel-tool-calls/--one-tool-call", help=_PARALLEL_HELP),
):
    """Generate a reply to PROMPT, streamed to stdout; speculative decoding with the draft when there is one.

    The output follows the base model's distribution exactly with or without the draft (greedy: the same text).
    Guided generation (--json-schema, --regex, --grammar, --tools) draws every token inside the constraint, with
    or without the draft; an answer the token budget cuts short is printed and reported as incomplete (exit 1).
    """
    from .frontend import run_generate

    options = _generation_options(max_tokens, temp, top_k, top_p, min_p, repetition_penalty, seed,
                                  num_draft_tokens, adaptive_draft, stop, max_context)
    options.update(system=system, raw=raw)
    options.update(_guided(json_schema, regex, grammar, tools, tool_choice, parallel_tool_calls))
    run_generate(prompt, model_dir=model, draft_dir=draft, no_draft=no_draft, show_stats=stats,
                 options=options, stdin=sys.stdin, out=sys.stdout, err=sys.stderr,
                 adapters=[str(adapter)] if adapter else [], allow_signature_mismatch=allow_signature_mismatch)


@app.command()
def chat(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    draft: Optional[Path] = typer.Option(None, "--draft", help=_DRAFT_HELP),
    no_draft: bool = typer.Option(False, "--no-draft", help="Plain decoding, even when a draft is available."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (default: the toolkit's)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    temp: float = typer.Option(0.0, "--temp", "-t", help=_TEMP_HELP),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Keep the most likely tokens up to this mass, in (0, 1]."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="CTRL penalty (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    num_draft_tokens: int = typer.Option(4, "--num-draft-tokens", "-k", help="Draft tokens per verify step."),
    adaptive_draft: bool = typer.Option(False, "--adaptive-draft", help="Adapt the draft length."),
    max_context: int = typer.Option(4096, "--max-context", help="Context limit of the whole conversation."),
    stats: bool = typer.Option(False, "--stats", help="Print each reply's stats to stderr."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH (or PATH), repeatable: adapters kept "
                                                            "loaded over one base; the first is active, "
                                                            "`/adapter NAME|none` switches."),
    allow_signature_mismatch: bool = typer.Option(False, help=_SIGNATURE_HELP),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help=_JSON_SCHEMA_HELP),
    regex: Optional[str] = typer.Option(None, "--regex", help=_REGEX_HELP),
    grammar: Optional[Path] = typer.Option(None, "--grammar", help=_GRAMMAR_HELP),
    tools: Optional[Path] = typer.Option(None, "--tools", help=_TOOLS_HELP),
    tool_choice: Optional[str] = typer.Option(None, "--tool-choice", help=_TOOL_CHOICE_HELP),
    parallel_tool_calls: bool = typer.Option(True, "--parallel-tool-calls/--one-tool-call", help=_PARALLEL_HELP),
):
    """Multi-turn chat in the terminal, one message per line (/reset, /exit). The KV cache is kept across turns:
    each turn prefills only its own new tokens."""
    from .frontend import run_chat

    options = _generation_options(max_tokens, temp, top_k, top_p, min_p, repetition_penalty, seed,
                                  num_draft_tokens, adaptive_draft, None, max_context)
    options.update(_guided(json_schema, regex, grammar, tools, tool_choice, parallel_tool_calls))
    run_chat(model_dir=model, draft_dir=draft, no_draft=no_draft, show_stats=stats, system=system,
             options=options, stdin=sys.stdin, out=sys.stdout, err=sys.stderr, adapters=adapter,
             allow_signature_mismatch=allow_signature_mismatch)


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH (or PATH), repeatable: served as model "
                                                            "`afm:NAME` next to the base `afm`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="AFM_MLX_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1 (or AFM_MLX_API_KEY)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most sequences decoded in one step."),
    max_queue: int = typer.Option(64, "--max-queue", help="Most requests waiting for a row; more get 429."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Cap on max_tokens of one request."),
    max_context: int = typer.Option(4096, "--max-context", help="Context limit: prompt + generated tokens."),
    prefix_cache_mb: int = typer.Option(256, "--prefix-cache-mb", help="K/V of shared prompt prefixes kept (MiB)."),
    shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout", help="Seconds running requests get to "
                                                                            "finish after SIGTERM."),
    num_draft_tokens: int = typer.Option(0, "--num-draft-tokens", "-k", help="Speculative decoding in the batch: "
                                         "k draft tokens a round for requests that do not set `num_draft_tokens` "
                                         "(0: plain decoding). Pays where verifying "
                                         "k + 1 rows costs about one step (GPUs), not on a CPU."),
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics) with continuous batching: concurrent requests share one decode step."""
    from .server import ServerConfig, serve as run_server

    config = ServerConfig(api_key=api_key, max_tokens_cap=max_tokens, max_context=max_context,
                          num_draft_tokens=num_draft_tokens)
    run_server(model_dir=model, adapters=adapter, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
               prefix_cache_mb=prefix_cache_mb, shutdown_timeout=shutdown_timeout, config=config)
    # Shut down cleanly; skip the C++ static destructors, which abort on the engine thread's thread-local MLX
    # streams ("terminate called without an active exception", exit -6) after the thread has ended.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command("export-adapter")
def export_adapter(
    adapter: Path = typer.Argument(..., help="Adapter: toolkit checkpoint (adapter-final.pt), .fmadapter package "
                                             "or mlx-lm adapter dir."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where NAME.fmadapter (or NAME/, NAME.pt) goes."),
    name: str = typer.Option(..., "--name", "-n", help="Adapter name; the .fmadapter id is fmadapter-NAME-<sig[:7]>."),
    model: Optional[Path] = typer.Option(None, help="Converted model dir whose config.json gives the base's shapes "
                                                    "(default: the 3B base)."),
    to: str = typer.Option("fmadapter", help="Output format: fmadapter (fp16, for Apple devices), mlx-lm or pt."),
    author: str = typer.Option("3P developer", help="metadata.json author."),
    description: str = typer.Option("", help="metadata.json description."),
    license: str = typer.Option("", help="metadata.json license."),
    base_signature: str = typer.Option("9799725ff8e851184037110b422d891ad3b92ec1",
                                       help="baseModelSignature to write (toolkit 26.0.0's by default)."),
    draft_token_count: int = typer.Option(5, help="speculativeDecodingDraftTokenCount to write."),
    allow_signature_mismatch: bool = typer.Option(False, help="Read a .fmadapter made for another base anyway."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
):
    """Convert an adapter between formats; by default write a .fmadapter package as Apple's toolkit exporter does.

    The .fmadapter holds fp16 weights (transposed, Q/K rows in the device's RoPE order) and metadata.json; it is
    written to a temporary sibling and renamed when complete.
    """
    from .adapters import export_adapter as run_export

    meta = dict(author=author, description=description, license=license, base_signature=base_signature,
                draft_token_count=draft_token_count) if to == "fmadapter" else {}
    path = run_export(adapter, output_dir, name, model=model, to=to, overwrite=overwrite,
                      allow_signature_mismatch=allow_signature_mismatch, **meta)
    typer.echo(f"wrote {path}")


@app.command()
def convert(
    paths: list[Path] = typer.Argument(..., metavar="[TOOLKIT_DIR] OUT_DIR", show_default=False,
                                       help="The toolkit directory (assets/base-model.pt, draft-model.pt, "
                                            "tokenizer.model, or those files at its top level), then the output."),
    base: Optional[Path] = typer.Option(None, help="Base checkpoint (.pt), instead of TOOLKIT_DIR's."),
    draft: Optional[Path] = typer.Option(None, help="Draft checkpoint, e.g. draft-model-final.pt."),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.model, instead of TOOLKIT_DIR's."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    recipe: str = typer.Option("auto", help="auto: per tensor the lowest bits / largest group that reproduce the "
                                            "weights exactly, else the settings below; lossy: the settings below."),
    bits: int = typer.Option(2, help="Linear weights: 2, 3, 4, 8 (affine), 16 (float16) or 32 (float32)."),
    group_size: int = typer.Option(128, help="Quantization group size: 32, 64 or 128."),
    embedding_bits: int = typer.Option(4, help="Tied embedding / output head bits."),
    embedding_group_size: int = typer.Option(32, help="Tied embedding group size."),
    draft_bits: Optional[int] = typer.Option(None, help="Draft linear bits where its weights are on no exact grid (default: --bits, at least 4 as in Apple's own draft export)."),
    draft_group_size: Optional[int] = typer.Option(None, help="Draft group size (default: --group-size)."),
    draft_embedding_bits: Optional[int] = typer.Option(None, help="Draft embedding bits (default: --embedding-bits)."),
    draft_embedding_group_size: Optional[int] = typer.Option(None, help="Draft embedding group size."),
    override: list[str] = typer.Option([], help="PATTERN=BITS[:GROUP] for matching modules, e.g. "
                                                "'model.layers.*.mlp.down_proj=4:64'; repeatable."),
    draft_override: list[str] = typer.Option([], help="Like --override, for the draft."),
    rope_theta: float = typer.Option(500000.0, help="RoPE base written to config.json (tamm default)."),
    draft_rope_theta: Optional[float] = typer.Option(None, help="Draft RoPE base (default: --rope-theta)."),
):
    """Convert Apple adapter-toolkit checkpoints into an MLX model directory (tokenizer and draft/ included).

    Reads the .pt files without torch, one tensor at a time. Writes config.json, model*.safetensors, the tokenizer, draft/ and conversion_report.json (per tensor: storage, bits, group, errors, exact) into a temporary directory that replaces OUT_DIR only when everything succeeded.
    """
    from rich.console import Console

    from afm_mlx.converters import convert as run_convert
    from afm_mlx.converters.summary import conversion_progress, print_summary

    if len(paths) > 2:
        raise click_errors.UsageError("expected [TOOLKIT_DIR] OUT_DIR")
    source, out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    with conversion_progress(Console(stderr=True)) as progress:
        result = run_convert(
            source, out, base=base, draft=draft, tokenizer=tokenizer, force=force, recipe=recipe, bits=bits,
            group_size=group_size, embedding_bits=embedding_bits, embedding_group_size=embedding_group_size,
            draft_bits=draft_bits, draft_group_size=draft_group_size, draft_embedding_bits=draft_embedding_bits,
            draft_embedding_group_size=draft_embedding_group_size, overrides=override,
            draft_overrides=draft_override, rope_theta=rope_theta, draft_rope_theta=draft_rope_theta,
            progress=progress)
    print_summary(result, Console())


@app.command()
def info(
    preset: list[str] = typer.Option(None, "--preset", help="Presets to show (default: all): base-3b, draft-48m."),
    lora_rank: int = typer.Option(32, help="LoRA rank for the parameter count with adapter slots."),
):
    """Sizes of the model presets: layers, parameters, weight bytes per quantization, KV bytes per token."""
    from .report import presets_table

    presets_table(preset or None, lora_rank)


def main() -> None:  # pragma: no cover - console entry point
    app()
