"""A lean forward pass for Llama-style decoders with a per-slot KV cache and batched multi-LoRA.

Why not ``model.generate``: at 135M parameters on a CPU the time goes to per-operator overhead,
not arithmetic, and HF's generic forward runs several hundred small ops per token. Here each layer
is ~15 ops: q/k/v and gate/up are fused into one matmul each, the KV cache is preallocated per
slot (continuous batching: a request joins or leaves the running batch without touching the
others), and each row of a batch can use a different LoRA adapter (or none) through one pair of
batched matmuls per fused projection. The weights are the HF model's own (the fused matrices are
copies; the HF model keeps views of them), so results match HF ``generate`` up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.cpu import families, onednn
from loraforge.cpu.int4 import Int4
from loraforge.infer.lora_bank import GROUPS, LoraBank, proj_shapes, read_lora
from loraforge.models import ModelError


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    w: dict[str, torch.Tensor]  # fused group -> weight [out, in]
    b: dict[str, torch.Tensor | None]
    q4: dict[str, tuple] | None = None  # fused group -> int4 weights, for decoding (cpu/int4.py)


class Runner:
    """Owns the weights, the KV cache of ``slots`` rows and the LoRA bank; not thread-safe."""

    def __init__(
        self, model, slots: int, dtype: torch.dtype, device: torch.device, int4: bool = False
    ):
        cfg = model.config
        family = families.FAMILIES.get(cfg.model_type)
        if family is None or not family.runner:
            supported = ", ".join(families.runner_types())
            raise ModelError(f"the engine supports {supported} models, not '{cfg.model_type}'")
        self.cfg = cfg
        self.slots = slots
        self.dtype, self.device = dtype, device
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.gqa = self.n_heads != self.n_kv
        self.max_len = cfg.max_position_embeddings
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        # on CPU, bf16 weights pre-packed for oneDNN (cpu/onednn.py): ~1.6x faster decode matmuls
        self.mm = onednn.Linear(dtype, device, slots)
        if int4 and not (dtype == torch.bfloat16 and Int4.usable(self.lm_head)):
            raise ModelError("int4 weights need a CPU, bfloat16 and layer widths divisible by 32")
        self.int4 = int4 and Int4.available()  # else bf16 weights, with one warning
        self.lm_head_q4 = Int4.pack(self.lm_head) if self.int4 else None
        self.lm_head = self.mm.pack(self.lm_head)
        self.layers: list[Layer] = []
        self.dims: dict[str, tuple[int, ...]] = {}
        for hf in inner.layers:
            w, b = {}, {}
            for g, projs in GROUPS.items():
                mods = [getattr(hf.self_attn if g in ("qkv", "o") else hf.mlp, p) for p in projs]
                self.dims[g] = tuple(m.weight.shape[0] for m in mods)
                w[g] = _fuse([m.weight for m in mods])
                b[g] = None if mods[0].bias is None else _fuse([m.bias for m in mods])
                off = 0
                for m in mods:  # the HF modules keep views of the fused weights: no second copy
                    n = m.weight.shape[0]
                    m.weight.data = w[g][off : off + n]
                    if m.bias is not None:
                        m.bias.data = b[g][off : off + n]
                    off += n
            q4 = {g: Int4.pack(t) for g, t in w.items()} if self.int4 else None
            w = {g: self.mm.pack(t) for g, t in w.items()}
            norms = (hf.input_layernorm.weight, hf.post_attention_layernorm.weight)
            self.layers.append(Layer(*norms, w, b, q4))
        self.in_dims = {
            "qkv": cfg.hidden_size,
            "o": self.n_heads * self.head_dim,
            "gu": cfg.hidden_size,
            "down": cfg.intermediate_size,
        }
        # cos/sin exactly as HF computes them (same module, same dtype), once for all positions
        pos = torch.arange(self.max_len, device=device)[None]
        probe = torch.empty(0, dtype=dtype, device=device)
        cos, sin = inner.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0], sin[0]
        self.slots = slots
        self.cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ensure_capacity(256)
        self.bank = LoraBank({}, len(self.layers), self.dims, self.in_dims, device)

    # ---- KV cache -------------------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        """Grow the cache (by doubling) so each slot holds ``length`` positions."""
        if length <= self.cap:
            return
        cap = max(256, self.cap)
        while cap < length:
            cap *= 2
        cap = min(cap, self.max_len)
        shape = (self.slots, self.n_kv, cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for i in range(len(self.k)):
            new_k[i][:, :, : self.cap] = self.k[i]
            new_v[i][:, :, : self.cap] = self.v[i]
        self.k, self.v, self.cap = new_k, new_v, cap

    def shrink(self, length: int = 0) -> None:
        """Give back cache memory after long requests: keep the smallest doubling of 256 that
        holds ``length`` positions (what the rows still running need). One request of the full
        window would otherwise keep every slot that long for the life of the server."""
        cap = 256
        while cap < length:
            cap *= 2
        cap = min(cap, self.max_len)
        if cap >= self.cap:
            return
        self.k = [k[:, :, :cap].clone() for k in self.k]
        self.v = [v[:, :, :cap].clone() for v in self.v]
        self.cap = cap

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's cache to another slot (keeps the running rows contiguous)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # ---- adapters (infer/lora_bank.py) -------------------------------------------------------
    def read_adapter(self, path: str) -> dict:
        """A PEFT LoRA dir read and checked against this model's layers and projection shapes."""
        return read_lora(path, len(self.layers), proj_shapes(self.dims, self.in_dims))

    def set_adapters(self, adapters: dict[str, dict]) -> None:
        """Rebuild the LoRA bank from {name: read_adapter(...)}; cheap (a few MB per adapter).
        The new bank is built first and swapped in whole, so a failure leaves the old one."""
        self.bank = LoraBank(adapters, len(self.layers), self.dims, self.in_dims, self.device)

    def clear_lora_cache(self) -> None:
        """Forget the gathered per-batch adapter weights (``lora_rows`` gathers them again)."""
        self.bank.clear_cache()

    def lora_rows(self, names: tuple) -> list | None:
        """Per-layer {group: (A, B, scale, uniform)} for a batch whose rows use ``names``."""
        return self.bank.rows(names)

    # ---- forward --------------------------------------------------------------------------
    def _linear(self, x, layer: Layer, g: str, lora: dict | None, q4: bool) -> torch.Tensor:
        if q4:
            y = Int4.mm(x, layer.q4[g])
            if layer.b[g] is not None:
                y = y + layer.b[g]
        else:
            y = self.mm.linear(x, layer.w[g], layer.b[g])
        if lora is not None and g in lora:
            a, b, scale, uniform = lora[g]
            xf = x.float()
            t = F.linear(xf, a) if uniform else torch.bmm(xf, a.transpose(1, 2))
            r = t.shape[-1] // len(b)
            parts = [
                F.linear(t[..., j * r : (j + 1) * r], bj)
                if uniform
                else torch.bmm(t[..., j * r : (j + 1) * r], bj)
                for j, bj in enumerate(b)
            ]
            delta = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)) * scale
            y = (y.float() + delta).to(y.dtype)
        return y

    def _rms(self, x, w):
        # torch's rms_norm in fp32 is bit-identical to HF's RMSNorm arithmetic, in fewer ops
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, slot: int, lora: list | None, start: int = 0
    ) -> torch.Tensor:
        """Run prompt ``tokens`` [1, T] at positions start.. into KV slot ``slot`` (whose
        positions before ``start`` are filled already: a long prompt comes in chunks); logits
        [1, V] of its last token."""
        T = tokens.shape[1]
        cos, sin = self.cos[start : start + T][None, None], self.sin[start : start + T][None, None]
        return self._layers(tokens, cos, sin, lora, slot=slot, start=start)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: list[int], lora: list | None) -> torch.Tensor:
        """One token per row: ``tokens`` [B, 1] for slots 0..B-1 at positions ``pos``."""
        p = torch.tensor(pos, device=self.device)
        cos, sin = self.cos[p][:, None, None], self.sin[p][:, None, None]
        # Attention runs over each row's exact length, rows of equal length together: a longer,
        # masked length changes the kernel's summation order, and in bf16 that flips a greedy
        # token now and then. Exact lengths keep a row's result the same alone or batched (and
        # equal to HF's, which attends over exactly the cache it has).
        spans, start = [], 0
        for b in range(1, len(pos) + 1):
            if b == len(pos) or pos[b] != pos[start]:
                spans.append((start, b, pos[start] + 1))
                start = b
        return self._layers(tokens, cos, sin, lora, pos=p, spans=spans)

    def _layers(
        self, tokens, cos, sin, lora, slot=None, pos=None, spans=None, start=0
    ) -> torch.Tensor:
        B, T = tokens.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        nq, nk, _ = self.dims["qkv"]
        ng = self.dims["gu"][0]
        x = F.embedding(tokens, self.embed)
        q4 = self.int4 and slot is None  # decode steps only
        if spans is not None:
            rows = torch.arange(B, device=self.device)
            first = spans[0][2] - 1  # the one row's position when B == 1
        if start:  # a later chunk of a prompt sees the earlier ones: causal, offset by start
            seen = torch.arange(start + T, device=self.device)
            mask = seen[None, :] <= (start + torch.arange(T, device=self.device))[:, None]
        for i, layer in enumerate(self.layers):
            lo = None if lora is None else lora[i]
            h = self._rms(x, layer.ln1)
            qkv = self._linear(h, layer, "qkv", lo, q4)
            # q and k rotated together: the same arithmetic in half the ops
            qk = self._rope(qkv[..., : nq + nk].view(B, T, H + KV, D).transpose(1, 2), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[..., nq + nk :].view(B, T, KV, D).transpose(1, 2)
            if slot is not None:
                self.k[i][slot, :, start : start + T] = k[0]
                self.v[i][slot, :, start : start + T] = v[0]
                if start:
                    kc = self.k[i][slot : slot + 1, :, : start + T]
                    vc = self.v[i][slot : slot + 1, :, : start + T]
                    att = F.scaled_dot_product_attention(
                        q, kc, vc, attn_mask=mask, enable_gqa=self.gqa
                    )
                else:  # the whole prompt, or its first chunk: exactly as HF attends
                    att = F.scaled_dot_product_attention(
                        q, k.contiguous(), v.contiguous(), is_causal=True, enable_gqa=self.gqa
                    )
            elif B == 1:  # a plain copy is cheaper than index_put
                self.k[i][0, :, first] = k[0, :, 0]
                self.v[i][0, :, first] = v[0, :, 0]
            else:
                self.k[i][rows, :, pos] = k[:, :, 0]
                self.v[i][rows, :, pos] = v[:, :, 0]
            if slot is None:
                kc, vc = self.k[i], self.v[i]
                parts = [
                    F.scaled_dot_product_attention(
                        q[a:b], kc[a:b, :, :n], vc[a:b, :, :n], enable_gqa=self.gqa
                    )
                    for a, b, n in spans
                ]
                att = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + self._linear(att.transpose(1, 2).reshape(B, T, H * D), layer, "o", lo, q4)
            h = self._rms(x, layer.ln2)
            gu = self._linear(h, layer, "gu", lo, q4)
            x = x + self._linear(F.silu(gu[..., :ng]) * gu[..., ng:], layer, "down", lo, q4)
        h = self._rms(x[:, -1], self.norm)
        if q4:
            return Int4.mm(h, self.lm_head_q4).float()
        return self.mm.linear(h, self.lm_head).float()


def _fuse(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].detach() if len(ts) == 1 else torch.cat([t.detach() for t in ts], dim=0)
