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


data_app = typer.Typer(no_args_is_help=True, help="Check and prepare datasets.")
app.add_typer(data_app, name="data")


@data_app.command("doctor")
@user_errors
def data_doctor(
    paths: list[str] = typer.Argument(..., help="Dataset files or directories (or 'selfcog')."),
    all_problems: bool = typer.Option(False, "--all", help="List every problem, not 20 a file."),
) -> None:
    """Check dataset files: formats found, each bad record as file:line, and a summary."""
    from loraforge.data.doctor import doctor

    code = doctor(paths, echo=typer.echo, limit=None if all_problems else 20)
    raise typer.Exit(code)


@app.command()
@user_errors
def sft(
    config: str = typer.Option(None, "--config", help="YAML file with the fields of the flags."),
    model: str = typer.Option(None, help="Base model: bundled name, HF dir or .gguf file."),
    dataset: list[str] = typer.Option(None, help="Dataset file/dir, or 'selfcog' (repeatable)."),
    val_dataset: list[str] = typer.Option(None, help="Validation dataset (repeatable)."),
    val_split: float = typer.Option(None, help="Fraction held out for validation (seeded)."),
    template: str = typer.Option(None, help="Chat template: 'chatml', a file or Jinja text."),
    system: str = typer.Option(None, help="System prompt for conversations without one."),
    max_length: int = typer.Option(None, help="Truncate examples to this many tokens."),
    model_name: str = typer.Option(None, help="Name the selfcog set teaches."),
    model_author: str = typer.Option(None, help="Author the selfcog set teaches."),
    output: str = typer.Option(None, help="Output dir (adapter, checkpoints, metrics)."),
    lora_rank: int = typer.Option(None),
    lora_alpha: float = typer.Option(None),
    lora_dropout: float = typer.Option(None),
    target_modules: str = typer.Option(None, help="all-linear | q_proj,v_proj | a regex."),
    use_rslora: bool = typer.Option(None, "--use-rslora/--no-use-rslora"),
    use_dora: bool = typer.Option(None, "--use-dora/--no-use-dora"),
    learning_rate: float = typer.Option(None),
    weight_decay: float = typer.Option(None),
    lr_scheduler: str = typer.Option(None, help="cosine | linear | constant"),
    warmup_ratio: float = typer.Option(None),
    batch_size: int = typer.Option(None),
    grad_accum: int = typer.Option(None),
    max_grad_norm: float = typer.Option(None),
    epochs: float = typer.Option(None),
    max_steps: int = typer.Option(None, help="Optimizer steps; overrides --epochs."),
    seed: int = typer.Option(None),
    gradient_checkpointing: bool = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing"
    ),
    fast: bool = typer.Option(None, "--fast/--no-fast", help="--no-fast: plain fp32 padded."),
    pack_length: int = typer.Option(None, help="Longest packed row (tokens)."),
    logging_steps: int = typer.Option(None),
    eval_steps: int = typer.Option(None),
    save_steps: int = typer.Option(None),
    save_total_limit: int = typer.Option(None, help="Checkpoints kept (plus the best)."),
    resume: bool = typer.Option(None, "--resume", help="Resume from the newest checkpoint."),
    resume_from: str = typer.Option(None, help="Resume from this checkpoint dir."),
    overwrite: bool = typer.Option(None, "--overwrite", help="Discard earlier checkpoints."),
) -> None:
    """Fine-tune a LoRA adapter on chat data (flags override --config)."""
    flags = dict(locals())  # first statement: exactly the parameters
    from loraforge.config import load_config
    from loraforge.train.loop import run_sft

    flags.pop("config")
    flags["resume"] = flags.pop("resume_from") or flags["resume"]
    for key in ("dataset", "val_dataset"):
        flags[key] = flags[key] or None  # typer gives [] for an absent list option
    run_sft(load_config(config, **flags))


# ---- try and ship: chat, infer, compare, merge, eval (loraforge.infer.*, export.merge, evaluate)

_TEMPERATURE = typer.Option(0.7, help="Sampling temperature; 0 means greedy.")
_TOP_P = typer.Option(1.0, help="Nucleus sampling: keep the smallest set with this mass.")
_TOP_K = typer.Option(0, help="Keep the k most likely tokens; 0 turns it off.")
_MAX_NEW = typer.Option(256, help="Most tokens to generate per answer.")
_REP_PENALTY = typer.Option(1.0, help="Repetition penalty (1.0 = off).")
_SEED = typer.Option(None, help="Sampling seed (same seed, same answer).")
_DTYPE = typer.Option(
    None,
    help="Inference dtype: float32 | bfloat16 | int4 (bf16 with 4-bit weights when decoding: "
    "faster, answers differ slightly); default bfloat16.",
)
_ADAPTER = typer.Option(None, help="Adapter dir (its base model, template and system are used).")
_MODEL = typer.Option(None, help="Base model (bundled name, HF dir, .gguf); checked vs adapter.")


