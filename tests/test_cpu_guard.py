"""The version guards of loraforge.cpu: on this machine every fast path is taken; outside the
releases it was measured on, or without its private op, each one falls back to the plain path
with exactly one warning line, and results stay those of the plain path. And one family table
decides for both training's fused blocks and the engine's runner."""

from __future__ import annotations

import types

import pytest
import torch

from loraforge.config import SFTConfig
from loraforge.cpu import attention, dropout, families, fused, guard, int4, onednn
from loraforge.cpu.families import Family

BF16, CPU = torch.bfloat16, torch.device("cpu")
TRAINING = [attention.PATCH, dropout.PATCH, fused.BLOCKS, fused.LORA, fused.CASTS]
PROMPT = [1, 5, 9, 3, 17, 42, 7]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a new process would: no patch has warned yet."""
    monkeypatch.setattr(guard, "_warned", set())


def fake_old_releases(monkeypatch) -> None:
    """Every package reports a release older than any patch was measured on."""
    monkeypatch.setattr(guard, "installed", lambda package: "1.0")


def warnings_in(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def assert_one_warning_each(lines: list[str], patches: list[guard.Patch]) -> None:
    assert len(lines) == len(patches), lines
    for patch in patches:
        assert (
            sum(line.startswith(f"warning: fast path '{patch.name}' not used") for line in lines)
            == 1
        ), lines


def swapped_forwards(model: torch.nn.Module) -> int:
    return sum("forward" in vars(m) for m in model.modules())


def lora_model(model_dir, fast: bool):
    from loraforge.train.lora import load_lora_model

    torch.manual_seed(0)  # the same LoRA init for every model built here
    return load_lora_model(SFTConfig(model=str(model_dir), fast=fast), CPU, bf16_base=True)


def loss_and_grads(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A training step's loss and LoRA gradients (bf16 autocast, dropout on, seeded)."""
    ids = torch.tensor([PROMPT * 3])
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=BF16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def runner_greedy(runner, n: int = 8) -> list[int]:
    logits = runner.prefill(torch.tensor([PROMPT]), 0, None)
    out = []
    for i in range(n):
        out.append(int(logits.argmax(-1)))
        logits = runner.decode(torch.tensor([[out[-1]]]), [len(PROMPT) + i], None)
    return out


def hf_greedy(model_dir, n: int = 8) -> list[int]:
    from loraforge.models import load_model

    hf = load_model(model_dir, dtype="bfloat16")
    out = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(PROMPT) :].tolist()


def make_runner(model_dir, int4_weights: bool = False):
    from loraforge.infer.runner import Runner
    from loraforge.models import load_model

    return Runner(load_model(model_dir, dtype="bfloat16"), 1, BF16, CPU, int4=int4_weights)


def test_every_fast_path_is_taken_here(tiny_model_dir, capsys):
    model = lora_model(tiny_model_dir, fast=True)
    assert model.base_model.model.config._attn_implementation == attention.NAME
    assert any(isinstance(m, dropout.SharedInputDropout) for m in model.modules())
    # 2 layers x (2 norms + MLP) + the final norm, and 7 LoRA linears per layer
    assert swapped_forwards(model) == 7 + 14
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules())
    runner = make_runner(tiny_model_dir, int4_weights=True)
    assert runner.mm.packed and runner.int4
    assert warnings_in(capsys) == []


def test_outside_measured_releases_training_takes_the_plain_path(
    tiny_model_dir, monkeypatch, capsys
):
    fake_old_releases(monkeypatch)
    plain = lora_model(tiny_model_dir, fast=False)  # patches nothing but the input casts
    fallen = lora_model(tiny_model_dir, fast=True)
    assert_one_warning_each(warnings_in(capsys), TRAINING)  # the casts' once, not twice
    assert fallen.base_model.model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, dropout.SharedInputDropout) for m in fallen.modules())
    assert swapped_forwards(fallen) == 0
    assert all(m.cast_input_dtype_enabled for m in fallen.modules() if hasattr(m, "lora_A"))
    # the model --no-fast builds, so the same step to the last bit
    want, got = loss_and_grads(plain), loss_and_grads(fallen)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))
    lora_model(tiny_model_dir, fast=True)
    assert warnings_in(capsys) == []  # once per process


