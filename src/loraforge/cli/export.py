"""`loraforge merge` (loraforge.export.merge): an adapter folded into a standalone HF model;
`loraforge export gguf` (loraforge.export.gguf): a GGUF for llama.cpp and Ollama."""

from __future__ import annotations

import typer

from loraforge.cli import user_errors
from loraforge.cli.options import MODEL
from loraforge.console import console

app = typer.Typer()


@app.command()
@user_errors
def merge(
    adapter: str = typer.Option(..., help="Adapter dir to merge."),
    output: str = typer.Option(..., help="Output dir: a standalone HF model."),
    dtype: str = typer.Option("float32", help="Saved weights: float32 | bfloat16 | float16."),
    model: str = MODEL,
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


# `loraforge export gguf`: a group of its own, so later targets sit beside it (export ...).
export_app = typer.Typer(help="Export for other engines: GGUF for llama.cpp and Ollama.")
app.add_typer(export_app, name="export")


@export_app.command()
@user_errors
def gguf(
    adapter: str = typer.Option(None, help="Adapter dir: merged into its base, then converted."),
    model: str = typer.Option(None, help="An already merged model dir (e.g. from merge)."),
    output: str = typer.Option(None, help="Output file, NAME.gguf."),
    quant: str = typer.Option("f16", help="f16 | q8_0 | q4_k_m (llama.cpp's quantizer)."),
    lora_only: bool = typer.Option(False, help="Write the adapter as a GGUF LoRA instead."),
    ollama: bool = typer.Option(False, help="Also write NAME.Modelfile for `ollama create`."),
    check: bool = typer.Option(True, help="Check the output through llama.cpp vs loraforge."),
    max_ppl_increase: float = typer.Option(
        None, help="Fail above this relative perplexity increase (default: by --quant)."
    ),
    force: bool = typer.Option(False, help="Replace an existing output file."),
    setup: bool = typer.Option(
        False, help="Fetch llama.cpp's converters and build llama-cpp-python (once)."
    ),
) -> None:
    """Convert to GGUF with llama.cpp's own tools; checks the result through llama.cpp."""
    from loraforge.export import llamacpp

    if setup:
        llamacpp.setup(echo=console.print)
        if output is None:
            return
    from loraforge.export.gguf import GGUFExportError, export_gguf

    if output is None:
        raise GGUFExportError("--output NAME.gguf is required (or --setup alone)")

    r = export_gguf(
        output,
        adapter=adapter,
        model=model,
        quant=quant,
        lora_only=lora_only,
        ollama=ollama,
        check=check,
        force=force,
        max_ppl_increase=max_ppl_increase,
        echo=console.print,
    )
    console.print(f"wrote {r.output} ({r.quant}, {r.size_bytes / 1e6:.1f} MB)")
    if r.check is not None:
        console.print(r.check.summary())
        console.print(f"first answer, loraforge: {r.check.first_answer[0]!r}")
        console.print(f"first answer, llama.cpp: {r.check.first_answer[1]!r}")
    if r.modelfile is not None:
        console.print(f"wrote {r.modelfile}: ollama create NAME -f {r.modelfile}")
    for note in r.notes:
        console.print(note)