@app.command()
@user_errors
def chat(
    model: str = _MODEL,
    adapter: str = _ADAPTER,
    system: str = typer.Option(None, help="System prompt (default: the one used in training)."),
    query: str = typer.Option(None, "-q", "--query", help="Answer this one question and exit."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    max_new_tokens: int = _MAX_NEW,
    repetition_penalty: float = _REP_PENALTY,
    seed: int = _SEED,
    dtype: str = _DTYPE,
) -> None:
    """Chat with a model (+ adapter): a streaming REPL, or one answer with -q."""
    from loraforge.infer.chat import ChatSession, one_shot, open_engine, repl, sampling

    params = sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    engine, name = open_engine(model, adapter, dtype)
    with engine:
        session = ChatSession(engine, params, adapter=name, system=system)
        if query is not None:
            one_shot(session, query)
        else:
            repl(session)


@app.command()
@user_errors
def infer(
    input: str = typer.Option(..., "--input", help="Questions: any dataset format, or .txt."),
    output: str = typer.Option(..., "--output", help="JSONL out: input fields + response."),
    model: str = _MODEL,
    adapter: str = _ADAPTER,
    system: str = typer.Option(None, help="System prompt for records without one."),
    batch_size: int = typer.Option(8, help="Prompts generated together."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    max_new_tokens: int = _MAX_NEW,
    repetition_penalty: float = _REP_PENALTY,
    seed: int = _SEED,
    dtype: str = _DTYPE,
) -> None:
    """Answer every record of a file into JSONL (re-running resumes where it stopped)."""
    from loraforge.infer.batch import run_infer
    from loraforge.infer.chat import open_engine, sampling

    params = sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    engine, name = open_engine(model, adapter, dtype)
    with engine:
        s = run_infer(
            engine, input, output, params, adapter=name, system=system, batch_size=batch_size
        )
    console.print(
        f"{s.answered} answered, {s.skipped} already in {output} (of {s.total}); "
        f"{s.stopped_by_length} hit --max-new-tokens"
    )


@app.command()
@user_errors
def compare(
    adapter: list[str] = typer.Option(..., help="Adapter dir (repeatable: one column each)."),
    query: list[str] = typer.Option(None, "-q", "--query", help="A question (repeatable)."),
    input: str = typer.Option(None, "--input", help="A file of questions (any infer format)."),
    output: str = typer.Option(None, help="Write x.jsonl or x.md instead of a table only."),
    model: str = _MODEL,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    max_new_tokens: int = _MAX_NEW,
    repetition_penalty: float = _REP_PENALTY,
    seed: int = typer.Option(0, help="Sampling seed, the same for every column."),
    dtype: str = _DTYPE,
) -> None:
    """Base vs tuned, side by side, with the same sampling params and seed."""
    from loraforge.infer.chat import sampling
    from loraforge.infer.compare import print_table, questions_from, run_compare, write_output

    params = sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    convs = questions_from(query or [], input)
    columns, rows = run_compare(adapter, convs, params, model=model, dtype=dtype)
    print_table(columns, rows)
    if output:
        write_output(columns, rows, output)
        console.print(f"written to {output}")


@app.command()
@user_errors
def merge(
    adapter: str = typer.Option(..., help="Adapter dir to merge."),
    output: str = typer.Option(..., help="Output dir: a standalone HF model."),
    dtype: str = typer.Option("float32", help="Saved weights: float32 | bfloat16 | float16."),
    model: str = _MODEL,
    force: bool = typer.Option(False, help="Replace a non-empty output dir."),
    tolerance: float = typer.Option(None, help="Max |logit diff| accepted (default: by dtype)."),
) -> None:
    """Merge a LoRA adapter into its base model; verifies the result's logits."""
    from loraforge.export.merge import merge_adapter

    r = merge_adapter(adapter, output, dtype=dtype, model=model, force=force, tolerance=tolerance)
    console.print(
        f"merged into {r.output_dir} ({r.dtype}); max |logit diff| vs base + adapter: "
        f"{r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g}; fp32 merge {r.fp32_merge_diff:.2g}, "
        f"save/reload {r.round_trip_diff:.2g}); eos ids {r.eos_token_ids}"
    )


@data_app.command("distill")
@user_errors
def data_distill(
    output: str = typer.Option(..., help="Training file to write (.jsonl)."),
    questions: str = typer.Option(None, help="Questions (any infer format; default: built-in)."),
    model: str = _MODEL,
    adapter: str = _ADAPTER,
    format: str = typer.Option("messages", "--format", help="messages | alpaca"),
    keep_truncated: bool = typer.Option(False, help="Keep answers cut by --max-new-tokens."),
    batch_size: int = typer.Option(8, help="Prompts generated together."),
    temperature: float = typer.Option(0.3, help="Sampling temperature; 0 means greedy."),
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    max_new_tokens: int = typer.Option(384, help="Most tokens per answer."),
    repetition_penalty: float = _REP_PENALTY,
    seed: int = typer.Option(0, help="Sampling seed."),
    dtype: str = _DTYPE,
) -> None:
    """Self-distillation: the model's own answers to general questions, as a training file."""
    from loraforge.data.distill import distill
    from loraforge.infer.chat import open_engine, sampling

    params = sampling(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    engine, name = open_engine(model, adapter, dtype)
    with engine:
        s = distill(
            engine,
            output,
            params,
            questions=questions,
            adapter=name,
            fmt=format,
            keep_truncated=keep_truncated,
            batch_size=batch_size,
        )
    console.print(
        f"{s.written} of {s.questions} answers written to {output} "
        f"({s.truncated} hit --max-new-tokens, {s.empty} empty)"
    )


@app.command("eval")
@user_errors
def eval_(
    adapter: str = _ADAPTER,
    model: str = _MODEL,
    dataset: list[str] = typer.Option(None, help="Dataset for loss/perplexity (repeatable)."),
    max_length: int = typer.Option(None, help="Truncate examples (default: training's)."),
    batch_size: int = typer.Option(4, help="Examples per forward pass."),
    expect_name: str = typer.Option(None, help="Identity check: answers should contain this."),
    questions: str = typer.Option(None, help="Question file for --expect-name (default: zh+en)."),
    model_author: str = typer.Option(None, help="Fills {{AUTHOR}} in selfcog-style datasets."),
    max_new_tokens: int = typer.Option(128, help="Token limit of each identity answer."),
    temperature: float = typer.Option(0.0, help="Identity answers' temperature (0 = greedy)."),
    seed: int = _SEED,
    dtype: str = _DTYPE,
    output: str = typer.Option(None, help="Write the figures (and answers) to this JSON file."),
) -> None:
    """Loss and perplexity on a dataset; identity hit-rate with --expect-name."""
    import json
    from dataclasses import asdict

    from loraforge.errors import UserError
    from loraforge.evaluate import eval_identity, eval_loss
    from loraforge.infer.chat import open_engine, sampling

    if not dataset and not expect_name:
        raise UserError("nothing to evaluate: pass --dataset X and/or --expect-name NAME")
    report = {}
    if dataset:
        r = eval_loss(
            dataset,
            adapter=adapter,
            model=model,
            max_length=max_length,
            batch_size=batch_size,
            model_name=expect_name,
            model_author=model_author,
        )
        report["loss"] = asdict(r)
        console.print(
            f"loss {r.loss:.4f}  perplexity {r.perplexity:.3f}  "
            f"({r.tokens} assistant tokens, {r.examples} examples"
            f"{f', {r.skipped} bad records skipped' if r.skipped else ''})"
        )
    if expect_name:
        params = sampling(temperature, max_new_tokens=max_new_tokens, seed=seed)
        engine, name = open_engine(model, adapter, dtype)
        with engine:
            ident = eval_identity(engine, expect_name, params, adapter=name, questions=questions)
        report["identity"] = asdict(ident)
        tags = ", ".join(f"{t} {v:.0%}" for t, v in ident.by_tag.items())
        console.print(
            f"identity '{expect_name}': {ident.hit_rate:.0%} of {ident.questions} answers name "
            f"it{f' ({tags})' if tags else ''}; {ident.eos_rate:.0%} ended with EOS"
        )
    if output:
        with open(output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)


_SERVE_ADAPTER = typer.Option(
    [],
    "--adapter",
    help="NAME=PATH of an adapter dir (repeatable); a bare PATH is named by its dir.",
)
_SERVE_MODEL = typer.Option(
    None, "--model", help="Base model (default: the first adapter's base, else smollm2-135m)."
)


@app.command()
@user_errors
def serve(
    model: str = _SERVE_MODEL,
    adapter: list[str] = _SERVE_ADAPTER,
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    api_key: str = typer.Option(
        None, envvar="LORAFORGE_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    adapter_root: str = typer.Option(
        None, help="Dir that /v1/load_lora_adapter may load from (off without it)."
    ),
    max_tokens: int = typer.Option(4096, help="Largest max_tokens a request may ask for."),
    max_batch: int = typer.Option(8, help="Requests decoded together."),
    max_queue: int = typer.Option(256, help="Queued requests before answering 503."),
    dtype: str = _DTYPE,
) -> None:
    """OpenAI-compatible API: one base model, many adapters picked by the request's model."""
    from loraforge.serve.run import parse_adapters
    from loraforge.serve.run import serve as run_server

    run_server(
        model,
        parse_adapters(adapter),
        host=host,
        port=port,
        api_key=api_key,
        adapter_root=adapter_root,
        max_tokens_limit=max_tokens,
        max_batch=max_batch,
        max_queue=max_queue,
        dtype=dtype,
    )


@app.command()
@user_errors
def webui(
    model: str = _SERVE_MODEL,
    adapter: list[str] = _SERVE_ADAPTER,
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(7860, help="Port to bind."),
    max_batch: int = typer.Option(8, help="Requests decoded together."),
    dtype: str = _DTYPE,
) -> None:
    """A Gradio web UI: chat with an adapter picker, and a base-vs-adapters compare tab."""
    from loraforge.serve.run import parse_adapters
    from loraforge.webui.app import launch

    launch(model, parse_adapters(adapter), host=host, port=port, max_batch=max_batch, dtype=dtype)


# ---- bench: what users get, measured (loraforge.bench.*)

bench_app = typer.Typer(no_args_is_help=True, help="Measure generation and training speed.")
app.add_typer(bench_app, name="bench")


@bench_app.command("generate")
@user_errors
def bench_generate(
    model: str = typer.Option(None, help="Base model (bundled name, HF dir, .gguf)."),
    adapters: int = typer.Option(4, help="Random adapters loaded for the switch test (>= 4)."),
    max_new_tokens: int = typer.Option(128, help="Tokens generated per request."),
    streams: int = typer.Option(8, help="Concurrent streams for the aggregate figure."),
    repeats: int = typer.Option(3, help="Runs of each side (alternated); the best is kept."),
    dtype: str = _DTYPE,
    json_out: str = typer.Option(None, "--json", help="Write the results as JSON here."),
    markdown: str = typer.Option("docs/benchmarks.md", help="Append a row to this file."),
) -> None:
    """Decode tokens/s (1 and N streams) vs HF generate, and adapter-switch latency."""
    from pathlib import Path

    from loraforge.bench.generate import append_markdown, print_result, run_bench, write_json

    res = run_bench(
        model,
        adapters,
        max_new_tokens,
        streams,
        dtype,
        repeats=repeats,
        progress=lambda m: console.print(f"[dim]{m}[/dim]"),
    )
    print_result(res)
    if json_out:
        write_json(res, Path(json_out))
    if markdown:
        append_markdown(res, Path(markdown))


@bench_app.command("train")
@user_errors
def bench_train(
    model: str = typer.Option("smollm2-135m", help="Base model (bundled name, HF dir, .gguf)."),
    dataset: str = typer.Option("general", help="Records to train on (a fixed, seeded sample)."),
    records: int = typer.Option(64, help="Number of records."),
    batch_size: int = typer.Option(4),
    max_length: int = typer.Option(512),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="loraforge side: the fast path."),
    gradient_checkpointing: bool = typer.Option(
        False, help="loraforge side: recompute activations in backward (less memory, slower)."
    ),
    only: str = typer.Option(None, help="Run one side only: loraforge | baseline."),
    json_out: str = typer.Option(None, "--json", help="Write the results as JSON here."),
    markdown: str = typer.Option("docs/benchmarks.md", help="Append a row to this file."),
) -> None:
    """Training tokens/s, peak RSS and final loss: loraforge vs HF Trainer + PEFT."""
    from pathlib import Path

    from loraforge.bench.train import SIDES, TrainBenchSettings, bench_train, print_result, record

    settings = TrainBenchSettings(
        model=model,
        dataset=dataset,
        records=records,
        batch_size=batch_size,
        max_length=max_length,
        fast=fast,
        gradient_checkpointing=gradient_checkpointing,
    )
    sides = (only,) if only else SIDES
    if only and only not in SIDES:
        raise typer.BadParameter(f"--only: one of {', '.join(SIDES)}")
    result = bench_train(settings, sides, progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    print_result(result)
    record(result, Path(json_out) if json_out else None, Path(markdown) if markdown else None)


if __name__ == "__main__":
    app()
