"""The `loraforge` command: one small function per verb, each calling one module below.

Errors a user can meet (bad data, missing model, bad config) are printed as one line; only
real bugs show a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

from loraforge.console import console, err_console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LoRA fine-tuning and serving of chat LLMs, pleasant on a CPU.",
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """LoRA fine-tuning and serving of chat LLMs, pleasant on a CPU."""


def user_errors(fn: Callable) -> Callable:
    """Turn the exceptions a user can cause into one clear line and exit code 1."""
    from loraforge.errors import UserError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@user_errors
def models(
    convert: bool = typer.Option(False, help="Convert the bundled models now (done once)."),
) -> None:
    """List the bundled and cached models with their sizes."""
    from rich.table import Table

    from loraforge.models import BUNDLED, list_models, resolve_model

    if convert:
        for name in BUNDLED:
            resolve_model(name)
    table = Table("name", "kind", "size", "path")
    for m in list_models():
        table.add_row(m.name, m.kind, f"{m.size_bytes / 1e6:.0f} MB", m.path)
    console.print(table)


if __name__ == "__main__":
    app()
