"""LoRA dropout that costs less: one mask per input tensor, drawn from cheap integer randoms.

PEFT gives each LoRA layer its own ``nn.Dropout`` on its input. q/k/v read the same tensor, as
do gate/up, so a Llama layer draws 7 full-size Bernoulli masks where 4 inputs exist; on this
CPU those draws were ~18% of a fast training step. Here layers that receive the very same input
tensor one after another share the dropped tensor (as a fused qkv LoRA with one dropout on its
input does, e.g. LitGPT), and the mask comes from int16 randoms (~3x cheaper than bernoulli_).
The keep-probability is rounded to a multiple of 1/32768 and the scale matches it, so the
expectation is unchanged. Used on the fast path only; ``--no-fast`` keeps PEFT's dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.cpu import guard

# PEFT's LoRA layers keep their dropouts in a ModuleDict ``lora_dropout`` and call the active
# one on the layer's input: an internal layout, hence the guard
PATCH = guard.Patch("shared LoRA dropout", "PEFT's dropout per layer", {"peft": ("0.21", "0.22")})


class _Shared:
    """The last input seen by any layer of one model, and its dropped version."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None


class SharedInputDropout(nn.Module):
    def __init__(self, p: float, shared: _Shared):
        super().__init__()
        self.threshold = round(p * 32768)  # int16 randoms lie in [0, 32767]
        self.scale = 32768 / (32768 - self.threshold)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        s = self.shared
        if s.x is not x:
            keep = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_()
            s.x, s.out = x, x * (keep >= self.threshold) * self.scale
        return s.out

    def extra_repr(self) -> str:
        return f"p={self.threshold / 32768:.4f}, shared"


def _dropping(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and module.p > 0


def share_lora_dropout(model: nn.Module) -> int:
    """Replace every LoRA layer's ``nn.Dropout`` with a shared one; returns how many."""
    found = []
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            found += [(drops, k, d.p) for k, d in drops.items() if _dropping(d)]
    if not found or not guard.check(PATCH):
        return 0
    shared = _Shared()
    for drops, name, p in found:
        drops[name] = SharedInputDropout(p, shared)
    return len(found)
