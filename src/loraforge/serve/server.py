"""What every endpoint of the API server shares: the engine, the adapter registry, the limits,
and the steps of answering a request (pick the adapter, check the token budget, build the
sampling params, submit, wait or stream). ``routes.py`` composes these; ``app.py`` wires them.

The event loop never blocks on the engine: waiting for a result or the next streamed delta runs
on a private thread pool (the default executor has only cpu+4 threads, which would cap the
number of requests in flight, and so the batch, at 6 on this machine). The pool is as large as
the engine can hold requests (queue + batch), so a full queue answers 503 instead of stalling.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request
from fastapi.responses import StreamingResponse

from loraforge.serve.registry import AdapterRegistry
from loraforge.serve.schemas import APIError, error_body

DEFAULT_MAX_TOKENS = 512  # when a request gives none: a looping model must not run for minutes
_END = object()


def context_length(engine) -> int:
    """The engine's context window (its KV cache length), else the model config's, else 2048."""
    for get in (
        lambda: engine.runner.max_len,
        lambda: engine.hf_model.config.max_position_embeddings,
    ):
        try:
            n = int(get())
            if n > 0:
                return n
        except (AttributeError, TypeError, ValueError):
            pass
    n = getattr(engine.tokenizer, "model_max_length", 0) or 0
    return n if 0 < n < 1_000_000 else 2048


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(r, n: int = 1) -> dict:
    """Token counts of a result, or of a list of choices, ``n`` per prompt in prompt order: each
    prompt counts once, as its prefill ran once (OpenAI counts it once too)."""
    rs = r if isinstance(r, list) else [r]
    prompt = sum(x.prompt_tokens for x in rs[::n])
    completion = sum(x.completion_tokens for x in rs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chunks(handles: list):
    """(handle, text or delta dict, new logprob entries or None, finished) over the choices of
    a stream: request handles sharing an output queue interleave as the engine produces them;
    wrappers (serve/tool_calls.py) give their items one choice after the other."""
    from loraforge.infer.request import RequestHandle, merged

    if all(isinstance(h, RequestHandle) for h in handles):
        yield from merged(handles)
        return
    for h in handles:
        for item in h:
            yield h, item, None, False
        yield h, "", None, True


class Server:
    """The state behind the endpoints; ``engine`` follows loraforge.infer.engine.Engine."""

    def __init__(
        self,
        engine,
        *,
        adapter_root: str | Path | None = None,
        default_model: str | None = None,
        max_tokens_limit: int = 4096,
        max_context: int | None = None,
    ):
        self.engine = engine
        self.base = engine.base_name
        self.default_model = default_model
        self.max_tokens_limit = max_tokens_limit
        self.ctx = max_context or context_length(engine)
        self.registry = AdapterRegistry(engine, adapter_root)
        in_flight = getattr(engine, "max_queue", 256) + getattr(engine, "max_batch", 8)
        self.pool = ThreadPoolExecutor(max_workers=in_flight + 8, thread_name_prefix="lf-wait")
        self.started = int(time.time())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def pick(self, name: str | None) -> tuple[str, str | None]:
        """(the model name to answer with, the adapter to use: None = base), or a 404."""
        name = name or self.default_model or self.base
        if name == self.base:
            return name, None
        if name in self.registry.names():
            return name, name
        raise APIError(
            404,
            f"The model '{name}' does not exist; GET /v1/models lists the ones served",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )

    def budget(self, n_prompt: int, requested: int | None) -> int:
        """The completion's token limit: what was asked, within the server's cap and the room
        the context leaves after the prompt; OpenAI's context_length_exceeded otherwise."""
        if requested is not None and requested > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens is {requested}, above this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
                code="max_tokens_over_limit",
            )
        room = self.ctx - n_prompt
        if room <= 0 or (requested is not None and requested > room):
            msg = f"This model's maximum context length is {self.ctx} tokens. However, "
            if requested is None or room <= 0:
                msg += f"the prompt alone has {n_prompt} tokens."
            else:
                msg += (
                    f"you requested {n_prompt + requested} tokens ({n_prompt} in the prompt, "
                    f"{requested} in the completion). Lower max_tokens or shorten the prompt."
                )
            raise APIError(400, msg, param="messages", code="context_length_exceeded")
        # Bug fix: a request without max_tokens got DEFAULT_MAX_TOKENS even above the server's
        # --max-tokens cap; the cap bounds every completion.
        if requested is not None:
            return requested
        return min(DEFAULT_MAX_TOKENS, self.max_tokens_limit, room)

    def params(self, req, max_new: int):
        """SamplingParams through the one SamplingOptions check the CLI flags also pass."""
        from pydantic import ValidationError

        from loraforge.infer.sampling import SamplingOptions

        kw = {"max_new_tokens": max_new}
        fields = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "min_p")
        for field in (*fields, "presence_penalty", "frequency_penalty"):
            if getattr(req, field, None) is not None:
                kw[field] = getattr(req, field)
        try:  # the request schema checks the ranges, but lets through e.g. an infinite penalty
            options = SamplingOptions(**kw)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "request"
            raise APIError(
                400, f"{field}: {err['msg']}", param=field, code="invalid_value"
            ) from None
        return options.to_params(
            stop=list(getattr(req, "stop", None) or []), logit_bias=self.logit_bias(req)
        )

    def logit_bias(self, req) -> dict[int, float]:
        """``logit_bias`` with int keys; an id outside the vocabulary is a 400 (as vLLM)."""
        bias = {int(k): float(v) for k, v in (getattr(req, "logit_bias", None) or {}).items()}
        vocab = len(self.engine.tokenizer)
        bad = [k for k in bias if k >= vocab]
        if bad:
            raise APIError(
                400,
                f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                param="logit_bias",
                code="invalid_value",
            )
        return bias

    def response_grammar(self, req):
        """The GrammarSpec of ``response_format``, compiled now (cached; the first compile
        builds the tokenizer's table, seconds: run it off the event loop), or None."""
        from loraforge.infer.constrain import GrammarError, check

        fmt = getattr(req, "response_format", None)
        spec = fmt.grammar() if fmt is not None else None
        if spec is None:
            return None
        try:
            check(spec, self.engine.tokenizer)
        except GrammarError as e:
            param = "response_format.json_schema.schema"
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_schema") from None
        return spec

    async def encode_chat(
        self, messages: list[dict], adapter: str | None, tools: list[dict] | None = None
    ) -> list[int]:
        import functools

        from loraforge.adapters import AdapterError
        from loraforge.errors import UserError

        msgs = [
            {**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages
        ]
        kw = {"tools": tools} if tools else {}  # the tool list, rendered as the family does
        try:
            return await self.run_blocking(
                functools.partial(self.engine.encode, msgs, adapter, **kw)
            )
        except UserError as e:  # e.g. a template that refuses this sequence of roles
            if isinstance(e, AdapterError):  # bug fix: unloaded since pick(), was a 400; 404 now
                self.pick(adapter)
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None

    async def completion_prompts(self, prompts: list) -> list[list[int]]:
        """Each prompt's token ids: strings tokenized (no template), token-id prompts checked
        against the vocabulary (a 400 naming the prompt and the position)."""
        tok = self.engine.tokenizer
        vocab = len(tok)
        for i, p in enumerate(prompts):
            if isinstance(p, list):
                bad = next((j for j, t in enumerate(p) if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"prompt[{i}][{bad}]: token id {p[bad]} is not in the vocabulary "
                        f"(0..{vocab - 1})",
                        param="prompt",
                        code="invalid_token_id",
                    )

        def encode() -> list[list[int]]:
            return [list(p) if isinstance(p, list) else tok(p)["input_ids"] for p in prompts]

        return await self.run_blocking(encode)

    def submit(self, ids: list[int], sp, adapter: str | None):
        return self.submit_n(ids, sp, adapter)[0]

    def submit_n(self, ids: list[int], sp, adapter: str | None, n: int = 1, **kw) -> list:
        """``n`` choices of one prompt (``Engine.submit_n``: ``out``, ``index``), or a 503/404."""
        from loraforge.adapters import AdapterError
        from loraforge.infer.engine import EngineBusy

        try:
            if n == 1 and kw.get("out") is None:  # one plain request: the engine's first door
                return [self.engine.submit(ids, sp, adapter)]
            return self.engine.submit_n(ids, sp, adapter, n, **kw)
        except AdapterError:  # unloaded between the name check and now
            self.pick(adapter)
            raise
        except EngineBusy:
            raise APIError(
                503,
                "The server is overloaded: too many queued requests; retry later",
                type="server_error",
                code="overloaded",
            ) from None

    async def wait(self, handle, request: Request):
        """The handle's result; if the client goes away first, cancel the generation."""
        return (await self.wait_all([handle], request))[0]

    async def wait_all(self, handles: list, request: Request) -> list:
        """Every handle's result, in order; if the client goes away or one fails, the rest are
        cancelled."""

        def results() -> list:
            try:
                return [h.result() for h in handles]
            except BaseException:
                for h in handles:
                    h.cancel()
                raise

        fut = asyncio.ensure_future(self.run_blocking(results))
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.5)
            if done:
                return fut.result()
            if await request.is_disconnected():
                for h in handles:
                    h.cancel()
                raise APIError(499, "client closed the request")

    def stream(
        self, handles, head: dict, piece, include_usage: bool, n: int = 1
    ) -> StreamingResponse:
        """SSE: one chunk per delta, a last one per choice with its finish_reason, optional
        usage, [DONE]. ``handles``: one handle (or a wrapper with its ``__iter__``, ``result``
        and ``cancel``), or a list of choices, ``n`` per prompt (see ``_chunks``), whose chunks
        interleave, each with its index. ``piece(text, finish, role=False, index=0,
        logprobs=None)`` is one choice of a chunk (None: nothing to send); ``logprobs``: the
        logprobs.TokenLogprob entries of the tokens behind the text."""
        handles = handles if isinstance(handles, list) else [handles]
        state = {"finished": False}
        server = self

        async def events():
            it = _chunks(handles)
            indexes = {id(h): getattr(h, "index", i) for i, h in enumerate(handles)}
            for h in handles:
                first = piece("", None, role=True, index=indexes[id(h)])
                if first is not None:
                    yield sse({**head, "choices": [first]})
            results = []
            try:
                while (item := await server.run_blocking(next, it, _END)) is not _END:
                    h, delta, lps, done = item
                    index = indexes[id(h)]
                    if done:  # its result is ready (or raises its error)
                        r = h.result()
                        results.append((index, r))
                        yield sse({**head, "choices": [piece("", r.finish_reason, index=index,
                                                              logprobs=lps)]})  # fmt: skip
                    elif delta:
                        chunk = piece(delta, None, index=index, logprobs=lps)
                        yield sse({**head, "choices": [chunk]})
                state["finished"] = True
                if include_usage:
                    ordered = [r for _, r in sorted(results, key=lambda x: x[0])]
                    yield sse({**head, "choices": [], "usage": usage(ordered, n)})
            except Exception as e:  # the status line is sent already: report in-band
                yield sse(error_body(f"generation failed: {e}", type="server_error"))
            yield "data: [DONE]\n\n"

        class _Stream(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    if not state["finished"]:  # the client went away: stop generating for it
                        for h in handles:
                            h.cancel()

        return _Stream(events(), media_type="text/event-stream")
