"""The adapters the engine serves: PEFT LoRA dirs read and checked, stacked per layer and fused
projection so that every row of a decode batch can use its own adapter (or none).

An adapter is data a client may choose (``/v1/load_lora_adapter``), so it is checked before
anything is built from it: every A/B pair must have the shapes of this model's projections and
hold finite floats. A bad adapter is refused whole; the bank in use is never touched by a load
that fails.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch

from loraforge.adapters import AdapterError

# fused group -> the HF projections it concatenates (in output order)
GROUPS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gu": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# the same groups in a checkpoint that stores them fused already (Phi-3): LoRA targets them whole
FUSED_GROUPS = {
    "qkv": ("qkv_proj",),
    "o": ("o_proj",),
    "gu": ("gate_up_proj",),
    "down": ("down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
# Gathered weights for batches that mix adapters: each entry holds every layer's A and B for
# its rows (~80 MB for 8 rows of r=8 on SmolLM2), so the cache is bounded by bytes, not count.
CACHE_BYTES = 256 * 2**20


def proj_shapes(dims: dict, in_dims: dict, groups: dict = GROUPS) -> dict[str, tuple[int, int]]:
    """{projection: (out, in)} of a model from the runner's fused dims."""
    return {p: (dims[g][j], in_dims[g]) for g, projs in groups.items() for j, p in enumerate(projs)}


def read_lora(path: str, n_layers: int, shapes: dict[str, tuple[int, int]]) -> dict:
    """Read a PEFT LoRA dir into {(layer, proj): (A [r,in], B [out,r], scale)}, checking that it
    fits a model of ``n_layers`` layers whose projections have ``shapes`` (see proj_shapes)."""
    from pathlib import Path

    from peft import LoraConfig
    from peft.utils import load_peft_weights

    if not (Path(path) / "adapter_model.safetensors").is_file():
        # PEFT would fall back to adapter_model.bin, a pickle: never unpickle a client's file
        raise AdapterError(f"{path}: no adapter_model.safetensors (pickled .bin is not loaded)")
    try:
        cfg = LoraConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable adapter is a user error here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AdapterError(f"{path}: cannot read the PEFT adapter ({first})") from None
    if getattr(cfg, "use_dora", False):
        raise AdapterError(
            f"{path}: DoRA adapters are not supported by the engine; merge it "
            "(loraforge merge --adapter DIR --output MERGED) and use --model MERGED"
        )
    pairs: dict[tuple[int, str], list] = {}
    for key, t in weights.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"{path}: unsupported adapter weight {key} (only LoRA on linears)")
        layer, part, proj, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        pairs.setdefault((layer, proj), [None, None, part])[0 if ab == "A" else 1] = t
    result = {}
    for (layer, proj), (a, b, part) in pairs.items():
        where = f"{path}: layer {layer} {proj}"
        if a is None or b is None or layer >= n_layers or proj not in shapes:
            raise AdapterError(f"{where}: adapter does not fit this model")
        out, inp = shapes[proj]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != inp or tuple(b.shape) != (out, r):
            raise AdapterError(
                f"{where}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a "
                f"{out}x{inp} projection (expected A (r, {inp}), B ({out}, r))"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{where}: weights are {a.dtype}/{b.dtype}, not floats")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{where}: weights hold NaN or infinity")
        # the rank comes from the weights; a per-module alpha from alpha_pattern, as PEFT matches it
        name = f"model.layers.{layer}.{part}.{proj}"
        alpha_key = next((k for k in cfg.alpha_pattern or {} if key_match(k, name)), None)
        alpha = cfg.alpha_pattern[alpha_key] if alpha_key else cfg.lora_alpha
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        result[(layer, proj)] = (a, b, scale)
    return result


def key_match(pattern: str, module: str) -> bool:
    """PEFT's rule for rank/alpha_pattern keys: a regex matching the module name's tail."""
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


