"""The one generation engine behind chat, infer, compare, eval, serve, webui and bench.

A background worker thread owns the model and runs continuous batching: requests (each with its
own adapter, sampling params and seed) join the running batch as soon as a slot is free, are
prefilled alone, then decoded together one token per step; a finished request frees its slot at
once. Everything (``generate``, ``stream``, ``submit``) goes through that worker, so what the
benchmark measures is what users get.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from loraforge.adapters import AdapterError, read_meta, resolve_adapter
from loraforge.data.tokenize import DEFAULT_SYSTEM, prompt_ids, resolve_template, stop_token_ids
from loraforge.errors import UserError
from loraforge.infer.request import Call, RequestHandle
from loraforge.infer.runner import Runner, read_lora
from loraforge.infer.sampling import GenerationResult, SamplingParams, is_greedy, sample

T = TypeVar("T")

__all__ = ["Engine", "EngineBusy", "GenerationResult", "RequestHandle", "SamplingParams"]


class EngineBusy(UserError):
    """The request queue is full; try again later (the server maps it to HTTP 503)."""


def _auto_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _auto_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype == "int4":  # bf16 activations, 4-bit weights when decoding (see runner.Int4)
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
        self.template = resolve_template(self.tokenizer, template)
        self.system = system
        self.max_batch = max_batch
        self._stop_ids = set(stop_token_ids(self.tokenizer, self.template))
        self._adapters: dict[str, dict] = {}  # name -> LoRA tensors
        self._meta: dict[str, tuple[str, str | None]] = {}  # name -> (template, system)
        self._queue: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
        self._calls: queue.Queue[Call] = queue.Queue()  # work the worker runs for other threads
        self._wake = threading.Event()
        self._active: list[RequestHandle] = []  # row b of the running batch uses KV slot b
        self._closed = False
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
        self.runner = Runner(self.hf_model, self.max_batch, self.dtype, self.device, self.int4)

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
            self._adapters[name] = read_lora(path, self.runner)
            self._meta[name] = (meta.chat_template, meta.system)
            self.runner.set_adapters(self._adapters)

        self.run_on_worker(load)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter; requests still using it end with an AdapterError."""
        if name not in self._adapters:
            raise AdapterError(f"no adapter named '{name}' is loaded")

        def unload() -> None:
            del self._adapters[name]
            del self._meta[name]
            self.runner.set_adapters(self._adapters)

        self.run_on_worker(unload)

    def _adapter(self, adapter: str | None) -> str | None:
        if adapter is None or adapter == self.base_name or adapter == "__base__":
            return None
        if adapter not in self._adapters:
            known = ", ".join([self.base_name, *self._adapters])
            raise AdapterError(f"unknown adapter '{adapter}' (loaded: {known})")
        return adapter

    # ---- prompts ----------------------------------------------------------------------------
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
        handle = RequestHandle(list(prompt_ids), params, self._adapter(adapter), self.tokenizer)
        try:
            self._queue.put(handle, block=block)
        except queue.Full:
            raise EngineBusy("the engine is busy (request queue full); retry later") from None
        self._wake.set()
        return handle

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

    def close(self) -> None:
        """Stop the worker; requests still queued or running end with an error."""
        self._closed = True
        self._wake.set()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
            self._run_calls(closed=True)  # a call queued as the worker stopped
        closed = UserError("the engine was closed")
        for h in self._active:
            h._fail(closed)
        self._active = []
        while True:
            try:
                self._queue.get_nowait()._fail(closed)
            except queue.Empty:
                break

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            self._run_calls()
            try:
                self._admit()
                if self._active:
                    self._step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # noqa: BLE001 - a bug must not hang every waiting client
                for h in self._active:
                    h._fail(e)
                self._active = []
        self._run_calls(closed=True)

    def _run_calls(self, closed: bool = False) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call.run(UserError("the engine was closed") if closed else None)

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            try:
                h = self._queue.get_nowait()
            except queue.Empty:
                return
            if h.cancelled:
                h._finish("cancelled")
                continue
            try:
                self._prefill(h)
            except Exception as e:  # noqa: BLE001 - fail this request only
                h._fail(e)

    def _prefill(self, h: RequestHandle) -> None:
        if h.adapter is not None and h.adapter not in self._adapters:
            raise AdapterError(f"adapter '{h.adapter}' was unloaded")
        h.max_new = min(h.params.max_new_tokens, self.runner.max_len - len(h.prompt))
        if h.max_new <= 0:
            h._finish("length")
            return
        slot = len(self._active)
        self.runner.ensure_capacity(len(h.prompt) + h.max_new)
        ids = torch.tensor([h.prompt], device=self.device)
        lora = self.runner.lora_rows((h.adapter,))
        logits = self.runner.prefill(ids, slot, lora)
        self._active.append(h)
        self._accept([h], logits)

    def _step(self) -> None:
        rows = self._active
        for h in rows:
            if h.adapter is not None and h.adapter not in self._adapters:
                h._fail(AdapterError(f"adapter '{h.adapter}' was unloaded"))
                h.cancelled = True
        toks = torch.tensor([[h.tokens[-1]] for h in rows], device=self.device)
        pos = [len(h.prompt) + len(h.tokens) - 1 for h in rows]
        lora = self.runner.lora_rows(tuple(h.adapter for h in rows))
        logits = self.runner.decode(toks, pos, lora)
        self._accept(rows, logits)

    def _accept(self, rows: list[RequestHandle], logits: torch.Tensor) -> None:
        """Sample one token per row, feed the text trackers, and retire finished rows."""
        greedy = logits.argmax(-1).tolist()
        finished = []
        for b, h in enumerate(rows):
            if h.done():
                finished.append(h)
                continue
            if h.cancelled:
                h._finish("cancelled")
                finished.append(h)
                continue
            p = h.params
            tok = greedy[b] if is_greedy(p) else sample(logits[b], p, h.gen, h.history)
            if h.t_first is None:
                h.t_first = time.perf_counter()
            if tok in self._stop_ids:
                h._finish("stop")
                finished.append(h)
                continue
            h.tokens.append(tok)
            if h.history or p.repetition_penalty != 1.0:
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

    def _retire(self, h: RequestHandle) -> None:
        """Free a row's slot, moving the last row into it so rows stay 0..B-1."""
        i = self._active.index(h)
        last = len(self._active) - 1
        if i != last:
            moved = self._active[last]
            self.runner.move_slot(last, i, len(moved.prompt) + len(moved.tokens))
            self._active[i] = moved
        self._active.pop()
