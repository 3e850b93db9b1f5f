"""4-bit weights for the engine's decode steps (``--dtype int4``)."""

from __future__ import annotations

import torch

from loraforge.cpu import guard

# pack and mm run torch's private CPU int4 ops (aten._convert_weight_to_int4pack_for_cpu and
# aten._weight_int4pack_mm_for_cpu)
PATCH = guard.Patch("int4 decode weights", "the bf16 weights", {"torch": ("2.13", "2.14")})


class Int4:
    """Weights in 4 bits for decode steps: groups of 32 inputs, each with its own scale and
    minimum (the layout of GGUF's Q4_1), run by torch's CPU int4 kernel. Decoding reads every
    weight once per step, so a quarter of bf16's bytes makes the matmuls of one stream ~3x faster
    here (all layers + lm_head: 15.5 -> 5.1 ms a token); prefill keeps the bf16 weights (it is
    compute-bound). Answers then differ from bf16's by 4-bit rounding, so this is opt-in."""

    GROUP = 32

    @classmethod
    def available(cls) -> bool:
        """Whether torch's int4 kernels are there and compute what ``pack`` expects (guard.py)."""
        return guard.check(PATCH, cls._probe)

    @classmethod
    def _probe(cls) -> None:
        # every group holds the 16 levels 0..15, so the quantisation is exact: the kernel must
        # give x @ w.T up to bf16 rounding
        w = torch.arange(16.0).repeat(16, 4)
        x = torch.randint(0, 2, (2, 64), generator=torch.Generator().manual_seed(0))
        x = x.to(torch.bfloat16)
        got = cls.mm(x, cls.pack(w)).float()
        torch.testing.assert_close(got, x.float() @ w.t(), rtol=1e-2, atol=0.0)

    @classmethod
    def usable(cls, w: torch.Tensor) -> bool:
        # torch's packing wants whole groups of inputs and outputs in multiples of 16
        return w.device.type == "cpu" and w.shape[1] % cls.GROUP == 0 and w.shape[0] % 16 == 0

    @classmethod
    def pack(cls, w: torch.Tensor) -> tuple:
        n, k = w.shape
        g = w.detach().float().reshape(n, k // cls.GROUP, cls.GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 8)
        # the kernel computes (q - 8) * scale + zero
        zero = lo + 8 * scale
        scales_zeros = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        return packed, scales_zeros

    @classmethod
    def mm(cls, x: torch.Tensor, q4: tuple) -> torch.Tensor:
        packed, scales_zeros = q4
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]), packed, cls.GROUP, scales_zeros
        )
        return y.view(*shape[:-1], y.shape[-1])
