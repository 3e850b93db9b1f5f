"""Leaner autograd for RMSNorm, SiLU·mul and LoRA linears on the fast training path.

Autograd on transformers' own RMSNorm keeps several tensors per call (the fp32 copy of the
input, its square, the normalised values, the cast), and on the MLP's ``silu(gate) * up`` three.
The functions here keep only what backward needs (RMSNorm: the input and one fp32 scale per
token; SiLU·mul: gate and up) and recompute the rest, with the same forward arithmetic as
transformers'. Measured on the bundled model (a 327-token sample, bf16 autocast): 0.66 MB of
saved activations per token with HF's and PEFT's autograd, 0.50 MB with these, and a step ~10%
faster. Only frozen norm weights are handled (LoRA never trains them); anything else keeps its
own forward. Which families' blocks qualify is families.py's table; each swap goes through
guard.py (the releases it was measured on, and a probe against the library's own forward).
"""

from __future__ import annotations

import copy
import inspect
import types

import torch
import torch.nn.functional as F

from loraforge.cpu import families, guard

BLOCKS = guard.Patch(
    "fused RMSNorm/SiLU·mul autograd",
    "transformers' RMSNorm and MLP forwards",
    {"torch": ("2.13", "2.14"), "transformers": ("5.24", "5.25")},
)
LORA = guard.Patch(
    "fused LoRA linear",
    "PEFT's LoRA forward",
    {"torch": ("2.13", "2.14"), "peft": ("0.21", "0.22")},
)
CASTS = guard.Patch(
    "cast-free LoRA inputs under autocast", "PEFT's input casts", {"peft": ("0.21", "0.22")}
)


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


def _plain_adapter(self) -> str | None:
    """The one active vanilla adapter of an unmerged layer (the case ``_lora_linear_forward``
    computes), else None."""
    names = self.active_adapters
    plain = (
        not (self.disable_adapters or self.merged)
        and len(names) == 1
        and names[0] in self.lora_A
        and names[0] not in self.lora_variant
    )
    return names[0] if plain else None


def _lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward for the plain case (one active vanilla adapter, not merged):
    ``W x + (s·B) (A x)`` with the add done by the GEMM (addmm's beta) and the scale applied to
    the (out, r) matrix B instead of the (tokens, out) product. PEFT's version spends two more
    full passes over the output (the scaling multiply and the add): ~10% of a step here."""
    name = None if args or kwargs else _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    y = self.base_layer(x)
    t = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
    b = self.lora_B[name].weight * self.scaling[name]
    out = torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1]), b.t())
    return out.view(y.shape)


def _tiny_lora_linear() -> torch.nn.Module:
    """A PEFT LoRA Linear (8 -> 6, rank 2, B non-zero) built the public way, for probes."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(8, 6))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    return get_peft_model(base, cfg).base_model.model[0]


def _probe_lora() -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    layer = _tiny_lora_linear()
    if type(layer) is not LoraLinear or _plain_adapter(layer) is None:
        raise TypeError(f"PEFT built {type(layer).__name__}, not a plain LoRA Linear")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(_lora_linear_forward(layer, x), LoraLinear.forward(layer, x))


def use_fused_lora(model: torch.nn.Module) -> int:
    """Swap the forward of PEFT's LoRA Linear layers for the one above; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if type(m) is LoraLinear]
    if not layers or not guard.check(LORA, _probe_lora):
        return 0
    for module in layers:
        module.forward = types.MethodType(_lora_linear_forward, module)
    return len(layers)


def _probe_casts() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = _tiny_lora_linear()
    if not isinstance(layer, BaseTunerLayer) or not hasattr(layer, "cast_input_dtype_enabled"):
        raise AttributeError("PEFT's LoRA layers have no cast_input_dtype_enabled")
    layer.cast_input_dtype_enabled = False
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    if layer._cast_input_dtype(x, torch.float32) is not x:
        raise RuntimeError("PEFT casts the input although cast_input_dtype_enabled is False")


def skip_input_casts(model: torch.nn.Module) -> int:
    """Turn off PEFT's cast of each LoRA input to the adapter's dtype; returns how many layers.

    Under autocast it is a wasted copy (autocast casts it straight back to bf16 for the matmul):
    ~7% of a step here. Only for a bf16 base trained under autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or not guard.check(CASTS, _probe_casts):
        return 0
    for module in layers:
        module.cast_input_dtype_enabled = False
    return len(layers)


# the forwards the swapped ones replace, by argument names: an added argument would be dropped
_SIGNATURES = {"norm": ["self", "hidden_states"], "mlp": ["self", "x"]}


def _block_kind(module: torch.nn.Module) -> str | None:
    """``"norm"`` or ``"mlp"`` when ``module`` is exactly the RMSNorm or MLP class of a family whose
    blocks are Llama's (families.py) and the swap applies to it; None otherwise."""
    cls = type(module)
    for model_type, family in families.FAMILIES.items():
        if not family.fused_blocks or cls.__module__ != families.modeling_module(model_type):
            continue
        if cls.__name__ == f"{family.prefix}RMSNorm":
            weight = getattr(module, "weight", None)
            frozen = isinstance(weight, torch.Tensor) and not weight.requires_grad
            return "norm" if frozen and hasattr(module, "variance_epsilon") else None
        if cls.__name__ == f"{family.prefix}MLP":
            act = getattr(getattr(module, "config", None), "hidden_act", None)
            return "mlp" if act in ("silu", "swish") else None
    return None


def _probe_blocks(found: dict[type, torch.nn.Module]) -> None:
    """Per class met: the forward's arguments are the expected ones, and on a tiny instance
    the swapped forward gives the class's own output (and, for the MLP, input gradient)."""
    g = torch.Generator().manual_seed(0)
    for cls, module in found.items():
        kind = _block_kind(module)
        names = list(inspect.signature(cls.forward).parameters)
        if names != _SIGNATURES[kind]:
            raise TypeError(f"{cls.__name__}.forward{tuple(names)} is not {_SIGNATURES[kind]}")
        if kind == "norm":
            tiny = cls(8, eps=module.variance_epsilon)
            tiny.weight.data = torch.rand(8, generator=g) + 0.5
            tiny.weight.requires_grad_(False)
            x = torch.randn(3, 8, generator=g)
            torch.testing.assert_close(_rms_forward(tiny, x), cls.forward(tiny, x))
            continue
        cfg = copy.copy(module.config)
        cfg.hidden_size, cfg.intermediate_size = 8, 16
        tiny = cls(cfg)
        outs = []
        for forward in (_mlp_forward, cls.forward):
            x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
            y = forward(tiny, x)
            y.square().sum().backward()
            outs.append((y.detach(), x.grad))
        torch.testing.assert_close(outs[0], outs[1])


def use_fused_blocks(model: torch.nn.Module) -> int:
    """Swap the forward of the model's RMSNorms and SiLU MLPs in place; returns how many."""
    targets = [(m, kind) for m in model.modules() if (kind := _block_kind(m)) is not None]
    found = {type(m): m for m, _ in targets}
    if not targets or not guard.check(BLOCKS, lambda: _probe_blocks(found)):
        return 0
    forwards = {"norm": _rms_forward, "mlp": _mlp_forward}
    for module, kind in targets:
        module.forward = types.MethodType(forwards[kind], module)
    return len(targets)
