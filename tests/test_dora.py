"""A DoRA adapter (`sft --use-dora`): the engine refuses it with the way out, and that way out
(merge, then use the merged dir as the model) works."""

from __future__ import annotations

import pytest

from loraforge.adapters import AdapterError


def _dora_adapter(tiny_model_dir, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.adapters import AdapterMeta, write_meta
    from loraforge.data.tokenize import DEFAULT_SYSTEM, resolve_template
    from loraforge.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                     init_lora_weights=False)  # fmt: skip
    get_peft_model(model, cfg).save_pretrained(out)
    template = resolve_template(load_tokenizer(tiny_model_dir))
    write_meta(out, AdapterMeta(str(tiny_model_dir), template, DEFAULT_SYSTEM))
    return out


def test_dora_is_refused_with_the_merge_hint_and_merge_works(tiny_model_dir, tmp_path):
    from loraforge.export.merge import merge_adapter
    from loraforge.infer.engine import Engine, SamplingParams

    adapter = _dora_adapter(tiny_model_dir, tmp_path / "dora")
    engine = Engine(str(tiny_model_dir), dtype="float32")
    try:
        with pytest.raises(AdapterError, match="DoRA.*loraforge merge"):
            engine.load_adapter("dora", str(adapter))
    finally:
        engine.close()

    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.max_abs_diff <= result.tolerance
    merged = Engine(str(tmp_path / "merged"), dtype="float32")
    try:
        (out,) = merged.generate([[{"role": "user", "content": "hi"}]], SamplingParams(
            max_new_tokens=4, temperature=0))  # fmt: skip
        assert out.completion_tokens > 0
    finally:
        merged.close()
