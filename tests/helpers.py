"""Test helpers shared by several test files (import as ``from helpers import make_adapter``)."""

from __future__ import annotations

from pathlib import Path


def make_adapter(
    base_dir: Path, out_dir: Path, seed: int, system: str | None = "Be brief."
) -> Path:
    """A random, non-zero LoRA adapter on ``base_dir`` saved as a loraforge adapter dir.

    ``init_lora_weights=False`` makes B non-zero, and B is scaled up so that the adapter really
    changes the tiny model's greedy output (otherwise adapter mix-ups would go unnoticed).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.adapters import AdapterMeta, write_meta

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    meta = AdapterMeta(
        base_model=str(base_dir), chat_template=tokenizer.chat_template, system=system
    )
    write_meta(out_dir, meta)
    return out_dir
