"""Attention for packed rows: SDPA run sample by sample instead of over the whole row.

A packed row of length T with a block-diagonal mask makes SDPA do O(T²) work, nearly all of it
on masked-out blocks: on this CPU a 1,100-token row of four samples spent most of a training
step in attention. This function takes the same 4D block-causal bool mask that ``pack_batch``
builds (so the model is called exactly as with plain SDPA), reads the sample boundaries off its
sub-diagonal (token i starts a sample when it cannot see token i-1), and runs causal SDPA on
each sample's slice. It is registered with transformers' ``AttentionInterface`` and only used
on the fast training path; any other mask falls through to plain SDPA.
"""

from __future__ import annotations

import torch

from loraforge.cpu import guard
from loraforge.cpu.buckets import round_up

try:  # an internal module of transformers: when it is gone, the guard's probe says so
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:
    sdpa_attention_forward = None

NAME = "loraforge_packed"
PATCH = guard.Patch(
    "packed attention",
    "SDPA over whole packed rows",
    {"torch": ("2.13", "2.14"), "transformers": ("5.24", "5.25")},
)

_bounds_cache: tuple[torch.Tensor | None, list[list[int]]] = (None, [])


def _segment_bounds(mask: torch.Tensor) -> list[list[int]]:
    """(B, 1, T, T) block-causal mask -> per row, [0, start_1, ..., T]. Cached per mask tensor:
    every layer of one forward gets the same mask."""
    global _bounds_cache
    if _bounds_cache[0] is mask:
        return _bounds_cache[1]
    t = mask.shape[-1]
    starts = ~mask[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, T-1): i+1 starts a sample
    bounds = [[0, *(torch.nonzero(row).flatten() + 1).tolist(), t] for row in starts.cpu()]
    _bounds_cache = (mask, bounds)
    return bounds


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' ``sdpa_attention_forward``: q (B, H, T, D) -> (B, T, H, D)."""
    packed = (
        attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.dtype == torch.bool
        and query.shape[2] == key.shape[2] == attention_mask.shape[-1]  # no KV cache
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = []
    for b, bounds in enumerate(_segment_bounds(attention_mask)):
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            q, k, v = (_pad_tail(t[b : b + 1, :, s:e]) for t in (query, key, value))
            short = e - s <= FP32_BELOW and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            if short:
                q, k, v = q.float(), k.float(), v.float()
            out = sdpa_attention_forward(
                module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True
            )[0]
            parts.append(out[:, : e - s].to(query.dtype))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


SEGMENT_BUCKET = 32
# CPU flash attention's backward is faster in fp32 than in bf16 for short segments (measured
# here, forward + backward, 9 heads x 64: 64 tokens 0.45 vs 1.19 ms, 128: 1.32 vs 2.45, 192:
# 2.1 vs 2.5, 256: even); short samples are the common case of chat data.
FP32_BELOW = 224


def _pad_tail(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad a segment (B, H, T, D) to a multiple of SEGMENT_BUCKET positions at its end.

    CPU flash attention builds a GEMM kernel per block shape and keeps every one: segments of
    every possible length grew a training process by ~40 MB a step. Under a causal mask the real
    positions never see the padding after them, so their outputs are unchanged (the padded
    rows' outputs are cut off)."""
    t = x.shape[2]
    extra = round_up(t, SEGMENT_BUCKET) - t
    if extra == 0 or x.device.type != "cpu":
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, extra))


def _probe() -> None:
    """Two samples packed in one row, with the mask ``pack_batch`` builds: the same output as
    transformers' SDPA over the whole row."""
    if sdpa_attention_forward is None:
        raise ImportError("transformers.integrations.sdpa_attention.sdpa_attention_forward")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    mask[..., :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    mask[..., 3:, 3:] = torch.ones(4, 4, dtype=torch.bool).tril()
    module = torch.nn.Module()
    got, _ = packed_sdpa_attention(module, q, k, v, mask)
    want, _ = sdpa_attention_forward(module, q, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def use_packed_attention(model) -> bool:
    """Switch a loaded transformers model (and PEFT's wrapped one) to packed attention; False
    when the guard refuses (the model keeps SDPA)."""
    if not guard.check(PATCH, _probe):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    model.set_attn_implementation(NAME)
    return True
