"""The fast path's RMSNorm and SiLU·mul autograd functions against transformers' own modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from loraforge.cpu.fused import use_fused_blocks


def _pair(make, dtype):
    torch.manual_seed(0)
    ref = make().to(dtype)
    fused = make().to(dtype)
    fused.load_state_dict(ref.state_dict())
    for m in (ref, fused):
        for p in m.parameters():
            p.requires_grad_(False)
    assert use_fused_blocks(fused) == 1
    return ref, fused


def assert_same_forward_backward(ref, fused, x, g, tol):
    """Both modules give the same output and input gradient for input ``x``, output grad ``g``."""
    outs = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        outs.append((y.float(), xi.grad.float()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=tol, rtol=tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_hf_forward_and_backward(dtype, tol):
    def make():
        norm = LlamaRMSNorm(64, eps=1e-5)
        norm.weight.data = torch.rand(64) + 0.5
        return norm

    ref, fused = _pair(make, dtype)
    x = torch.randn(3, 7, 64, dtype=dtype) * 3
    g = torch.randn(3, 7, 64, dtype=dtype)
    assert_same_forward_backward(ref, fused, x, g, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_silu_mlp_matches_hf_forward_and_backward(dtype, tol):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")
    ref, fused = _pair(lambda: LlamaMLP(cfg), dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    g = torch.randn(2, 5, 32, dtype=dtype)
    assert_same_forward_backward(ref, fused, x, g, tol)


def test_trainable_norm_keeps_its_own_forward():
    norm = LlamaRMSNorm(8)
    assert norm.weight.requires_grad
    assert use_fused_blocks(norm) == 0


def test_fused_lora_linear_matches_peft():
    from peft import LoraConfig, get_peft_model

    from loraforge.cpu.fused import use_fused_lora

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False))
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["0", "1"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    x = torch.randn(3, 5, 16)
    want = model(x)
    g_want = torch.autograd.grad(want.square().sum(), [p for p in model.parameters()
                                                       if p.requires_grad])  # fmt: skip
    assert use_fused_lora(model) == 2
    got = model(x)
    g_got = torch.autograd.grad(got.square().sum(), [p for p in model.parameters()
                                                     if p.requires_grad])  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with model.disable_adapter():  # anything but the plain case goes through PEFT's forward
        torch.testing.assert_close(model(x), base(x))
