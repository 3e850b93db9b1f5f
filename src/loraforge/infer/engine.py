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
from collections.abc import Iterator
from pathlib import Path

import torch

from loraforge.adapters import AdapterError, read_meta, same_base
from loraforge.data.tokenize import DEFAULT_SYSTEM, prompt_ids, resolve_template, stop_token_ids
from loraforge.errors import UserError
from loraforge.infer.runner import Runner, read_lora
from loraforge.infer.sampling import (
    GenerationResult,
    SamplingParams,
    TextTracker,
    is_greedy,
    make_generator,
    sample,
)

__all__ = ["Engine", "EngineBusy", "GenerationResult", "RequestHandle", "SamplingParams"]

_DONE = object()


class EngineBusy(UserError):
    """The request queue is full; try again later (the server maps it to HTTP 503)."""


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


def _auto_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _auto_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype:
        try:
            return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
                dtype, getattr(torch, dtype)
            )
        except AttributeError:
            raise UserError(f"--dtype: unknown dtype '{dtype}' (float32, bfloat16)") from None
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
        from loraforge.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

        if model is None and adapters:  # the base the first adapter was trained on
            model = read_meta(next(iter(adapters.values()))).base_model
        self.model_spec = str(model or DEFAULT_MODEL)
        path = resolve_model(self.model_spec)
        self.base_name = self.model_spec if not Path(self.model_spec).exists() else path.name
        self.device = _auto_device(device)
        self.dtype = _auto_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(path)
        self.template = resolve_template(self.tokenizer, template)
        self.system = system
        self.hf_model = load_model(
            path, dtype=str(self.dtype).split(".")[-1], device=str(self.device)
        )
        self.runner = Runner(self.hf_model, max_batch, self.dtype, self.device)
        self.max_batch = max_batch
        self._stop_ids = set(stop_token_ids(self.tokenizer, self.template))
        self._adapters: dict[str, dict] = {}  # name -> LoRA tensors
        self._meta: dict[str, tuple[str, str | None]] = {}  # name -> (template, system)
        self._lock = threading.Lock()  # guards the runner between the worker and adapter changes
        self._queue: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
        self._active: list[RequestHandle] = []  # row b of the running batch uses KV slot b
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
        self._worker.start()
        for name, adapter_dir in (adapters or {}).items():
            self.load_adapter(name, adapter_dir)

    @classmethod
    def from_adapter(
        cls, adapter_dir: str, model: str | None = None, name: str | None = None, **kw
    ) -> Engine:
        """An engine on the adapter's base model, with the adapter loaded (as ``name``)."""
        meta = read_meta(adapter_dir)
        if model is not None and not same_base(model, meta.base_model):
            raise AdapterError(
                f"{adapter_dir} was trained on '{meta.base_model}', not on '{model}'"
            )
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
        meta = read_meta(path)
        if not same_base(meta.base_model, self.model_spec):
            raise AdapterError(
                f"{path} was trained on '{meta.base_model}', "
                f"but this engine runs '{self.model_spec}'"
            )
        lora = read_lora(path, self.runner)
        with self._lock:
            self._adapters[name] = lora
            self._meta[name] = (meta.chat_template, meta.system)
            self.runner.set_adapters(self._adapters)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter; requests still using it end with an AdapterError."""
        if name not in self._adapters:
            raise AdapterError(f"no adapter named '{name}' is loaded")
        with self._lock:
            del self._adapters[name]
            del self._meta[name]
            self.runner.set_adapters(self._adapters)

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
        self._worker.join(timeout=30)
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
            try:
                self._admit()
                if self._active:
                    with self._lock:
                        self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not hang every waiting client
                for h in self._active:
                    h._fail(e)
                self._active = []

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            try:
                wait = not self._active
                h = self._queue.get(block=wait, timeout=0.05 if wait else None)
            except queue.Empty:
                return
            if h.cancelled:
                h._finish("cancelled")
                continue
            with self._lock:
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
