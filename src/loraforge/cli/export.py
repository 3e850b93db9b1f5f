"""`loraforge merge` (loraforge.export.merge): an adapter folded into a standalone HF model."""

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
