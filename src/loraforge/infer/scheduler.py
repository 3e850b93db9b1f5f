"""Continuous batching, on the engine's worker thread: which requests run, and one step of them.

Requests join the running batch as soon as a slot is free and leave it the moment they finish;
row b of the batch uses KV slot b. A prompt up to PREFILL_CHUNK tokens is prefilled whole as it
joins (exactly as HF attends it); a longer one goes in chunks of PREFILL_CHUNK tokens, one chunk
between two decode steps, so a 4k-token prompt stalls the other streams for one chunk at a time
instead of for its whole prefill (vLLM's and llama.cpp's chunked prefill). While it is being
prefilled it holds the slot after the running rows, and no other request is admitted.

One bad row fails alone: a row whose sampling raises or whose logits are not finite (a NaN
adapter, an overflowing penalty), or whose adapter was unloaded while it ran, ends with its own
error and leaves the batch before the next step; the other rows go on.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraforge.adapters import AdapterError
from loraforge.errors import UserError
from loraforge.infer.request import RequestHandle
from loraforge.infer.sampling import is_greedy, sample

log = logging.getLogger(__name__)
PREFILL_CHUNK = 512  # tokens of a long prompt run between two decode steps


@dataclass(frozen=True)
class StepEvent:
    """What the worker just did, as step listeners see it (``Engine.add_step_listener``).

    ``kind``: "prefill" (a request joined the batch: its prompt ran and its first token was
    sampled), "decode" (one token for every running row) or "adapters" (an adapter was loaded
    or unloaded). ``adapters``: the adapter of each row in row order (None: the base model);
    for "adapters", the names now loaded. ``tokens``: completion tokens the step added (a row
    that sampled a stop token adds none)."""

    kind: str
    adapters: tuple[str | None, ...]
    tokens: int = 0


@dataclass
class EngineStats:
    """Running totals since the engine started (``Engine.stats``), kept by the worker."""

    prefills: int = 0
    steps: int = 0  # decode steps
    rows: int = 0  # rows decoded, over all steps: rows / steps is the mean batch
    max_rows: int = 0  # the largest batch decoded in one step
    tokens: int = 0  # completion tokens generated (prefills and decode steps)


class RowError(UserError):
    """One request failed on its own (its sampling, its logits, its adapter)."""


class Scheduler:
    """The running batch of one engine. Not thread-safe: only the worker thread calls it."""

    def __init__(
        self,
        runner,
        requests: queue.Queue,
        max_batch: int,
        stop_ids: set[int],
        adapters: Callable[[], dict],
        record: Callable[[str, tuple, int], None],
    ):
        self.runner = runner
        self.requests = requests
        self.max_batch = max_batch
        self.stop_ids = stop_ids
        self.adapters = adapters  # the names loaded now (the engine's dict, read each step)
        self.record = record
        self.active: list[RequestHandle] = []
        self.prefilling: RequestHandle | None = None  # in slot len(active), ``prefilled`` done
        self.prefilled = 0

    def busy(self) -> bool:
        return bool(self.active) or self.prefilling is not None

    def step(self) -> None:
        """Admit what fits, advance a chunked prefill by one chunk, decode one token per row."""
        self._admit()
        if self.prefilling is not None:
            self._prefill_chunk()
        if self.active:
            self._decode()
        if not self.busy():
            self.runner.shrink(0)  # a long request's cache goes back once nothing runs

    def fail_all(self, error: BaseException) -> None:
        for h in self.active:
            h._fail(error)
        if self.prefilling is not None:
            self.prefilling._fail(error)
        self.active, self.prefilling = [], None

    # ---- joining ------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.prefilling is None and len(self.active) < self.max_batch:
            try:
                h = self.requests.get_nowait()
            except queue.Empty:
                return
            if h.cancelled:
                h._finish("cancelled")
                continue
            try:
                self._start(h)
            except Exception as e:  # noqa: BLE001 - fail this request only
                h._fail(e)

    def _start(self, h: RequestHandle) -> None:
        if h.adapter is not None and h.adapter not in self.adapters():
            raise AdapterError(f"adapter '{h.adapter}' was unloaded")
        h.max_new = min(h.params.max_new_tokens, self.runner.max_len - len(h.prompt))
        if h.max_new <= 0:
            h._finish("length")
            return
        self.runner.ensure_capacity(len(h.prompt) + h.max_new)
        self.prefilling, self.prefilled = h, 0
        if len(h.prompt) <= PREFILL_CHUNK:
            self._prefill_chunk()  # a short prompt joins at once, in one pass

    def _prefill_chunk(self) -> None:
        h, start = self.prefilling, self.prefilled
        if h.cancelled or (h.adapter is not None and h.adapter not in self.adapters()):
            self.prefilling = None
            if h.cancelled:
                h._finish("cancelled")
            else:
                h._fail(AdapterError(f"adapter '{h.adapter}' was unloaded"))
            return
        end = min(len(h.prompt), start + PREFILL_CHUNK)
        ids = torch.tensor([h.prompt[start:end]], device=self.runner.device)
        try:
            lora = self.runner.lora_rows((h.adapter,))
            logits = self.runner.prefill(ids, len(self.active), lora, start=start)
        except Exception as e:  # noqa: BLE001 - this request only; its slot is simply reused
            self.prefilling = None
            h._fail(e)
            return
        self.prefilled = end
        if end < len(h.prompt):
            return  # the next chunk after the next decode step
        self.prefilling = None
        self.active.append(h)
        self.record("prefill", (h.adapter,), self._accept([h], logits))

    # ---- one token ----------------------------------------------------------------------------
    def _decode(self) -> None:
        loaded = self.adapters()
        for h in list(self.active):  # unloaded while running: that row ends, the rest go on
            if h.adapter is not None and h.adapter not in loaded:
                h._fail(AdapterError(f"adapter '{h.adapter}' was unloaded while in use"))
                self._retire(h)
        rows = self.active
        if not rows:
            return
        toks = torch.tensor([[h.tokens[-1]] for h in rows], device=self.runner.device)
        pos = [len(h.prompt) + len(h.tokens) - 1 for h in rows]
        names = tuple(h.adapter for h in rows)
        logits = self.runner.decode(toks, pos, self.runner.lora_rows(names))
        self.record("decode", names, self._accept(list(rows), logits))

    def _accept(self, rows: list[RequestHandle], logits: torch.Tensor) -> int:
        """Sample one token per row, feed the text trackers, and retire finished rows; returns
        the number of tokens added to completions."""
        greedy = logits.argmax(-1).tolist()
        finite = torch.isfinite(logits).all(-1).tolist()
        finished, added = [], 0
        for b, h in enumerate(rows):
            if h.done():
                finished.append(h)
                continue
            if h.cancelled:
                h._finish("cancelled")
                finished.append(h)
                continue
            try:
                tok = self._sample(h, logits[b], greedy[b], finite[b])
            except Exception as e:  # noqa: BLE001 - this row fails, the batch goes on
                h._fail(e if isinstance(e, UserError) else RowError(f"sampling failed: {e}"))
                finished.append(h)
                continue
            if h.t_first is None:
                h.t_first = time.perf_counter()
            if tok in self.stop_ids:
                h._finish("stop")
                finished.append(h)
                continue
            h.tokens.append(tok)
            added += 1
            if h.history or h.params.repetition_penalty != 1.0:
                h.history.append(tok)
            h._emit(h.tracker.add(tok))
            if h.tracker.stopped:
                h._finish("stop")
                finished.append(h)
            elif len(h.tokens) >= h.max_new:
                h._finish("length")
                finished.append(h)
        for h in finished:
            self._retire(h)
        return added

    @staticmethod
    def _sample(h: RequestHandle, logits: torch.Tensor, greedy: int, finite: bool) -> int:
        if not finite:
            which = f"adapter '{h.adapter}'" if h.adapter else "the base model"
            raise RowError(f"the model's scores became NaN or infinite ({which}); request ended")
        return greedy if is_greedy(h.params) else sample(logits, h.params, h.gen, h.history)

    def _retire(self, h: RequestHandle) -> None:
        """Free a row's slot, moving the last row into it so rows stay 0..B-1 (and a prompt
        being prefilled into the slot right after them)."""
        i = self.active.index(h)
        last = len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self.runner.move_slot(last, i, len(moved.prompt) + len(moved.tokens))
            self.active[i] = moved
        self.active.pop()
        if self.prefilling is not None and self.prefilled:
            self.runner.move_slot(last + 1, last, self.prefilled)
