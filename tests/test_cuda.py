"""CUDA as a first-class device, and the CPU-only fast paths kept off other devices.

The ``gpu`` tests skip without a CUDA device (they have not run on a GPU yet); they train two
steps (plain LoRA under bf16 autocast, QLoRA nf4), and check the engine's greedy tokens against
HF generate on the GPU. The tests without the marker run anywhere: they check that the CPU-only
paths (oneDNN packed weights, int4 decode weights, CPU attention padding) never switch on for a
tensor or device that is not the CPU.
"""

from __future__ import annotations

import io

import pytest
import torch
from helpers import make_adapter, qa_examples

from loraforge.config import SFTConfig
from loraforge.cpu import guard, onednn
from loraforge.cpu.attention import _pad_tail
from loraforge.cpu.int4 import Int4
from loraforge.train import lora

CUDA = torch.device("cuda")
PROMPT = [{"role": "user", "content": "Hello there, how are you?"}]


# ---- anywhere: CPU-only paths stay off other devices -------------------------------------------
def test_onednn_packing_is_cpu_only(monkeypatch):
    def no_probe(*_a, **_k):  # the guard (and its CPU probe) must not even be consulted
        raise AssertionError("guard.check called for a CUDA device")

    monkeypatch.setattr(guard, "check", no_probe)
    mm = onednn.Linear(torch.bfloat16, CUDA, rows=4)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert not mm.packed and mm.pack(w) is w


def test_int4_and_attention_padding_are_cpu_only():
    assert Int4.usable(torch.empty(64, 64))  # the same shape on the CPU qualifies
    assert not Int4.usable(torch.empty(64, 64, device="meta"))
    x = torch.empty(1, 2, 7, 8, device="meta")
    assert _pad_tail(x) is x
    assert _pad_tail(torch.zeros(1, 2, 7, 8)).shape[2] == 32


def test_mixed_precision_per_device(monkeypatch):
    cpu = torch.device("cpu")
    assert lora.mixed_precision(cpu, fast=False) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert lora.mixed_precision(CUDA, fast=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert lora.mixed_precision(CUDA, fast=True) == "fp16"  # pre-Ampere: fp16 + GradScaler
    monkeypatch.setattr(lora, "bf16_supported", lambda device: False)
    assert lora.mixed_precision(cpu, fast=True) == "no"  # no fp16 autocast on a CPU


# ---- on a GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_two_steps_on_cuda(quantization, tiny_model_dir, tokenizer):
    if quantization:
        pytest.importorskip("bitsandbytes")
    from loraforge.train.recipe import SFTRecipe

    cfg = SFTConfig(model=str(tiny_model_dir), quantization=quantization, batch_size=4,
                    learning_rate=1e-2, warmup_ratio=0.0, max_steps=2, val_split=0.0)  # fmt: skip
    recipe = SFTRecipe(cfg)
    recipe.setup_accelerator()
    recipe.setup_data(qa_examples(tokenizer, 8))
    recipe.setup_model()
    recipe.setup_optim()
    recipe.resume()
    assert recipe.accelerator.device.type == "cuda"
    proj = recipe.model.get_base_model().model.layers[0].mlp.gate_proj
    assert proj.base_layer.weight.device.type == "cuda"
    lora_b = proj.lora_B["default"].weight
    assert lora_b.device.type == "cuda" and lora_b.dtype == torch.float32
    if quantization:
        import bitsandbytes as bnb

        assert type(proj.base_layer) is bnb.nn.Linear4bit
    before = lora_b.detach().clone()
    steps = [recipe.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(s.loss)) and s.grad_norm > 0 for s in steps)
    assert not torch.equal(lora_b.detach(), before)


def _hf_greedy(model_dir, ids, n, adapter_dir, dtype) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(CUDA)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    out = model.generate(torch.tensor([ids], device=CUDA), do_sample=False, max_new_tokens=n,
                         eos_token_id=2, pad_token_id=2)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    return new[: new.index(2)] if 2 in new else new


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_greedy_equals_hf_generate(tiny_model_dir, tmp_path):
    """fp32 on the GPU: the engine's tokens are HF generate's (PEFT adapter on the same base);
    then a chat turn in bf16 runs on the GPU and answers."""
    from loraforge.infer.chat import ChatSession, one_shot
    from loraforge.infer.engine import Engine, SamplingParams

    adapter = make_adapter(tiny_model_dir, tmp_path / "a1", 1)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    engine = Engine(str(tiny_model_dir), {"a1": str(adapter)}, dtype="float32", device="cuda")
    try:
        assert engine.device.type == "cuda"
        ids = engine.encode(PROMPT, "a1")
        got = engine.generate([ids], greedy, "a1")[0].token_ids
    finally:
        engine.close()
    assert got == _hf_greedy(tiny_model_dir, ids, 12, adapter, torch.float32)

    engine = Engine(str(tiny_model_dir), {"a1": str(adapter)}, dtype="bfloat16", device="cuda")
    session = ChatSession(engine, greedy, adapter="a1")
    try:
        answer = one_shot(session, "Hello!", out=io.StringIO())
    finally:
        engine.close()
    assert session.history[-1] == {"role": "assistant", "content": answer}
