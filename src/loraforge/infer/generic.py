"""The engine's path for every causal LM the fast runner does not compute: the HF model's own
forward and KV cache, one request row at a time, each row with its own LoRA adapter (or none).

``infer/runner.py`` re-implements the decoder layer for speed, so it knows only the families
``cpu/families.py`` marks ``runner=True``; anything else transformers loads (olmo2, phi3,
gemma2, ...) comes here instead of being refused. Same interface as ``Runner``, so the
scheduler and the engine do not know which one they drive.

Why one row per forward: a batched forward over rows of different lengths needs a padded,
masked attention, and both padding and batching change the float summation order, so a row's
tokens would depend on its neighbours. One row per forward is exactly HF ``generate`` at batch
1 (a row gets the same tokens alone or batched) and costs throughput, not correctness: decode
time grows with the batch instead of staying nearly flat.

LoRA: a forward hook on each adapted ``nn.Linear`` adds ``B(A(x)) * scale`` for the row being
run, with PEFT's arithmetic (fp32 adapter weights and sum, rounded to the base's dtype after),
from tensors ``lora_bank.read_lora`` has read and checked (safetensors only, shapes, finite).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re

import torch
import torch.nn.functional as F

from loraforge.adapters import AdapterError
from loraforge.cpu import families
from loraforge.infer.lora_bank import read_lora
from loraforge.models import ModelError

log = logging.getLogger(__name__)
# the projections read_lora accepts (its _KEY): layers.N.(self_attn|mlp).<name>_proj
_TARGET = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")
# Tests set this to drive a fast-runner family (llama) through this path, for parity checks.
FORCE_ENV = "LORAFORGE_GENERIC_RUNNER"


def pick_runner(model, slots: int, dtype: torch.dtype, device: torch.device, int4: bool = False):
    """The fast ``Runner`` where ``cpu/families.py`` says it computes this model, else a
    ``GenericRunner``; one line says which (the generic path is slower, and users ask why)."""
    model_type = model.config.model_type
    if families.engine_path(model_type) == "fast runner" and os.environ.get(FORCE_ENV) != "1":
        from loraforge.infer.runner import Runner

        log.info("engine: fast runner for %s", model_type)
        return Runner(model, slots, dtype, device, int4)
    from loraforge.console import err_console

    err_console.print(
        f"[dim]engine: generic path for '{model_type}' (transformers' own forward, one row "
        "at a time): slower than the fast runner, same results[/dim]"
    )
    return GenericRunner(model, slots, dtype, device, int4)


class GenericRunner:
    """Per-slot HF KV caches and per-row adapters over an HF causal LM; not thread-safe."""

    def __init__(
        self, model, slots: int, dtype: torch.dtype, device: torch.device, int4: bool = False
    ):
        cfg = model.config
        if int4:
            supported = ", ".join(families.runner_types())
            raise ModelError(
                f"--dtype int4 needs the fast runner ({supported} models), not '{cfg.model_type}'"
            )
        self.model, self.cfg = model, cfg
        self.slots = slots
        self.dtype, self.device = dtype, device
        # a model without a position limit (none of the families known today) gets a window
        # the size the fast runner's cache starts from doubled a few times
        self.max_len = getattr(cfg, "max_position_embeddings", None) or 4096
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 names the cache argument `cache`; earlier 5.x `past_key_values`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.caches: list = [None] * slots
        self.targets: dict[tuple[int, str], torch.nn.Linear] = {}
        for name, module in model.named_modules():
            m = _TARGET.search(name)
            if m and isinstance(module, torch.nn.Linear):
                key = (int(m.group(1)), m.group(2))
                self.targets[key] = module
                module.register_forward_hook(self._lora_hook(key))
        self.n_layers = 1 + max((li for li, _ in self.targets), default=-1)
        self.shapes = {p: tuple(m.weight.shape) for (_, p), m in self.targets.items()}
        self._adapters: dict[str, dict] = {}
        self._row: dict | None = None  # the adapter of the row being run now

    # ---- KV cache (one HF cache object per slot; they grow as HF's do) ------------------------
    def ensure_capacity(self, length: int) -> None:
        """Nothing to reserve: HF's dynamic cache grows with the sequence."""

    def shrink(self, length: int = 0) -> None:
        """With nothing running (``length`` 0) drop every slot's cache; else keep them."""
        if length == 0:
            self.caches = [None] * self.slots

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Hand a slot's cache to another slot (keeps the running rows contiguous)."""
        self.caches[dst], self.caches[src] = self.caches[src], None

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot ``dst`` a copy of ``src``'s first ``length`` positions (choices of one
        prompt); raises where HF's cache cannot be cut back (a sliding window moved past)."""
        cache = self.caches[src]
        extra = cache.get_seq_length() - length
        # a sliding-window layer has dropped old positions and cannot give them back
        if extra < 0 or (extra and any(type(la).__name__ != "DynamicLayer" for la in cache.layers)):
            raise RuntimeError(f"slot {src} cannot be cut back to {length} positions")
        if src != dst:
            cache = copy.deepcopy(cache)
        if extra:  # transformers 5.24 takes the count to remove (< 0), earlier the length to keep
            by_count = "tokens_to_remove" in inspect.signature(cache.crop).parameters
            cache.crop(-extra if by_count else length)
        self.caches[dst] = cache

    # ---- adapters ---------------------------------------------------------------------------
    def read_adapter(self, path: str) -> dict:
        """A PEFT LoRA dir read and checked against this model's adapted projections."""
        adapter = read_lora(path, self.n_layers, self.shapes)
        for li, proj in adapter:  # read_lora checks shapes per projection name; layers may vary
            module = self.targets.get((li, proj))
            a, b, _ = adapter[(li, proj)]
            if module is None or tuple(module.weight.shape) != (b.shape[0], a.shape[1]):
                raise AdapterError(f"{path}: layer {li} {proj}: adapter does not fit this model")
        return adapter

    def set_adapters(self, adapters: dict[str, dict]) -> None:
        """Make {name: read_adapter(...)} the loaded set; built whole before it is swapped in."""
        self._adapters = {
            name: {k: (a.to(self.device), b.to(self.device), s) for k, (a, b, s) in ad.items()}
            for name, ad in adapters.items()
        }

    def clear_lora_cache(self) -> None:
        """Nothing is gathered per batch here (the fast runner's bank caches gathered rows)."""

    def lora_rows(self, names: tuple) -> list | None:
        """Each row's adapter tensors (None for the base model), or None when no row has one."""
        if all(n is None for n in names):
            return None
        rows = []
        for n in names:
            if n is not None and n not in self._adapters:
                raise AdapterError(f"adapter '{n}' is not loaded")
            rows.append(None if n is None else self._adapters[n])
        return rows

    def _lora_hook(self, key: tuple[int, str]):
        def hook(module, args, out):
            pair = None if self._row is None else self._row.get(key)
            if pair is None:
                return None
            a, b, scale = pair
            # PEFT's arithmetic: fp32 input and adapter weights, the sum rounded to the base dtype
            delta = F.linear(F.linear(args[0].float(), a), b) * scale
            return (out.float() + delta).to(out.dtype)

        return hook

    # ---- forward ----------------------------------------------------------------------------
    def _forward(
        self, tokens: torch.Tensor, cache, start: int, adapter: dict | None, every: bool = False
    ):
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)[None]
        self._row = adapter
        try:
            out = self.model(
                input_ids=tokens,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=0 if every else 1,  # 0: every position's (echo)
                **{self._cache_arg: cache},
            )
        finally:
            self._row = None
        return out.logits[0].float() if every else out.logits[:, -1].float()

    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,
        slot: int,
        lora: list | None,
        start: int = 0,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run prompt ``tokens`` [1, T] at positions start.. into slot ``slot`` (its cache holds
        the ``start`` positions before); logits [1, V] of the last token, or [T, V] of every
        token with ``all_logits`` (echo)."""
        from transformers import DynamicCache

        if start == 0:  # as HF generate makes it: sliding-window layers where the config has them
            self.caches[slot] = DynamicCache(config=self.cfg)
        cache = self.caches[slot]
        if cache is None or cache.get_seq_length() != start:
            raise RuntimeError(f"slot {slot} holds no cache of {start} positions to continue")
        return self._forward(tokens, cache, start, lora[0] if lora else None, all_logits)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: list[int], lora: list | None) -> torch.Tensor:
        """One token per row: ``tokens`` [B, 1] for slots 0..B-1 at positions ``pos``."""
        logits = []
        for b, p in enumerate(pos):
            cache = self.caches[b]
            if cache is None or cache.get_seq_length() != p:
                raise RuntimeError(f"slot {b} holds no cache of {p} positions to continue")
            logits.append(self._forward(tokens[b : b + 1], cache, p, lora[b] if lora else None))
        return torch.cat(logits)
