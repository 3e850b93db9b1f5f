"""One submitted generation request (the caller's handle, filled in by the engine's worker), and a
function call the worker runs for another thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

from loraforge.infer.sampling import GenerationResult, SamplingParams, TextTracker, make_generator

_DONE = object()


class RequestHandle:
    """One submitted request: iterate for text deltas, ``result()`` for the whole result."""

    def __init__(self, prompt: list[int], params: SamplingParams, adapter: str | None, tok):
        self.prompt = prompt
        self.params = params
        self.adapter = adapter
        self.tracker = TextTracker(tok, params.stop)
        self.gen = make_generator(params)
        self.history = list(prompt) if params.repetition_penalty != 1.0 else []
        self.tokens: list[int] = []
        self.max_new = params.max_new_tokens
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None  # when the first token was sampled (for TTFT / bench)
        self.t_done: float | None = None
        self._deltas: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the result so far has reason "cancelled"."""
        self.cancelled = True

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._deltas.get()
            if item is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    # worker side
    def _emit(self, delta: str) -> None:
        if delta:
            self._deltas.put(delta)

    def _finish(self, reason: str) -> None:
        self.t_done = time.perf_counter()
        self._emit(self.tracker.finish())
        self._result = GenerationResult(
            text=self.tracker.text,
            token_ids=list(self.tokens),
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.tokens),
        )
        self._done.set()
        self._deltas.put(_DONE)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._deltas.put(_DONE)


class Call:
    """A function the worker runs for another thread; ``wait`` returns its result or raises."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None

    def run(self, refuse: BaseException | None = None) -> None:
        try:
            if refuse is not None:
                raise refuse
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
        self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result