class LoraBank:
    """Stacked weights of all loaded adapters, per layer and fused group; row 0 is "no adapter".

    ``A[g]`` is [N, R, in], ``B[g]`` is [N, out, R] and ``S[g]`` [N, out] the scaling of each
    output; adapters of smaller rank or with fewer target modules are zero-padded, which adds
    exactly zero. The scaling is applied after ``B`` as PEFT does, so bf16 rounding matches it.
    """

    def __init__(
        self,
        adapters: dict[str, dict],
        n_layers: int,
        dims: dict,
        in_dims: dict,
        device,
        groups: dict = GROUPS,
    ):
        self.names = list(adapters)
        self.device = device
        self.A: list[dict] = [{} for _ in range(n_layers)]
        self.B: list[dict] = [{} for _ in range(n_layers)]
        self.S: list[dict] = [{} for _ in range(n_layers)]
        for g, projs in groups.items():
            rank = max(
                (t[0].shape[0] for a in adapters.values() for (_, p), t in a.items() if p in projs),
                default=0,
            )
            if rank == 0:
                continue
            for li in range(n_layers):
                self._stack(adapters, li, g, projs, rank, dims[g], in_dims[g])
        self._cache: OrderedDict[tuple, tuple[list, int]] = OrderedDict()
        self._cache_bytes = 0
        for name in self.names:  # a lone request on any adapter then needs no gathering at all
            self.rows((name,))

    def _stack(self, adapters, li: int, g: str, projs, rank: int, dims, in_dim: int) -> None:
        n = len(self.names) + 1
        a_st = torch.zeros(n, rank * len(projs), in_dim)
        # B stays one matrix per projection: a block-diagonal B would add zero terms to each
        # sum, which changes float rounding and so PEFT-equality
        b_st = [torch.zeros(n, d, rank) for d in dims]
        s_st = torch.zeros(n, sum(dims))
        for k, name in enumerate(self.names, start=1):
            row = 0
            for j, p in enumerate(projs):
                t = adapters[name].get((li, p))
                if t is not None:
                    a, b, scale = t
                    r = a.shape[0]
                    a_st[k, j * rank : j * rank + r] = a
                    b_st[j][k, :, :r] = b
                    s_st[k, row : row + b.shape[0]] = scale
                row += dims[j]
        # float32 like PEFT, which upcasts adapter weights of a bf16/fp16 base and adds the LoRA
        # term in float32 before rounding: same arithmetic, same greedy tokens
        self.A[li][g] = a_st.to(self.device)
        self.B[li][g] = [b.to(self.device) for b in b_st]
        self.S[li][g] = s_st.to(self.device)

    def index(self, name: str | None) -> int:
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise AdapterError(f"adapter '{name}' is not loaded") from None

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    def rows(self, names: tuple) -> list | None:
        """Per-layer {group: (A, B, scale, uniform)} for a batch whose rows use ``names``."""
        if all(n is None for n in names):
            return None
        hit = self._cache.get(names)
        if hit is not None:
            self._cache.move_to_end(names)
            return hit[0]
        idx = torch.tensor([self.index(n) for n in names], device=self.device)
        # One row: plain matmuls, exactly as PEFT computes them. Several rows: batched matmuls
        # even when all rows share an adapter, since a float32 matmul over 8 rows does not round
        # each row as it would alone, and a row must get the same tokens alone or batched.
        uniform = len(names) == 1
        rows, size = [], 0
        for li in range(len(self.A)):
            d = {}
            for g, a in self.A[li].items():
                b, sc = self.B[li][g], self.S[li][g]
                if uniform:  # views into the bank: no memory of their own
                    d[g] = (a[idx[0]], [t[idx[0]] for t in b], sc[idx[0]], True)
                else:
                    bt = [t[idx].transpose(1, 2) for t in b]
                    d[g] = (a[idx], bt, sc[idx][:, None], False)
                    size += sum(x.numel() * x.element_size() for x in (d[g][0], *bt, d[g][2]))
            rows.append(d)
        self._cache[names] = (rows, size)
        self._cache_bytes += size
        while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, (_, freed) = self._cache.popitem(last=False)  # least recently used first
            self._cache_bytes -= freed
        return rows