def test_outside_measured_releases_runner_takes_the_plain_path(tiny_model_dir, monkeypatch, capsys):
    fast = runner_greedy(make_runner(tiny_model_dir))
    fake_old_releases(monkeypatch)
    runner = make_runner(tiny_model_dir, int4_weights=True)  # int4 asked for: bf16 instead
    assert_one_warning_each(warnings_in(capsys), [onednn.PATCH, int4.PATCH])
    assert not runner.mm.packed and not runner.int4 and runner.lm_head_q4 is None
    assert runner_greedy(runner) == fast == hf_greedy(tiny_model_dir)


def test_missing_onednn_op_runner_uses_f_linear(tiny_model_dir, monkeypatch, capsys):
    kept = types.SimpleNamespace(_linear_pointwise=torch.ops.mkldnn._linear_pointwise)
    monkeypatch.setattr(torch.ops, "mkldnn", kept)  # no _reorder_linear_weight
    runner = make_runner(tiny_model_dir)
    lines = warnings_in(capsys)
    assert_one_warning_each(lines, [onednn.PATCH])
    assert "_reorder_linear_weight" in lines[0]
    assert not runner.mm.packed
    assert runner_greedy(runner) == hf_greedy(tiny_model_dir)


def test_failing_int4_op_runner_keeps_bf16(tiny_model_dir, monkeypatch, capsys):
    want = runner_greedy(make_runner(tiny_model_dir))

    def broken(*args):
        raise NotImplementedError("no int4 kernel for this CPU")

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", broken)
    runner = make_runner(tiny_model_dir, int4_weights=True)
    assert_one_warning_each(warnings_in(capsys), [int4.PATCH])
    assert not runner.int4
    assert runner_greedy(runner) == want


def tiny_hf_model(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"n_embd": 32, "n_layer": 1, "n_head": 2} if model_type == "gpt2" else {}
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,  # phi3's default (32000) is outside this vocabulary
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():  # frozen, as under LoRA: the fused norms need that
        p.requires_grad_(False)
    return model


def fused_and_runner(model: torch.nn.Module) -> tuple[bool, bool]:
    """(whether training swaps in the fused blocks, whether the engine's runner takes it)."""
    from loraforge.infer.runner import Runner
    from loraforge.models import ModelError

    fused_blocks = fused.use_fused_blocks(model) > 0
    try:
        Runner(model, 1, torch.float32, CPU)
    except ModelError as e:
        assert "the engine supports" in str(e)
        return fused_blocks, False
    return fused_blocks, True


@pytest.mark.parametrize("model_type", [*families.FAMILIES, "gpt2"])
def test_training_and_runner_read_one_family_table(model_type):
    family = families.FAMILIES.get(model_type, Family("", fused_blocks=False, runner=False))
    assert fused_and_runner(tiny_hf_model(model_type)) == (family.fused_blocks, family.runner)
    if model_type in ("gemma2", "gemma3_text", "phi3"):  # the runner's, not Llama's blocks
        assert family.runner and not family.fused_blocks


def test_the_table_is_what_both_consult(monkeypatch):
    assert fused_and_runner(tiny_hf_model("llama")) == (True, True)
    monkeypatch.setitem(families.FAMILIES, "llama", Family("Llama", False, False))
    assert fused_and_runner(tiny_hf_model("llama")) == (False, False)
    monkeypatch.setitem(families.FAMILIES, "llama", Family("Llama", True, False))
    assert fused_and_runner(tiny_hf_model("llama")) == (True, False)


def test_blocks_swap_only_the_family_classes_with_their_known_forward(monkeypatch, capsys):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class LookAlike(LlamaRMSNorm):  # not transformers' own class: its forward is unknown here
        pass

    def frozen(norm):
        norm.weight.requires_grad_(False)
        return norm

    assert fused.use_fused_blocks(frozen(LookAlike(8))) == 0
    assert fused.use_fused_blocks(frozen(LlamaRMSNorm(8))) == 1

    original = LlamaRMSNorm.forward

    def forward(self, hidden_states, residual=None):  # a release that grew an argument
        return original(self, hidden_states)

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)
    assert fused.use_fused_blocks(frozen(LlamaRMSNorm(8))) == 0
    lines = warnings_in(capsys)
    assert_one_warning_each(lines, [fused.BLOCKS])
    assert "residual" in lines[0]
