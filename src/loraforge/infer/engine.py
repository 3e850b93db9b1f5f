"""The one generation engine behind chat, infer, compare, eval, serve, webui and bench.

A background worker thread owns the model and runs continuous batching (infer/scheduler.py):
requests (each with its own adapter, sampling params and seed) join the running batch as soon
as a slot is free, are prefilled alone, then decoded together one token per step; a finished
request frees its slot at once. Everything (``generate``, ``stream``, ``submit``) goes through
that worker, so what the benchmark measures is what users get. This file is the engine's public
side: loading, adapters, prompts, submitting, listening, closing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from loraforge.adapters import AdapterError, read_meta, resolve_adapter
from loraforge.data.tokenize import DEFAULT_SYSTEM, prompt_ids, stop_token_ids, template_text
from loraforge.errors import UserError
from loraforge.infer.generic import pick_runner
from loraforge.infer.request import Call, RequestHandle
from loraforge.infer.sampling import GenerationResult, SamplingParams, choice_params
from loraforge.infer.scheduler import EngineStats, Scheduler, StepEvent

T = TypeVar("T")

__all__ = [
    "Engine",
    "EngineBusy",
    "EngineStats",
    "GenerationResult",
    "RequestHandle",
    "SamplingParams",
    "StepEvent",
]
log = logging.getLogger(__name__)


class EngineBusy(UserError):
    """The request queue is full; try again later (the server maps it to HTTP 503)."""


def _auto_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _auto_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype == "int4":  # bf16 activations, 4-bit weights when decoding (see cpu/int4.py)
        return torch.bfloat16
    if dtype:
        try:
            return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
                dtype, getattr(torch, dtype)
            )
        except AttributeError:
            raise UserError(f"--dtype: unknown dtype '{dtype}' (float32, bfloat16, int4)") from None
    # bf16 halves the bytes per token; every CPU torch supports it, and modern ones accelerate it
    return torch.bfloat16


class Engine:
    def __init__(
        self,
        model: str | None = None,
        adapters: dict[str, str] | None = None,
        *,
        dtype: str | None = None,
        device: str | None = None,
        template: str | None = None,
        system: str | None = DEFAULT_SYSTEM,
        max_batch: int = 8,
        max_queue: int = 256,
    ):
        from loraforge.models import DEFAULT_MODEL, load_tokenizer, resolve_model

        if model is None and adapters:  # the base the first adapter was trained on
            model = read_meta(next(iter(adapters.values()))).base_model
        self.model_spec = str(model or DEFAULT_MODEL)
        path = resolve_model(self.model_spec)
        self.base_name = self.model_spec if not Path(self.model_spec).exists() else path.name
        self.device = _auto_device(device)
        self.dtype = _auto_dtype(dtype, self.device)
        self.int4 = dtype == "int4"
        self.tokenizer = load_tokenizer(path)
        self.template = template_text(self.tokenizer, template)
        self.system = system
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._stop_ids = set(stop_token_ids(self.tokenizer, self.template))
        self._adapters: dict[str, dict] = {}  # name -> LoRA tensors
        self._meta: dict[str, tuple[str, str | None]] = {}  # name -> (template, system)
        self._queue: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
        self._calls: queue.Queue[Call] = queue.Queue()  # work the worker runs for other threads
        self._wake = threading.Event()
        self._sched: Scheduler | None = None  # the running batch; made with the runner
        self._closed = False
        self.stats = EngineStats()
        self._listeners: tuple[Callable[[StepEvent], object], ...] = ()
        self._listeners_lock = threading.Lock()
        self._worker = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self._worker.start()
        # All torch work happens on the worker thread, loading included. libgomp keeps a thread
        # team per thread that ever ran a parallel op, and once more threads are managed than
        # there are cores it stops spinning and puts workers to sleep between ops: a second
        # team (say the caller's, from loading the model) halved decode speed here (43 -> 23
        # tokens/s on 2 cores).
        try:
            self.run_on_worker(lambda: self._build(path))
        except BaseException:
            self.close()
            raise
        for name, adapter_dir in (adapters or {}).items():
            self.load_adapter(name, adapter_dir)

    def _build(self, path) -> None:
        from loraforge.models import load_model

        dtype = str(self.dtype).split(".")[-1]
        self.hf_model = load_model(path, dtype=dtype, device=str(self.device))
        # the fast runner where it computes this family, else transformers' forward (generic.py)
        self.runner = pick_runner(self.hf_model, self.max_batch, self.dtype, self.device, self.int4)
        self._sched = Scheduler(
            self.runner,
            self._queue,
            self.max_batch,
            self._stop_ids,
            lambda: self._adapters,
            self._record,
        )

    def run_on_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine's thread, between decode steps, and return its result.

        For torch work next to the engine (a reference model in the benchmark, adapter loads):
        on the caller's thread it would start a second OpenMP team and slow the engine down."""
        if threading.current_thread() is self._worker:
            return fn()
        if self._closed:
            raise UserError("the engine is closed")
        call = Call(fn)
        self._calls.put(call)
        self._wake.set()
        return call.wait()

    @classmethod
    def from_adapter(
        cls, adapter_dir: str, model: str | None = None, name: str | None = None, **kw
    ) -> Engine:
        """An engine on the adapter's base model, with the adapter loaded (as ``name``)."""
        meta = resolve_adapter(adapter_dir, model)
        kw.setdefault("template", meta.chat_template)
        kw.setdefault("system", meta.system)
        engine = cls(model or meta.base_model, **kw)
        engine.load_adapter(name or Path(adapter_dir).resolve().name, adapter_dir)
        return engine

    # ---- adapters ---------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path: str) -> None:
        """Load a loraforge adapter dir under ``name`` (replacing one of that name)."""
        if name == self.base_name:
            raise AdapterError(f"adapter name '{name}' is the base model's name; pick another")
        meta = resolve_adapter(path, self.model_spec)

        def load() -> None:
            # read and check it, then build the new bank, and only then make it known: a bad
            # adapter leaves the engine exactly as it was (no name registered, old bank in use)
            adapters = {**self._adapters, name: self.runner.read_adapter(path)}
            self.runner.set_adapters(adapters)
            self._adapters = adapters
            self._meta[name] = (meta.chat_template, meta.system)
            self._record("adapters", tuple(self._adapters))

        self.run_on_worker(load)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter; requests still using it end with an AdapterError."""
        if name not in self._adapters:
            raise AdapterError(f"no adapter named '{name}' is loaded")

        def unload() -> None:
            if name not in self._adapters:  # two unloads raced: the first one won
                raise AdapterError(f"no adapter named '{name}' is loaded")
            adapters = {k: v for k, v in self._adapters.items() if k != name}
            self.runner.set_adapters(adapters)
            self._adapters = adapters  # rows still on it end alone at the next step
            self._meta.pop(name, None)
            self._record("adapters", tuple(self._adapters))

        self.run_on_worker(unload)

    def _adapter(self, adapter: str | None) -> str | None:
        if adapter is None or adapter == self.base_name or adapter == "__base__":
            return None
        if adapter not in self._adapters:
            known = ", ".join([self.base_name, *self._adapters])
            raise AdapterError(f"unknown adapter '{adapter}' (loaded: {known})")
        return adapter

    # ---- prompts ----------------------------------------------------------------------------
    def prompt_template(self, adapter: str | None = None) -> str:
        """The chat template prompts for ``adapter`` render with (its family's tool format)."""
        name = self._adapter(adapter)
        return self._meta[name][0] if name else self.template

    def encode(self, messages: list[dict], adapter: str | None = None, tools=None) -> list[int]:
        """Prompt ids rendered with the template/system recorded for ``adapter``."""
        name = self._adapter(adapter)
        template, system = self._meta[name] if name else (self.template, self.system)
        return prompt_ids(self.tokenizer, messages, template=template, system=system, tools=tools)

    def _ids(self, prompt, adapter: str | None) -> list[int]:
        if prompt and isinstance(prompt[0], dict):
            return self.encode(prompt, adapter)
        return [int(t) for t in prompt]

    # ---- generation -------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        *,
        block: bool = False,
    ) -> RequestHandle:
        """Queue a request for the worker; raises EngineBusy when the queue is full."""
        return self.submit_n(prompt_ids, params, adapter, 1, block=block)[0]

    def submit_n(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        n: int = 1,
        *,
        block: bool = False,
        out: queue.Queue | None = None,
        index: int = 0,
    ) -> list[RequestHandle]:
        """``n`` completions of one prompt (OpenAI's ``n``), the prompt prefilled once; with a
        seed, choice i samples with seed + i. Given a queue ``out``, they put their deltas there
        (several requests may share one; iterate ``request.merged(handles)``), numbered from
        ``index``; else each has its own (iterate each). One place in the request queue:
        EngineBusy when it is full."""
        if self._closed:
            raise UserError("the engine is closed")
        params = params or SamplingParams()
        if not prompt_ids:
            raise UserError("empty prompt")
        if len(prompt_ids) >= self.runner.max_len:
            raise UserError(
                f"prompt of {len(prompt_ids)} tokens exceeds the model's context "
                f"({self.runner.max_len} tokens)"
            )
        name, ids = self._adapter(adapter), list(prompt_ids)
        if params.grammar is not None:  # compiled here (cached), not on the worker: a bad
            from loraforge.infer.constrain import check  # schema fails this call alone

            check(params.grammar, self.tokenizer)
        handles = [
            RequestHandle(
                ids, choice_params(params, i), name, self.tokenizer, out=out, index=index + i
            )
            for i in range(n)
        ]
        handles[0].forks = handles[1:]
        for fork in handles[1:]:
            fork.parent = handles[0]
        try:
            self._queue.put(handles[0], block=block)
        except queue.Full:
            raise EngineBusy("the engine is busy (request queue full); retry later") from None
        self._wake.set()
        return handles

    def generate(
        self,
        prompts,
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: list[str | None] | str | None = None,
    ) -> list[GenerationResult]:
        """Generate for all prompts together, each with its own adapter and params."""
        n = len(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * n
        alist = adapters if isinstance(adapters, list) else [adapters] * n
        if len(plist) != n or len(alist) != n:
            raise ValueError("params/adapters lists must have one entry per prompt")
        handles = [
            self.submit(self._ids(p, a), sp, a, block=True)
            for p, sp, a in zip(prompts, plist, alist, strict=True)
        ]
        return [h.result() for h in handles]

    def stream(
        self, messages_or_ids, params: SamplingParams | None = None, adapter: str | None = None
    ) -> Iterator[str]:
        """Text deltas as tokens are produced; closing the iterator cancels the request.

        The request is submitted at once, so a bad adapter or prompt raises here, not later."""
        handle = self.submit(self._ids(messages_or_ids, adapter), params, adapter, block=True)
        return self._deltas(handle)

    @staticmethod
    def _deltas(handle: RequestHandle) -> Iterator[str]:
        try:
            yield from handle
        finally:
            handle.cancel()

    def alive(self) -> bool:
        """Whether the worker thread still runs (the server's /health asks)."""
        return not self._closed and self._worker.is_alive()

    def close(self) -> None:
        """Stop the worker; requests still queued or running end with an error."""
        self._closed = True
        self._wake.set()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
            self._run_calls(closed=True)  # a call queued as the worker stopped
        closed = UserError("the engine was closed")
        if self._sched is not None:
            self._sched.fail_all(closed)
        while True:
            try:
                self._queue.get_nowait()._fail(closed)
            except queue.Empty:
                break

    # ---- stats -------------------------------------------------------------------------------
    def add_step_listener(self, fn: Callable[[StepEvent], object]) -> Callable[[], None]:
        """Call ``fn(event)`` after every prefill, decode step and adapter change (see
        StepEvent); returns a function that removes the listener.

        ``fn`` runs on the worker thread between steps, so the time it takes delays every
        running request; an exception in it is logged and ignored. Without listeners a step
        costs only the few integer additions of ``stats``. A step's event comes just after its
        results are handed out: ``run_on_worker(lambda: None)`` waits for the step in flight."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, fn)

        def remove() -> None:
            with self._listeners_lock:
                self._listeners = tuple(f for f in self._listeners if f is not fn)

        return remove

    def _record(self, kind: str, adapters: tuple, tokens: int = 0) -> None:
        s = self.stats
        if kind == "decode":
            s.steps += 1
            s.rows += len(adapters)
            s.max_rows = max(s.max_rows, len(adapters))
        elif kind == "prefill":
            s.prefills += 1
        s.tokens += tokens
        for fn in self._listeners:
            try:
                fn(StepEvent(kind, adapters, tokens))
            except Exception:  # noqa: BLE001 - an observer must not fail the requests
                log.exception("engine step listener %r failed", fn)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            self._run_calls()
            try:
                if self._sched is not None and (self._sched.busy() or not self._queue.empty()):
                    self._sched.step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # noqa: BLE001 - a bug must not hang every waiting client
                log.exception("engine step failed")
                self._sched.fail_all(e)
        self._run_calls(closed=True)

    def _run_calls(self, closed: bool = False) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call.run(UserError("the engine was closed") if closed else None)


# ---- opening an engine the way the CLI verbs do -----------------------------------------------

ADAPTER_NAME = "tuned"  # the name chat, infer, eval and distill load their --adapter as


def open_engine(
    model: str | None = None, adapter: str | None = None, dtype: str | None = None
) -> tuple[Engine, str | None]:
    """(engine, adapter name or None): the adapter's recorded base/template/system when given."""
    if not adapter:
        return Engine(model, dtype=dtype), None
    engine = Engine.from_adapter(adapter, model=model, name=ADAPTER_NAME, dtype=dtype)
    return engine, ADAPTER_NAME
