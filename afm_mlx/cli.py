"""The `afm-mlx` command line: thin typer wrappers over library functions whose parameters match the flags.

Each command catches AFMError and prints it as a single line (exit code 1); see `_fail`.
"""

from __future__ import annotations

import sys

import typer

from .errors import AFMError

app = typer.Typer(
    help="Run Apple's on-device foundation model (AFMTextV7), its draft model and adapters with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """afm-mlx: Apple's on-device foundation model on MLX. See each command's --help."""


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


# ---- commands (one block each; keep them thin) ----


@app.command()
def info(
    preset: list[str] = typer.Option(None, "--preset", help="Presets to show (default: all): base-3b, draft-48m."),
    lora_rank: int = typer.Option(32, help="LoRA rank for the parameter count with adapter slots."),
):
    """Sizes of the model presets: layers, parameters, weight bytes per quantization, KV bytes per token."""
    from .report import presets_table

    try:
        presets_table(preset or None, lora_rank)
    except AFMError as err:
        _fail(err)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except AFMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
