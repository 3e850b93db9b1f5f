"""Continuous batching, on the engine's worker thread: which requests run, and one step of them.

Requests join the running batch as soon as a slot is free and leave it the moment they finish;
row b of the batch uses KV slot b. A prompt up to PREFILL_CHUNK tokens is prefilled whole as it
joins (exactly as HF attends it); a longer one goes in chunks of PREFILL_CHUNK tokens, one chunk
between two decode steps, so a 4k-token prompt stalls the other streams for one chunk at a time
instead of for its whole prefill (vLLM's and llama.cpp's chunked prefill). While it is being
prefilled it holds the slot after the running rows, and no other request is admitted.

Choices of one prompt (``n`` > 1) prefill it once: when the first has run it, each other one
takes a free slot with a copy of those KV rows and samples its first token from the same logits
(one waiting for a slot keeps that row of logits and copies from the first while it still runs,
else prefills the prompt itself). A request that wants its prompt's logprobs (echo) is
prefilled in chunks of logprobs.PROMPT_LOGPROBS_CHUNK, each chunk's full logits dropped once its
entries are taken.

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
from loraforge.infer.logprobs import PROMPT_LOGPROBS_CHUNK, TokenLogprob, entries, log_softmax
from loraforge.infer.request import RequestHandle
from loraforge.infer.sampling import is_greedy, sample

log = logging.getLogger(__name__)
PREFILL_CHUNK = 512  # tokens of a long prompt run between two decode steps


@dataclass(frozen=True)
class StepEvent:
    """What the worker just did, as step listeners see it (``Engine.add_step_listener``).

    ``kind``: "prefill" (a request joined the batch: its prompt ran and its first token was
    sampled, for its other choices too when they found slots), "fork" (another choice of a
    prompt joined later from a copy of its KV rows), "decode" (one token for every running row)
    or "adapters" (an adapter was loaded or unloaded). ``adapters``: the adapter of each row in
    row order (None: the base model); for "adapters", the names now loaded. ``tokens``:
    completion tokens the step added (a row that sampled a stop token adds none)."""

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
        self.waiting: list[RequestHandle] = []  # other choices of a prompt, waiting for a slot

    def busy(self) -> bool:
        return bool(self.active) or self.prefilling is not None or bool(self.waiting)

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
        for h in self.waiting:
            h._fail(error)
        self.active, self.prefilling, self.waiting = [], None, []

    # ---- joining ------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.prefilling is None and len(self.active) < self.max_batch:
            if self.waiting:
                h = self.waiting.pop(0)
            else:
                try:
                    h = self.requests.get_nowait()
                except queue.Empty:
                    return
            if h.cancelled:
                self._end_unrun(h, "cancelled")
                continue
            try:
                if h.first_logits is not None and self._join_fork(h):
                    continue
                self._start(h)
            except Exception as e:  # noqa: BLE001 - fail this request only
                h._fail(e)

    def _start(self, h: RequestHandle) -> None:
        if h.adapter is not None and h.adapter not in self.adapters():
            raise AdapterError(f"adapter '{h.adapter}' was unloaded")
        h.max_new = min(h.params.max_new_tokens, self.runner.max_len - len(h.prompt))
        if h.max_new <= 0:
            self._end_unrun(h, "length")
            return
        self.runner.ensure_capacity(len(h.prompt) + h.max_new)
        self.prefilling, self.prefilled = h, 0
        if h.params.prompt_logprobs is not None:
            h.prompt_logprobs = [TokenLogprob(h.prompt[0], None)]
        if len(h.prompt) <= self._chunk(h):
            self._prefill_chunk()  # a short prompt joins at once, in one pass

    @staticmethod
    def _chunk(h: RequestHandle) -> int:
        return PREFILL_CHUNK if h.params.prompt_logprobs is None else PROMPT_LOGPROBS_CHUNK

    def _end_unrun(self, h: RequestHandle, reason: str) -> None:
        """End a request whose prompt did not run; its other choices run on their own."""
        self.waiting += h.take_forks()
        h._finish(reason)

    def _prefill_chunk(self) -> None:
        h, start = self.prefilling, self.prefilled
        if h.cancelled or (h.adapter is not None and h.adapter not in self.adapters()):
            self.prefilling = None
            if h.cancelled:
                self._end_unrun(h, "cancelled")
            else:
                h._fail(AdapterError(f"adapter '{h.adapter}' was unloaded"))
            return
        end = min(len(h.prompt), start + self._chunk(h))
        ids = torch.tensor([h.prompt[start:end]], device=self.runner.device)
        # echo: every position's logits (row t scores prompt token start+t+1), else the last's
        every = {"all_logits": True} if h.prompt_logprobs is not None else {}
        try:
            lora = self.runner.lora_rows((h.adapter,))
            logits = self.runner.prefill(ids, len(self.active), lora, start=start, **every)
            if every:
                scored = h.prompt[start + 1 : end + 1]  # the last chunk's last row: completion
                k = h.params.prompt_logprobs
                h.prompt_logprobs += entries(log_softmax(logits[: len(scored)]), scored, k)
                logits = logits[-1:]
        except Exception as e:  # noqa: BLE001 - this request only; its slot is simply reused
            self.prefilling = None
            h._fail(e)
            return
        self.prefilled = end
        if end < len(h.prompt):
            return  # the next chunk after the next decode step
        self.prefilling = None
        self.active.append(h)
        rows = [h, *self._fork(h, logits[0])]
        logits = logits if len(rows) == 1 else logits.repeat(len(rows), 1)  # a row each to mask
        self.record("prefill", (h.adapter,), self._accept(rows, logits))

    # ---- the other choices of a prompt (n > 1) ---------------------------------------------------
    def _fork(self, h: RequestHandle, first: torch.Tensor) -> list[RequestHandle]:
        """The other choices of ``h``'s prompt that take a slot now, from a copy of its KV rows;
        the rest wait with their first token's logits."""
        joined = []
        for f in h.take_forks():
            f.max_new, f.prompt_logprobs = h.max_new, h.prompt_logprobs
            if len(self.active) < self.max_batch:
                self.runner.copy_slot(self.active.index(h), len(self.active), len(h.prompt))
                self.active.append(f)
                joined.append(f)
            else:
                f.first_logits = first.clone()
                self.waiting.append(f)
        return joined

    def _join_fork(self, f: RequestHandle) -> bool:
        """A waiting choice joins from a running sibling's KV rows (False: none runs any more,
        so it prefills the prompt itself). Its first token comes in ``_first_tokens``."""
        sibling = next((a for a in self.active if (a.parent or a) is f.parent), None)
        if sibling is None or (f.adapter is not None and f.adapter not in self.adapters()):
            f.first_logits = None
            return False
        try:
            self.runner.copy_slot(self.active.index(sibling), len(self.active), len(f.prompt))
        except RuntimeError:  # the generic path's cache could not be cut back to the prompt
            f.first_logits = None
            return False
        self.active.append(f)
        return True

    def _first_tokens(self) -> None:
        """Sample the first token of choices that joined from a sibling's KV rows."""
        while fresh := [h for h in self.active if h.first_logits is not None]:
            first = torch.stack([h.first_logits for h in fresh])
            for h in fresh:
                h.first_logits = None
            self.record("fork", tuple(h.adapter for h in fresh), self._accept(fresh, first))

    # ---- one token ----------------------------------------------------------------------------
    def _decode(self) -> None:
        loaded = self.adapters()
        for h in list(self.active):  # unloaded while running: that row ends, the rest go on
            if h.adapter is not None and h.adapter not in loaded:
                h._fail(AdapterError(f"adapter '{h.adapter}' was unloaded while in use"))
                self._retire(h)
        self._first_tokens()
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
        # logprobs from the logits as the model gave them, before any penalty, mask or warp
        want = [b for b, h in enumerate(rows) if h.logprobs is not None]
        lps = dict(zip(want, log_softmax(logits[want]), strict=True)) if want else {}
        finite = torch.isfinite(logits).all(-1).tolist()
        logits = self._constrain(rows, logits)  # after the logprobs and the finiteness check
        greedy = logits.argmax(-1).tolist()
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
            if b in lps:  # before _emit: a streamed delta carries its tokens' logprobs
                h.logprobs += entries(lps[b][None], [tok], h.params.logprobs)
            if tok in self.stop_ids:
                h._finish("stop")
                finished.append(h)
                continue
            h.tokens.append(tok)
            added += 1
            if h.history or h.params.repetition_penalty != 1.0:
                h.history.append(tok)
            if h.matcher is not None:
                h.matcher.accept(tok)
            h._emit(h.tracker.add(tok))
            if h.tracker.stopped or (h.matcher is not None and h.matcher.complete):
                h._finish("stop")  # a stop string, or the grammar admits nothing more
                finished.append(h)
            elif len(h.tokens) >= h.max_new:
                h._finish("length")
                finished.append(h)
        for h in finished:
            self._retire(h)
        return added

    def _constrain(self, rows: list[RequestHandle], logits: torch.Tensor) -> torch.Tensor:
        """The logits with each constrained row's grammar mask applied (a copy: the runner's
        tensor and the logprobs keep the model's own scores); free rows are untouched. The
        row's matcher is made here, on its first token (the spec was compiled at submit)."""
        constrained = [b for b, h in enumerate(rows) if h.params.grammar is not None]
        if not constrained:
            return logits
        from loraforge.infer.constrain import matcher

        logits = logits.clone()
        for b in constrained:
            h = rows[b]
            if h.done() or h.cancelled:
                continue
            try:
                if h.matcher is None:
                    h.matcher = matcher(h.params.grammar, h.tracker.tok, self.stop_ids)
                h.matcher.mask_(logits[b])
            except Exception as e:  # noqa: BLE001 - this row fails (it is done: _accept skips it)
                h._fail(e if isinstance(e, UserError) else RowError(f"grammar failed: {e}"))
        return logits

    @staticmethod
    def _sample(h: RequestHandle, logits: torch.Tensor, greedy: int, finite: bool) -> int:
        if not finite:
            which = f"adapter '{h.adapter}'" if h.adapter else "the base model"
            raise RowError(f"the model's scores became NaN or infinite ({which}); request ended")
        if is_greedy(h.params):
            return greedy
        return sample(logits, h.params, h.gen, h.history, h.tokens)

    def _retire(self, h: RequestHandle) -> None:
        """Free a row's slot, moving the last row into it so rows stay 0..B-1 (and a prompt
        being prefilled into the slot right after them). A choice waiting for a slot whose
        sibling this was takes the slot over instead: it holds their prompt's KV rows."""
        i = self.active.index(h)
        if self._take_over(i, h):
            return
        last = len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self.runner.move_slot(last, i, len(moved.prompt) + len(moved.tokens))
            self.active[i] = moved
        self.active.pop()
        if self.prefilling is not None and self.prefilled:
            self.runner.move_slot(last + 1, last, self.prefilled)

    def _take_over(self, i: int, h: RequestHandle) -> bool:
        group = h.parent or h
        f = next(
            (w for w in self.waiting if w.parent is group and w.first_logits is not None), None
        )
        if f is None:
            return False
        try:  # keep the prompt's positions (the generic path's cache holds h's tokens too)
            self.runner.copy_slot(i, i, len(f.prompt))
        except RuntimeError:
            return False
        self.waiting.remove(f)
        self.active[i] = f  # its first token: _first_tokens, before the next decode step
        return True
