"""`loraforge data doctor` (loraforge.data.doctor) and `loraforge data distill`
(loraforge.data.distill)."""

from __future__ import annotations

import typer

from loraforge.cli import user_errors
from loraforge.cli.options import ADAPTER, DTYPE, MODEL, STRICT, model_options
from loraforge.config import SamplingOptions
from loraforge.console import console

app = typer.Typer(no_args_is_help=True, help="Check and prepare datasets.")


@app.command("doctor")
@user_errors
def data_doctor(
    paths: list[str] = typer.Argument(..., help="Dataset files or directories (or 'selfcog')."),
    all_problems: bool = typer.Option(False, "--all", help="List every problem, not 20 a file."),
) -> None:
    """Check dataset files: formats found, each bad record as file:line, and a summary."""
    from loraforge.data.doctor import doctor

    code = doctor(paths, echo=typer.echo, limit=None if all_problems else 20)
    raise typer.Exit(code)


# Distilled answers should be the model's typical ones, and fit a training row.
DISTILL_SAMPLING = {"temperature": 0.3, "max_new_tokens": 384, "seed": 0}


@app.command("distill")
@user_errors
@model_options(SamplingOptions, into="sampling", defaults=DISTILL_SAMPLING)
def data_distill(
    output: str = typer.Option(..., help="Training file to write (.jsonl)."),
    questions: str = typer.Option(None, help="Questions (any infer format; default: built-in)."),
    model: str = MODEL,
    adapter: str = ADAPTER,
    format: str = typer.Option("messages", "--format", help="messages | alpaca"),
    keep_truncated: bool = typer.Option(False, help="Keep answers cut by --max-new-tokens."),
    batch_size: int = typer.Option(8, help="Prompts generated together."),
    strict: bool = STRICT,
    *,
    sampling: SamplingOptions,
    dtype: str = DTYPE,
) -> None:
    """Self-distillation: the model's own answers to general questions, as a training file."""
    from loraforge.data.distill import distill
    from loraforge.infer.engine import open_engine

    engine, name = open_engine(model, adapter, dtype)
    with engine:
        s = distill(
            engine,
            output,
            sampling.to_params(),
            questions=questions,
            adapter=name,
            fmt=format,
            keep_truncated=keep_truncated,
            batch_size=batch_size,
            strict=strict,
        )
    console.print(
        f"{s.written} of {s.questions} answers written to {output} "
        f"({s.truncated} hit --max-new-tokens, {s.empty} empty)"
    )
