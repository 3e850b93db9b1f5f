"""`loraforge sft` (loraforge.train.recipe) and `loraforge dpo` (loraforge.train.dpo): their flags
are the fields of SFTConfig and DPOConfig."""

from __future__ import annotations

import typer

from loraforge.cli import user_errors
from loraforge.cli.options import model_options
from loraforge.config import DPOConfig, SFTConfig, load_config
from loraforge.errors import UserError

app = typer.Typer()


@app.command()
@user_errors
@model_options(SFTConfig, into="flags", build=False)
def sft(
    config: str = typer.Option(None, "--config", help="YAML file with the fields of the flags."),
    *,
    flags: dict,
    resume_from: str = typer.Option(None, help="Resume from this checkpoint dir."),
) -> None:
    """Fine-tune a LoRA adapter on chat data (flags override --config)."""
    if resume_from:  # the flag form of `resume: DIR` (--resume is the switch)
        flags["resume"] = resume_from
    cfg = load_config(config, **flags)  # a bad value is reported before torch is imported

    from loraforge.train.recipe import run_sft

    run_sft(cfg)


@app.command()
@user_errors
@model_options(DPOConfig, into="flags", build=False)
def dpo(
    config: str = typer.Option(None, "--config", help="YAML file with the fields of the flags."),
    *,
    flags: dict,
    resume_from: str = typer.Option(None, help="Resume from this checkpoint dir."),
) -> None:
    """Preference-tune a LoRA adapter on chosen/rejected pairs: DPO or SimPO (flags override
    --config)."""
    if resume_from:
        flags["resume"] = resume_from
    if config is None and not flags.get("dataset"):
        raise UserError("dpo: pass --dataset FILE of chosen/rejected pairs")
    cfg = load_config(config, kind=DPOConfig, **flags)

    from loraforge.train.dpo import run_dpo

    run_dpo(cfg)
