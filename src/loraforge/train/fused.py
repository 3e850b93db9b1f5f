"""Leaner autograd for RMSNorm, SiLU·mul and LoRA linears on the fast training path.

Autograd on transformers' own RMSNorm keeps several tensors per call (the fp32 copy of the
input, its square, the normalised values, the cast), and on the MLP's ``silu(gate) * up`` three.
The functions here keep only what backward needs (RMSNorm: the input and one fp32 scale per
token; SiLU·mul: gate and up) and recompute the rest, with the same forward arithmetic as
transformers'. Measured on the bundled model (a 327-token sample, bf16 autocast): 0.66 MB of
saved activations per token with HF's and PEFT's autograd, 0.50 MB with these, and a step ~10%
faster. Only frozen norm weights are handled (LoRA never trains them); anything else keeps its
own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x²) + eps))`` computed in fp32 and cast back, as in HF."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        g = (grad * weight).to(x.dtype).float()
        xhat = x.float() * rstd
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``; backward recomputes silu instead of keeping its output."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # what autograd does for HF's silu(gate) * up, in its dtype, with silu recomputed
        d_up = grad * F.silu(gate)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return d_gate, d_up


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward for the plain case (one active vanilla adapter, not merged):
    ``W x + (s·B) (A x)`` with the add done by the GEMM (addmm's beta) and the scale applied to
    the (out, r) matrix B instead of the (tokens, out) product. PEFT's version spends two more
    full passes over the output (the scaling multiply and the add): ~10% of a step here."""
    names = self.active_adapters
    plain = (
        not (self.disable_adapters or self.merged or args or kwargs)
        and len(names) == 1
        and names[0] in self.lora_A
        and names[0] not in self.lora_variant
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    y = self.base_layer(x)
    t = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
    b = self.lora_B[name].weight * self.scaling[name]
    out = torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1]), b.t())
    return out.view(y.shape)


def use_fused_lora(model: torch.nn.Module) -> int:
    """Swap the forward of PEFT's LoRA Linear layers for the one above; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    swapped = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lora_linear_forward, module)
            swapped += 1
    return swapped


# model families whose RMSNorm and MLP are exactly Llama's
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def use_fused_blocks(model: torch.nn.Module) -> int:
    """Swap the forward of the model's RMSNorms and SiLU MLPs in place; returns how many."""
    swapped = 0
    for module in model.modules():
        name = type(module).__name__
        family = type(module).__module__.split(".")[-1].removeprefix("modeling_")
        if family not in FAMILIES:
            continue
        if (
            name.endswith("RMSNorm")
            and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and not module.weight.requires_grad
            and type(module).forward.__code__.co_argcount == 2
        ):
            module.forward = types.MethodType(_rms_forward, module)
            swapped += 1
        elif (
            name.endswith("MLP")
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")
        ):
            module.forward = types.MethodType(_mlp_forward, module)
            swapped += 1
    return swapped
