"""A lean forward pass for Llama-style decoders with a per-slot KV cache and batched multi-LoRA.

Why not ``model.generate``: at 135M parameters on a CPU the time goes to per-operator overhead,
not arithmetic, and HF's generic forward runs several hundred small ops per token. Here each layer
is ~15 ops: q/k/v and gate/up are fused into one matmul each, the KV cache is preallocated per
slot (continuous batching: a request joins or leaves the running batch without touching the
others), and each row of a batch can use a different LoRA adapter (or none) through one pair of
batched matmuls per fused projection. The weights are the HF model's own (the fused matrices are
copies; the HF model keeps views of them), so results match HF ``generate`` up to float rounding.

The families it computes are families.py's ``runner=True`` ones; how their layers differ from
Llama's (Gemma's norms and softcaps, q/k norms, sliding windows, partial RoPE) is infer/layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.cpu import families, onednn
from loraforge.cpu.int4 import Int4
from loraforge.infer import layers
from loraforge.infer.layers import Norm
from loraforge.infer.lora_bank import FUSED_GROUPS, GROUPS, LoraBank, proj_shapes, read_lora
from loraforge.models import ModelError


@dataclass
class Layer:
    norms: dict[str, Norm]  # "in", "attn_out" (Gemma), "mlp_in", "mlp_out" (Gemma), "qk"
    w: dict[str, torch.Tensor]  # fused group -> weight [out, in]
    b: dict[str, torch.Tensor | None]
    window: int | None  # sliding window: a query sees this many keys (itself included)
    rope: str  # which cos/sin table (Gemma 3: one per layer type)
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
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ModelError(f"'{cfg.model_type}' with bidirectional attention is not a chat model")
        spec = family.block
        self.cfg = cfg
        self.slots = slots
        self.dtype, self.device = dtype, device
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = cfg.max_position_embeddings
        eps = cfg.rms_norm_eps
        # Gemma: scores scaled by query_pre_attn_scalar**-0.5 (not head_dim's), and tanh-capped
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        self.scale = None if scalar is None else scalar**-0.5
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_cap = getattr(cfg, "final_logit_softcapping", None)
        inner = model.model
        self.embed = inner.embed_tokens.weight
        # HF multiplies by its embed_scale buffer cast to the weights' dtype (bf16: 55.4 -> 55.5)
        self.embed_scale = inner.embed_tokens.embed_scale if spec.scaled_embed else None
        self.norm = Norm(inner.norm.weight, eps, spec.unit_offset_norm)
        self.lm_head = model.lm_head.weight
        # on CPU, bf16 weights pre-packed for oneDNN (cpu/onednn.py): ~1.6x faster decode matmuls
        self.mm = onednn.Linear(dtype, device, slots)
        if int4 and not (dtype == torch.bfloat16 and Int4.usable(self.lm_head)):
            raise ModelError("int4 weights need a CPU, bfloat16 and layer widths divisible by 32")
        self.int4 = int4 and Int4.available()  # else bf16 weights, with one warning
        self.lm_head_q4 = Int4.pack(self.lm_head) if self.int4 else None
        self.lm_head = self.mm.pack(self.lm_head)
        self.groups = FUSED_GROUPS if spec.fused_projections else GROUPS
        self.act = layers.activation(cfg, inner.layers[0].mlp)
        types = getattr(cfg, "layer_types", None)
        self.layers: list[Layer] = []
        self.dims: dict[str, tuple[int, ...]] = {}
        for i, hf in enumerate(inner.layers):
            w, b = {}, {}
            for g, projs in self.groups.items():
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
            kind = self._kind(i, types, spec.rope_per_layer_type)
            self.layers.append(Layer(self._norms(hf, spec, eps), w, b, *kind, q4))
        self.nq, self.nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.ng = cfg.intermediate_size
        self.in_dims = {
            "qkv": cfg.hidden_size,
            "o": self.nq,
            "gu": cfg.hidden_size,
            "down": self.ng,
        }
        probe = torch.empty(0, dtype=dtype, device=device)
        rope_types = sorted({la.rope for la in self.layers}) if spec.rope_per_layer_type else [None]
        self.rope = {
            t or "": layers.rope_tables(inner.rotary_emb, cfg, self.max_len, probe, t)
            for t in rope_types
        }
        self.slots = slots
        self.cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ensure_capacity(256)
        self.bank = self._bank({})

    def _norms(self, hf, spec, eps: float) -> dict[str, Norm]:
        unit = spec.unit_offset_norm
        if spec.sandwich_norms:  # Gemma: post_attention_layernorm normalises attention's output
            names = {
                "in": "input_layernorm",
                "attn_out": "post_attention_layernorm",
                "mlp_in": "pre_feedforward_layernorm",
                "mlp_out": "post_feedforward_layernorm",
            }
        else:
            names = {"in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
        norms = {k: Norm(getattr(hf, n).weight, eps, unit) for k, n in names.items()}
        if spec.qk_norm:  # one weight row per head: q and k heads normalised in one call
            qn, kn = hf.self_attn.q_norm.weight, hf.self_attn.k_norm.weight
            rows = torch.cat((qn.expand(self.n_heads, -1), kn.expand(self.n_kv, -1)))
            norms["qk"] = Norm(rows, eps, unit)
        return norms

    def _kind(self, i: int, types, rope_per_type: bool) -> tuple[int | None, str]:
        """(sliding window, RoPE table) of layer ``i``: with layer_types (Qwen2/3, Gemma) only
        its sliding_attention layers have the window; without (Mistral, Phi-3) all layers do."""
        window = getattr(self.cfg, "sliding_window", None)
        if not types:
            return window, ""
        sliding = types[i] == "sliding_attention"
        return (window if sliding else None), (types[i] if rope_per_type else "")

    def _bank(self, adapters: dict) -> LoraBank:
        dims, in_dims = self.dims, self.in_dims
        return LoraBank(adapters, len(self.layers), dims, in_dims, self.device, self.groups)

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

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot ``dst`` the first ``length`` positions of ``src`` (choices of one prompt);
        positions past ``length`` are never read (a row attends over its own length only)."""
        if src != dst:
            self.move_slot(src, dst, length)

    # ---- adapters (infer/lora_bank.py) -------------------------------------------------------
    def read_adapter(self, path: str) -> dict:
        """A PEFT LoRA dir read and checked against this model's layers and projection shapes."""
        shapes = proj_shapes(self.dims, self.in_dims, self.groups)
        return read_lora(path, len(self.layers), shapes)

    def set_adapters(self, adapters: dict[str, dict]) -> None:
        """Rebuild the LoRA bank from {name: read_adapter(...)}; cheap (a few MB per adapter).
        The new bank is built first and swapped in whole, so a failure leaves the old one."""
        self.bank = self._bank(adapters)

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

    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,
        slot: int,
        lora: list | None,
        start: int = 0,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run prompt ``tokens`` [1, T] at positions start.. into KV slot ``slot`` (whose
        positions before ``start`` are filled already: a long prompt comes in chunks); logits
        [1, V] of its last token, or [T, V] of every token with ``all_logits`` (echo)."""
        T = tokens.shape[1]
        rope = {k: (c[start : start + T][None, None], s[start : start + T][None, None])
                for k, (c, s) in self.rope.items()}  # fmt: skip
        return self._layers(tokens, rope, lora, slot=slot, start=start, every=all_logits)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: list[int], lora: list | None) -> torch.Tensor:
        """One token per row: ``tokens`` [B, 1] for slots 0..B-1 at positions ``pos``."""
        p = torch.tensor(pos, device=self.device)
        rope = {k: (c[p][:, None, None], s[p][:, None, None]) for k, (c, s) in self.rope.items()}
        # Attention runs over each row's exact length, rows of equal length together: a longer,
        # masked length changes the kernel's summation order, and in bf16 that flips a greedy
        # token now and then. Exact lengths keep a row's result the same alone or batched (and
        # equal to HF's, which attends over exactly the cache it has).
        spans, start = [], 0
        for b in range(1, len(pos) + 1):
            if b == len(pos) or pos[b] != pos[start]:
                spans.append((start, b, pos[start] + 1))
                start = b
        return self._layers(tokens, rope, lora, pos=p, spans=spans)

    def _attend_prompt(self, i: int, q, k, v, slot: int, start: int, masks: dict):
        """Attention of a prompt chunk at ``start`` in ``slot`` (its k, v written already)."""
        T, window = q.shape[2], self.layers[i].window
        if not start and (window is None or T <= window):  # exactly as HF attends a prompt
            return layers.attend(q, k.contiguous(), v.contiguous(), None, True, *self._caps())
        lo = 0 if window is None else max(0, start + 1 - window)  # the oldest key any query sees
        if window not in masks:
            masks[window] = layers.window_mask(start, T, lo, start + T, window, self.device)
        kc = self.k[i][slot : slot + 1, :, lo : start + T]
        vc = self.v[i][slot : slot + 1, :, lo : start + T]
        return layers.attend(q, kc, vc, masks[window], False, *self._caps())

    def _caps(self) -> tuple:
        return self.scale, self.attn_cap

    def _layers(
        self, tokens, rope, lora, slot=None, pos=None, spans=None, start=0, every=False
    ) -> torch.Tensor:
        B, T = tokens.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        nq, nk, ng = self.nq, self.nk, self.ng
        x = F.embedding(tokens, self.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        q4 = self.int4 and slot is None  # decode steps only
        if spans is not None:
            rows = torch.arange(B, device=self.device)
            first = spans[0][2] - 1  # the one row's position when B == 1
        masks: dict = {}  # a prompt chunk's attention mask per sliding window, built once
        for i, layer in enumerate(self.layers):
            lo = None if lora is None else lora[i]
            nm = layer.norms
            h = nm["in"](x)
            qkv = self._linear(h, layer, "qkv", lo, q4)
            qk = qkv[..., : nq + nk].view(B, T, H + KV, D)
            if "qk" in nm:
                qk = nm["qk"](qk)
            # q and k rotated together: the same arithmetic in half the ops
            qk = layers.rope(qk.transpose(1, 2), *rope[layer.rope])
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[..., nq + nk :].view(B, T, KV, D).transpose(1, 2)
            if slot is not None:
                self.k[i][slot, :, start : start + T] = k[0]
                self.v[i][slot, :, start : start + T] = v[0]
                att = self._attend_prompt(i, q, k, v, slot, start, masks)
            else:
                if B == 1:  # a plain copy is cheaper than index_put
                    self.k[i][0, :, first] = k[0, :, 0]
                    self.v[i][0, :, first] = v[0, :, 0]
                else:
                    self.k[i][rows, :, pos] = k[:, :, 0]
                    self.v[i][rows, :, pos] = v[:, :, 0]
                kc, vc, w = self.k[i], self.v[i], layer.window
                parts = [
                    layers.attend(
                        q[a:b], kc[a:b, :, m:n], vc[a:b, :, m:n], None, False, *self._caps()
                    )
                    for a, b, n in spans
                    for m in [0 if w is None else max(0, n - w)]  # a window sees its last w
                ]
                att = parts[0] if len(parts) == 1 else torch.cat(parts)
            y = self._linear(att.transpose(1, 2).reshape(B, T, H * D), layer, "o", lo, q4)
            x = x + (nm["attn_out"](y) if "attn_out" in nm else y)
            h = nm["mlp_in"](x)
            gu = self._linear(h, layer, "gu", lo, q4)
            y = self._linear(self.act(gu[..., :ng]) * gu[..., ng:], layer, "down", lo, q4)
            x = x + (nm["mlp_out"](y) if "mlp_out" in nm else y)
        h = self.norm(x[0] if every else x[:, -1])  # every: one prompt's T positions
        logits = Int4.mm(h, self.lm_head_q4) if q4 else self.mm.linear(h, self.lm_head)
        if self.final_cap is not None:  # Gemma 2: in the model's dtype, as HF caps them
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return logits.float()


def _fuse(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].detach() if len(ts) == 1 else torch.cat([t.detach() for t in ts], dim=0)
