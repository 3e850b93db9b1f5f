"""QLoRA (``--quantization``): LoRA on a bitsandbytes-quantized base, trained on the tiny model.

The adapter it writes is a plain LoRA adapter: it loads on the full-precision base in the engine
(hence chat and serve) and merges into full-precision weights, never into 4-bit ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from helpers import qa_examples

from loraforge.config import SFTConfig
from loraforge.errors import MissingExtra
from loraforge.train.recipe import SFTRecipe, run_sft

bnb = pytest.importorskip("bitsandbytes")

PROMPT = [{"role": "user", "content": "Hello there, how are you?"}]


def _cfg(model_dir: Path, quantization: str, **kw) -> SFTConfig:
    # a high learning rate: two steps must move the adapter enough to change greedy tokens
    return SFTConfig(model=str(model_dir), quantization=quantization, batch_size=4,
                     learning_rate=5e-2, warmup_ratio=0.0, max_steps=2, val_split=0.0,
                     **kw)  # fmt: skip


@pytest.mark.parametrize(
    "quantization, layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")]
)
def test_two_steps_on_a_quantized_base(quantization, layer, tiny_model_dir, tokenizer, capsys):
    """bitsandbytes on CPU: 4-bit and LLM.int8() bases both train (int8 included: bitsandbytes
    0.50 runs it on CPU). The fast path's patches that cannot apply are skipped, not fatal."""
    recipe = SFTRecipe(_cfg(tiny_model_dir, quantization))
    recipe.setup_accelerator()
    recipe.setup_data(qa_examples(tokenizer, 8))
    recipe.setup_model()
    recipe.setup_optim()
    recipe.resume()
    proj = recipe.model.get_base_model().model.layers[0].mlp.gate_proj
    assert type(proj.base_layer) is getattr(bnb.nn, layer)
    assert "fused LoRA linear not used" in capsys.readouterr().out
    b0 = proj.lora_B["default"].weight.detach().clone()
    steps = [recipe.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in steps)
    assert all(s.grad_norm is not None and s.grad_norm > 0 for s in steps)
    assert not torch.equal(proj.lora_B["default"].weight.detach(), b0)  # it learned


def test_missing_bitsandbytes_is_one_line(monkeypatch, tiny_model_dir):
    from loraforge.models import load_quantized_model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a),
    )
    with pytest.raises(MissingExtra, match=r"pip install 'loraforge\[qlora\]'"):
        load_quantized_model(tiny_model_dir, "nf4")


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    return run_sft(_cfg(tiny_model_dir, "nf4", output=out), train=qa_examples(tokenizer, 8))


def _greedy(model, ids: list[int], n: int = 12, eos: int = 2) -> list[int]:
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                         eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new


def test_adapter_records_quantization(qlora_adapter):
    saved = yaml.safe_load((qlora_adapter / "config.yaml").read_text())
    assert saved["quantization"] == "nf4"


def test_adapter_runs_and_merges_on_full_precision_base(qlora_adapter, tiny_model_dir, tmp_path):
    """Engine (fp32 base + adapter) == PEFT on the fp32 base == the merged fp32 model, token for
    token, and the adapter changes the base's answer (so a dropped adapter would fail)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.export.merge import merge_adapter
    from loraforge.infer.engine import Engine, SamplingParams

    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    engine = Engine(str(tiny_model_dir), {"q": str(qlora_adapter)}, dtype="float32")
    try:
        ids = engine.encode(PROMPT, "q")
        tuned = engine.generate([ids], greedy, "q")[0].token_ids
        plain = engine.generate([ids], greedy, None)[0].token_ids
    finally:
        engine.close()
    assert tuned != plain

    def fp32(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    assert _greedy(PeftModel.from_pretrained(fp32(tiny_model_dir), qlora_adapter), ids) == tuned
    result = merge_adapter(qlora_adapter, tmp_path / "merged")
    assert result.max_abs_diff <= 1e-3
    merged = fp32(tmp_path / "merged")
    assert not any("bnb" in type(m).__module__ for m in merged.modules())
    assert "quantization_config" not in merged.config.to_dict()
    assert _greedy(merged, ids) == tuned


def test_bench_train_qlora_side(tiny_model_dir, capsys):
    """`bench train --quantization nf4`: the qlora side trains the same tokens as plain LoRA,
    and the table and the Markdown row set it against plain LoRA from the same run."""
    from loraforge.bench.train import (
        QLORA,
        TrainBenchSettings,
        bench_train,
        markdown_row,
        print_result,
    )

    s = TrainBenchSettings(model=str(tiny_model_dir), records=8, max_length=128, quantization="nf4")
    r = bench_train(s, sides=("loraforge", QLORA), progress=lambda m: None)
    lora, qlora = r["loraforge"], r[QLORA]
    assert qlora["tokens"] == lora["tokens"] > 0
    assert 0 < qlora["final_loss"] < 20 and qlora["peak_rss_mb"] > 100
    assert r["qlora_ratios"]["tokens_per_s"] == qlora["tokens_per_s"] / lora["tokens_per_s"]
    print_result(r)
    out = capsys.readouterr().out
    assert "qlora (nf4)" in out and "qlora/lora" in out
    ratios = {"tokens_per_s": 1.0, "peak_rss": 1.0, "final_loss_rel_diff": 0.0}
    row = markdown_row({**r, "baseline": lora, "ratios": ratios})
    assert "nf4 QLoRA" in row and f"{r['qlora_ratios']['peak_rss']:.2f}x RSS of LoRA" in row
