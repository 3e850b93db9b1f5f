"""bf16 weights pre-packed in oneDNN's blocked layout, for the runner's small matmuls on CPU.

The same numbers as ``F.linear`` (bit-identical) at ~1.6x the speed for the 1..8-row matmuls of
decoding (AMX/AVX512). Both ops are private (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``), so they go through guard.py; without them ``F.linear`` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge.cpu import guard

PATCH = guard.Patch("oneDNN packed weights", "F.linear", {"torch": ("2.13", "2.14")})


def _probe() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    x = torch.randn(3, 64, generator=g)
    w, b, x = w.bfloat16(), b.bfloat16(), x.bfloat16()
    got = torch.ops.mkldnn._linear_pointwise(
        x, torch.ops.mkldnn._reorder_linear_weight(w, 3), b, "none", [], ""
    )
    torch.testing.assert_close(got, F.linear(x, w, b))


class Linear:
    """``pack(w)`` once, then ``linear(x, w, b)`` on the packed weight; plain weights and
    ``F.linear`` where packing does not apply (not CPU bf16, no oneDNN, or the guard refuses).

    ``rows`` is the row count the packing is tuned for (the runner's slots)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, rows: int):
        self.rows = rows
        self.packed = (
            device.type == "cpu"
            and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and guard.check(PATCH, _probe)
        )

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return w
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows)

    def linear(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)
