"""`loraforge bench generate` (loraforge.bench.generate) and `loraforge bench train`
(loraforge.bench.train): what users get, measured against the textbook approach."""

from __future__ import annotations

from pathlib import Path

import typer

from loraforge.cli import user_errors
from loraforge.cli.options import DTYPE
from loraforge.console import console

app = typer.Typer(no_args_is_help=True, help="Measure generation and training speed.")

JSON_OUT = typer.Option(None, "--json", help="Write the results as JSON here.")
# Opt-in: a default path would write into whatever directory the command runs in.
MARKDOWN = typer.Option(None, help="Append a row to this file (e.g. docs/benchmarks.md).")


def _progress(message: str) -> None:
    console.print(f"[dim]{message}[/dim]")


@app.command("generate")
@user_errors
def bench_generate(
    model: str = typer.Option(None, help="Base model (bundled name, HF dir, .gguf)."),
    adapters: int = typer.Option(4, help="Random adapters loaded for the switch test (>= 4)."),
    max_new_tokens: int = typer.Option(128, help="Tokens generated per request."),
    streams: int = typer.Option(8, help="Concurrent streams for the aggregate figure."),
    repeats: int = typer.Option(3, help="Runs of each side (alternated); the best is kept."),
    dtype: str = DTYPE,
    json_out: str = JSON_OUT,
    markdown: str = MARKDOWN,
    against: str = typer.Option(
        None,
        help="Other servers to run side by side with `loraforge serve`: vllm,llama.cpp "
        "(each one that is installed).",
    ),
    adapter: str = typer.Option(
        None, help="With --against: every server answers through this adapter dir."
    ),
    json_schema: str = typer.Option(
        None,
        help="A JSON schema file: instead, constrained vs free decode speed in one run "
        "(1 stream each; N rows all free, one constrained, all constrained).",
    ),
) -> None:
    """Decode tokens/s (1 and N streams) vs HF generate, and adapter-switch latency."""
    from loraforge.bench.generate import append_markdown, print_result, run_bench, write_json

    if json_schema:
        return _constrained(model, json_schema, streams, max_new_tokens, dtype, json_out)
    if adapter and not against:
        raise typer.BadParameter("--adapter goes with --against (one adapter on every server)")
    if against:
        return _against(model, against, adapter, dtype, streams, max_new_tokens, json_out, markdown)
    res = run_bench(
        model, adapters, max_new_tokens, streams, dtype, repeats=repeats, progress=_progress
    )
    print_result(res)
    if json_out:
        write_json(res, Path(json_out))
    if markdown:
        append_markdown(res, Path(markdown))


def _constrained(model, schema_file: str, streams: int, max_new: int, dtype, json_out) -> None:
    import json

    from loraforge.bench.grammar import constrained_vs_free, load_schema

    res = constrained_vs_free(model, load_schema(schema_file), streams, max_new, dtype)
    console.print_json(json.dumps(res))
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")


def _against(model, against: str, adapter, dtype, streams: int, max_new: int, json_out, markdown):
    import json

    from loraforge.bench import against as ag

    sides = [s.strip() for s in against.split(",") if s.strip()]
    unknown = [s for s in sides if s not in ag.BACKENDS]
    if unknown:
        raise typer.BadParameter(f"--against {','.join(unknown)}: one of {', '.join(ag.BACKENDS)}")
    res = ag.run_against(model, sides, adapter, dtype, streams, max_new, progress=_progress)
    ag.print_against(res)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
    if markdown:
        ag.append_markdown(res, Path(markdown))


@app.command("train")
@user_errors
def bench_train(
    model: str = typer.Option("smollm2-135m", help="Base model (bundled name, HF dir, .gguf)."),
    dataset: str = typer.Option("general", help="Records to train on (a fixed, seeded sample)."),
    records: int = typer.Option(64, help="Number of records."),
    batch_size: int = typer.Option(4, help="Examples per batch (both sides)."),
    max_length: int = typer.Option(512, help="Truncate records to this many tokens."),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="loraforge side: the fast path."),
    gradient_checkpointing: bool = typer.Option(
        False, help="loraforge side: recompute activations in backward (less memory, slower)."
    ),
    quantization: str = typer.Option(
        None, help="Add a QLoRA side (nf4 | fp4 | int8): loraforge on a quantized base."
    ),
    only: str = typer.Option(None, help="Run one side only: loraforge | qlora | baseline."),
    json_out: str = JSON_OUT,
    markdown: str = MARKDOWN,
) -> None:
    """Training tokens/s, peak RSS and final loss: loraforge vs HF Trainer + PEFT."""
    from loraforge.bench.train import (
        QLORA,
        SIDES,
        TrainBenchSettings,
        bench_train,
        print_result,
        record,
    )
    from loraforge.models import QUANTIZATIONS

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise typer.BadParameter(f"--quantization: one of {', '.join(QUANTIZATIONS)}")
    if only == QLORA and quantization is None:
        raise typer.BadParameter("--only qlora needs --quantization")

    settings = TrainBenchSettings(
        model=model,
        dataset=dataset,
        records=records,
        batch_size=batch_size,
        max_length=max_length,
        fast=fast,
        gradient_checkpointing=gradient_checkpointing,
        quantization=quantization,
    )
    sides = (only,) if only else None
    if only and only not in (*SIDES, QLORA):
        raise typer.BadParameter(f"--only: one of {', '.join((*SIDES, QLORA))}")
    result = bench_train(settings, sides, progress=_progress)
    print_result(result)
    record(result, Path(json_out) if json_out else None, Path(markdown) if markdown else None)
