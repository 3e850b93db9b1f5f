"""The `loraforge` command. Each verb's code is in the module named after its group:

    models                          here
    data doctor, data distill       cli/data.py
    sft, dpo                        cli/train.py
    chat, infer, compare, eval      cli/infer.py
    merge, export gguf              cli/export.py
    serve, studio (alias webui)     cli/serve.py
    bench generate, bench train     cli/bench.py

Each verb is a short function calling one module below. Flags that set a config object's
fields (``SFTConfig``, ``SamplingOptions``) are generated from its fields by cli/options.py.

Errors a user can meet (bad data, missing model, bad config) are printed as one line; only
real bugs show a traceback. Heavy modules (torch, transformers) are imported inside the verbs,
so ``--help`` and ``data doctor`` start fast.
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
    from loraforge.console import quiet_libraries

    quiet_libraries()


def user_errors(fn: Callable) -> Callable:
    """Turn the exceptions a user can cause into one clear line and exit code 1."""
    from rich.markup import escape

    from loraforge.errors import UserError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:  # escaped: "[webui]" or a path with brackets is text, not markup
            err_console.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@user_errors
def models(
    convert: bool = typer.Option(
        False, help="Convert the installed bundled models now (done once)."
    ),
) -> None:
    """List the bundled and cached models with their sizes (a missing one: how to install it)."""
    from rich.table import Table

    from loraforge.models import list_models, resolve_model

    if convert:  # opt-in models whose packages are not installed are listed, not an error
        for m in list_models():
            if m.kind == "bundled, not converted yet":
                resolve_model(m.name)
    table = Table("name", "kind", "size", "path or install command")
    models = list_models()
    for m in models:
        table.add_row(m.name, m.kind, f"{m.size_bytes / 1e6:.0f} MB", m.path)
    console.print(table)
    for m in models:
        if m.note:
            console.print(f"{m.name}: {m.note}")
    from loraforge.cpu.families import FAMILIES, engine_path

    # what chat/serve/eval run per architecture: the generic path is slower, never a refusal
    paths = Table("family (config model_type)", "engine path")
    for model_type in FAMILIES:
        paths.add_row(model_type, engine_path(model_type))
    paths.add_row("any other causal LM", "generic (transformers' forward)")
    console.print(paths)


# The verb modules use `user_errors` from here, so they are imported once it exists. Each has its
# own typer app: a group (`data`, `bench`) is added under its name, the others' verbs at the top.
from loraforge.cli import bench, data, export, infer, serve, train  # noqa: E402

app.add_typer(data.app, name="data")
for verbs in (train, infer, export, serve):
    app.add_typer(verbs.app)
app.add_typer(bench.app, name="bench")
