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
    """One submitted request: iterate for text deltas, ``result()`` for the whole result.

    Requests given one output queue ``out`` (the choices of a streamed request) are iterated
    together with ``merged`` and told apart by ``index``. Choices of one prompt (OpenAI's ``n``,
    ``Engine.submit_n``): the first carries the others in ``forks`` until its prompt has run,
    then each continues from a copy of its KV rows (the prompt is prefilled once)."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapter: str | None,
        tok,
        *,
        out: queue.Queue | None = None,
        index: int = 0,
    ):
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
        self.index = index
        self.shared = out is not None  # the queue is a group's: ``merged`` reads it, not iter()
        self._out: queue.Queue = queue.Queue() if out is None else out
        # logprobs.TokenLogprob per completion token / prompt token, when params ask for them
        self.logprobs: list | None = None if params.logprobs is None else []
        self.prompt_logprobs: list | None = None
        self.forks: list[RequestHandle] = []  # the other choices of this prompt, until it ran
        self.parent: RequestHandle | None = None  # a fork: the choice whose prompt KV it copies
        self.first_logits = None  # a fork waiting for a slot: the logits of its first token
        self.matcher = None  # constrain.Matcher of params.grammar, made by the scheduler
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the result so far has reason "cancelled"."""
        self.cancelled = True

    def __iter__(self) -> Iterator[str]:
        if self.shared:
            raise TypeError("this request shares its output queue: iterate merged(handles)")
        while True:
            _, item, _ = self._out.get()
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
        if delta:  # with the logprob entries it covers: ``merged`` hands them out with it
            self._out.put((self, delta, self._scored()))

    def _scored(self) -> int:
        return 0 if self.logprobs is None else len(self.logprobs)

    def take_forks(self) -> list[RequestHandle]:
        forks, self.forks = self.forks, []
        return forks

    def _finish(self, reason: str) -> None:
        self.t_done = time.perf_counter()
        self._emit(self.tracker.finish())
        self._result = GenerationResult(
            text=self.tracker.text,
            token_ids=list(self.tokens),
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.tokens),
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=self.prompt_logprobs,
        )
        self._done.set()
        self._out.put((self, _DONE, self._scored()))

    def _fail(self, error: BaseException) -> None:
        for fork in self.take_forks():  # its prompt never ran: the same request, the same error
            fork._fail(error)
        self._error = error
        self._done.set()
        self._out.put((self, _DONE, self._scored()))


def merged(handles: list[RequestHandle]) -> Iterator[tuple[RequestHandle, str, list | None, bool]]:
    """(handle, text delta, its new logprob entries or None, finished) as the worker produces
    them, over ``handles`` that share one output queue; ends when all have finished. A finished
    handle's ``result()`` is ready (and raises its error)."""
    out = handles[0]._out
    sent = dict.fromkeys(handles, 0)
    left = len(handles)
    while left:
        h, item, n = out.get()
        new = None
        if h.logprobs is not None:
            new, sent[h] = h.logprobs[sent[h] : n], n
        if item is _DONE:
            left -= 1
            yield h, "", new, True
        else:
            yield h, item, new, False


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
