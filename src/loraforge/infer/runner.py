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

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.adapters import AdapterError
from loraforge.infer.int4 import Int4
from loraforge.models import ModelError

SUPPORTED = ("llama", "mistral", "qwen2")
# fused group -> the HF projections it concatenates (in output order)
GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gu": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    w: dict[str, torch.Tensor]  # fused group -> weight [out, in]
    b: dict[str, torch.Tensor | None]
    q4: dict[str, tuple] | None = None  # fused group -> int4 weights, for decoding (see Int4)


class LoraBank:
    """Stacked weights of all loaded adapters, per layer and fused group; row 0 is "no adapter".

    ``A[g]`` is [N, R, in], ``B[g]`` is [N, out, R] and ``S[g]`` [N, out] the scaling of each
    output; adapters of smaller rank or with fewer target modules are zero-padded, which adds
    exactly zero. The scaling is applied after ``B`` as PEFT does, so bf16 rounding matches it.
    """

    def __init__(self, names: list[str], A: list[dict], B: list[dict], S: list[dict]):
        self.names = names
        self.A = A
        self.B = B
        self.S = S

    def index(self, name: str | None) -> int:
        return 0 if name is None else self.names.index(name) + 1


def read_lora(path: str, runner: Runner) -> dict:
    """Read a PEFT LoRA dir into {(layer, proj): (A [r,in], B [out,r], scale)}."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    try:
        cfg = LoraConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable adapter is a user error here
        raise AdapterError(f"{path}: cannot read the PEFT adapter ({e})") from e
    if getattr(cfg, "use_dora", False):
        raise AdapterError(
            f"{path}: DoRA adapters are not supported by the engine; merge it "
            "(loraforge merge --adapter DIR --output MERGED) and use --model MERGED"
        )
    out: dict[tuple[int, str], list] = {}
    for key, t in weights.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"{path}: unsupported adapter weight {key} (only LoRA on linears)")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        out.setdefault((layer, proj), [None, None])[0 if ab == "A" else 1] = t
    result = {}
    for (layer, proj), (a, b) in out.items():
        if a is None or b is None or layer >= len(runner.layers):
            raise AdapterError(f"{path}: adapter does not fit this model (layer {layer} {proj})")
        r = a.shape[0]
        # the rank comes from the weights; a per-module alpha from alpha_pattern, as PEFT matches it
        alpha_key = next((k for k in cfg.alpha_pattern or {} if key_match(k, layer, proj)), None)
        alpha = cfg.alpha_pattern[alpha_key] if alpha_key else cfg.lora_alpha
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        result[(layer, proj)] = (a.float(), b.float(), scale)
    return result


def key_match(pattern: str, layer: int, proj: str) -> bool:
    """PEFT's rule for rank/alpha_pattern keys: a regex matching the module name's tail."""
    part = "self_attn" if proj in GROUPS["qkv"] + GROUPS["o"] else "mlp"
    return re.match(rf"(.*\.)?({pattern})$", f"model.layers.{layer}.{part}.{proj}") is not None


class Runner:
    """Owns the weights, the KV cache of ``slots`` rows and the LoRA bank; not thread-safe."""

    def __init__(
        self, model, slots: int, dtype: torch.dtype, device: torch.device, int4: bool = False
    ):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ModelError(
                f"the engine supports {', '.join(SUPPORTED)} models, not '{cfg.model_type}'"
            )
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
        # On CPU, bf16 weights pre-packed in oneDNN's blocked layout: the same numbers as F.linear
        # (bit-identical) at ~1.6x the speed for the 1..8-row matmuls of decoding (AMX/AVX512).
        mkldnn = torch.backends.mkldnn.is_available()
        self.packed = device.type == "cpu" and dtype == torch.bfloat16 and mkldnn
        if int4 and not (dtype == torch.bfloat16 and Int4.usable(self.lm_head)):
            raise ModelError("int4 weights need a CPU, bfloat16 and layer widths divisible by 32")
        self.int4 = int4
        self.lm_head_q4 = Int4.pack(self.lm_head) if int4 else None
        self.lm_head = self._pack(self.lm_head)
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
            q4 = {g: Int4.pack(t) for g, t in w.items()} if int4 else None
            w = {g: self._pack(t) for g, t in w.items()}
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
        self.bank = LoraBank([], *([{} for _ in self.layers] for _ in range(3)))
        self._lora_cache: dict[tuple, list | None] = {}

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

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's cache to another slot (keeps the running rows contiguous)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # ---- adapters -------------------------------------------------------------------------
    def set_adapters(self, adapters: dict[str, dict]) -> None:
        """Rebuild the LoRA bank from {name: read_lora(...)}; cheap (a few MB per adapter)."""
        names = list(adapters)
        A: list[dict] = [{} for _ in self.layers]
        B: list[dict] = [{} for _ in self.layers]
        S: list[dict] = [{} for _ in self.layers]
        for g, projs in GROUPS.items():
            rank = max(
                (t[0].shape[0] for a in adapters.values() for (_, p), t in a.items() if p in projs),
                default=0,
            )
            if rank == 0:
                continue
            R = rank * len(projs)
            out = sum(self.dims[g])
            for li in range(len(self.layers)):
                a_st = torch.zeros(len(names) + 1, R, self.in_dims[g])
                # B stays one matrix per projection: a block-diagonal B would add zero terms to
                # each sum, which changes float rounding and so PEFT-equality
                b_st = [torch.zeros(len(names) + 1, d, rank) for d in self.dims[g]]
                s_st = torch.zeros(len(names) + 1, out)
                for n, name in enumerate(names, start=1):
                    row = 0
                    for j, p in enumerate(projs):
                        t = adapters[name].get((li, p))
                        if t is not None:
                            a, b, scale = t
                            r = a.shape[0]
                            a_st[n, j * rank : j * rank + r] = a
                            b_st[j][n, :, :r] = b
                            s_st[n, row : row + b.shape[0]] = scale
                        row += self.dims[g][j]
                # float32 like PEFT, which upcasts adapter weights of a bf16/fp16 base and adds the
                # LoRA term in float32 before rounding: same arithmetic, same greedy tokens
                A[li][g] = a_st.to(self.device)
                B[li][g] = [b.to(self.device) for b in b_st]
                S[li][g] = s_st.to(self.device)
        self.bank = LoraBank(names, A, B, S)
        self._lora_cache = {}
        for name in names:  # a lone request on any adapter then needs no gathering at all
            self.lora_rows((name,))

    def lora_rows(self, names: tuple) -> list | None:
        """Per-layer {group: (A, B)} for a batch whose rows use ``names`` (cached per batch)."""
        if all(n is None for n in names):
            return None
        hit = self._lora_cache.get(names)
        if hit is not None:
            return hit
        idx = torch.tensor([self.bank.index(n) for n in names], device=self.device)
        # One row: plain matmuls, exactly as PEFT computes them. Several rows: batched matmuls
        # even when all rows share an adapter, since a float32 matmul over 8 rows does not round
        # each row as it would alone, and a row must get the same tokens alone or batched.
        uniform = len(names) == 1
        rows = []
        for li in range(len(self.layers)):
            d = {}
            for g, a in self.bank.A[li].items():
                b, sc = self.bank.B[li][g], self.bank.S[li][g]
                if uniform:
                    d[g] = (a[idx[0]], [t[idx[0]] for t in b], sc[idx[0]], True)
                else:
                    d[g] = (a[idx], [t[idx].transpose(1, 2) for t in b], sc[idx][:, None], False)
            rows.append(d)
        if len(self._lora_cache) > 64:
            self._lora_cache.clear()
        self._lora_cache[names] = rows
        return rows

    # ---- forward --------------------------------------------------------------------------
    def _pack(self, w: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return w
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.slots)

    def _mm(self, x, w, b=None) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def _linear(self, x, layer: Layer, g: str, lora: dict | None, q4: bool) -> torch.Tensor:
        if q4:
            y = Int4.mm(x, layer.q4[g])
            if layer.b[g] is not None:
                y = y + layer.b[g]
        else:
            y = self._mm(x, layer.w[g], layer.b[g])
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
    def prefill(self, tokens: torch.Tensor, slot: int, lora: list | None) -> torch.Tensor:
        """Run a prompt ``tokens`` [1, T] into KV slot ``slot``; logits [1, V] of its last token."""
        T = tokens.shape[1]
        cos, sin = self.cos[:T][None, None], self.sin[:T][None, None]
        return self._layers(tokens, cos, sin, lora, slot=slot)

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

    def _layers(self, tokens, cos, sin, lora, slot=None, pos=None, spans=None) -> torch.Tensor:
        B, T = tokens.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        nq, nk, _ = self.dims["qkv"]
        ng = self.dims["gu"][0]
        x = F.embedding(tokens, self.embed)
        q4 = self.int4 and slot is None  # decode steps only
        if spans is not None:
            rows = torch.arange(B, device=self.device)
            first = spans[0][2] - 1  # the one row's position when B == 1
        for i, layer in enumerate(self.layers):
            lo = None if lora is None else lora[i]
            h = self._rms(x, layer.ln1)
            qkv = self._linear(h, layer, "qkv", lo, q4)
            # q and k rotated together: the same arithmetic in half the ops
            qk = self._rope(qkv[..., : nq + nk].view(B, T, H + KV, D).transpose(1, 2), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[..., nq + nk :].view(B, T, KV, D).transpose(1, 2)
            if slot is not None:
                self.k[i][slot, :, :T] = k[0]
                self.v[i][slot, :, :T] = v[0]
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
        return self._mm(h, self.lm_head).float()


def _fuse(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].detach() if len(ts) == 1 else torch.cat([t.detach() for t in ts], dim=0)
