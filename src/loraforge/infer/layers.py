"""The runner's per-family arithmetic: norms, RoPE, activations and attention, each written op
for op as transformers computes it, so that the runner's fp32 tokens equal HF ``generate``'s.

Which variant a model gets is families.py's ``Block`` (what only the modeling code says) plus its
config (sliding windows, softcapping, query_pre_attn_scalar, partial rotary, the activation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

# activations by config name; anything else runs the HF module's own act_fn (exact, one call more)
_ACTS: dict[str, Callable] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


class Norm:
    """An RMSNorm over the last dim as the family computes it. ``weight`` may hold one row per
    head ([heads, head_dim]): q and k are normalised per head in one call."""

    def __init__(self, weight: torch.Tensor, eps: float, unit_offset: bool):
        self.eps, self.unit_offset = eps, unit_offset
        # Gemma: (1 + w) in fp32, the product rounded once (transformers PR 29402)
        self.w = 1.0 + weight.detach().float() if unit_offset else weight.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm in fp32 is bit-identical to HF's RMSNorm arithmetic, in fewer ops
        n = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (n * self.w).to(x.dtype)
        return self.w * n.to(x.dtype)


def activation(config, mlp: torch.nn.Module) -> Callable:
    """The MLP's activation: a plain function where one is known, else the HF module's own."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name in _ACTS:
        return _ACTS[name]
    return getattr(mlp, "act_fn", None) or mlp.activation_fn


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of each head (all of them unless the config has a
    partial_rotary_factor; the rest pass through, as Phi-3's apply_rotary_pos_emb does)."""
    rd = cos.shape[-1]
    if rd != x.shape[-1]:
        return torch.cat((rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    half = rd // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_tables(
    rotary: torch.nn.Module, config, max_len: int, probe: torch.Tensor, layer_type=None
):
    """cos, sin [max_len, rotary dims] from the model's own rotary module (same module, same
    dtype: HF's numbers). LongRoPE switches to its long factors for every position once a
    sequence passes original_max_position_embeddings; the table takes the short factors below
    that and the long ones above it (HF agrees up to there; beyond, HF re-rotates nothing it has
    cached either, only prompts longer than that are rotated differently)."""
    kw = {} if layer_type is None else {"layer_type": layer_type}
    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    split = params.get("original_max_position_embeddings") if params else None
    split = split if split and split < max_len else max_len
    pos = torch.arange(max_len, device=probe.device)[None]
    parts = []
    if split < max_len:  # the long part first: the module is left in its short state
        parts.append(rotary(probe, pos[:, split:], **kw))
    parts.insert(0, rotary(probe, pos[:, :split], **kw))
    cos = torch.cat([c[0] for c, _ in parts])
    sin = torch.cat([s[0] for _, s in parts])
    return cos, sin


def window_mask(q_start: int, T: int, k_start: int, k_end: int, window: int | None, device):
    """[T, k_end - k_start] bool: query ``q_start + t`` sees key ``j`` when j <= its position and,
    with a sliding window, j > position - window (HF's sliding_window_overlay)."""
    q = torch.arange(q_start, q_start + T, device=device)[:, None]
    k = torch.arange(k_start, k_end, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attend(q, k, v, mask=None, causal=False, scale=None, softcap=None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, KV, S, D] (grouped heads), SDPA where it
    computes the model; with a logit softcap (Gemma 2) transformers' eager attention op for op."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    if gqa:  # HF's repeat_kv
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * scale
    s = torch.tanh(s / softcap) * softcap
    if causal:
        T, S = q.shape[2], k.shape[2]
        mask = window_mask(S - T, T, 0, S, None, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)
