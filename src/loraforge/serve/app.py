"""`loraforge serve`: an OpenAI-compatible HTTP API over one Engine, many adapters on one base.

Every generation goes through ``Engine.submit``, which batches concurrent requests (whatever
adapter each uses) into one decode loop, so switching adapters never reloads anything. The
request's ``model`` picks the adapter; the base model's name means none.

The event loop never blocks on the engine: waiting for a result or the next streamed delta runs
on a private thread pool (the default executor has only cpu+4 threads, which would cap the
number of requests in flight, and so the batch, at 6 on this machine).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.serve.registry import AdapterRegistry
from loraforge.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    SimpleChatRequest,
    UnloadAdapterRequest,
    error_body,
)

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


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if err.get("type") == "missing" and not loc:
        return "request body is missing", None
    if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
        return "request body must be a JSON object", None
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _RequireKey:
    """``Authorization: Bearer KEY`` on every path but /health. A plain ASGI middleware: the
    ``@app.middleware("http")`` kind hides client disconnects from the endpoints."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                body = error_body(
                    "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                )
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(
    engine,
    *,
    api_key: str | None = None,
    adapter_root: str | Path | None = None,
    default_model: str | None = None,
    max_tokens_limit: int = 4096,
    max_context: int | None = None,
) -> FastAPI:
    """The FastAPI app. ``engine`` follows loraforge.infer.engine.Engine; the caller closes it."""
    from loraforge import __version__
    from loraforge.adapters import AdapterError
    from loraforge.errors import UserError
    from loraforge.infer.engine import EngineBusy, SamplingParams

    ctx = max_context or context_length(engine)
    registry = AdapterRegistry(engine, adapter_root)
    pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="loraforge-wait")
    started = int(time.time())
    base = engine.base_name

    @asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="loraforge", version=__version__, lifespan=lifespan)

    # ---- errors: always OpenAI's format, never a bare 422/500 page ----
    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(UserError)
    async def _user_error(_req, exc: UserError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req, exc: Exception):
        msg = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(msg, type="server_error"), status_code=500)

    if api_key:
        app.add_middleware(_RequireKey, key=api_key)

    # ---- helpers ----
    def pick(name: str | None) -> tuple[str, str | None]:
        """(the model name to answer with, the adapter to use: None = base), or a 404."""
        name = name or default_model or base
        if name == base:
            return name, None
        if name in registry.names():
            return name, name
        raise APIError(
            404,
            f"The model '{name}' does not exist; GET /v1/models lists the ones served",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )

    def budget(n_prompt: int, requested: int | None) -> int:
        if requested is not None and requested > max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens is {requested}, above this server's limit of {max_tokens_limit}",
                param="max_tokens",
            )
        room = ctx - n_prompt
        if room <= 0 or (requested is not None and requested > room):
            msg = f"This model's maximum context length is {ctx} tokens. However, "
            if requested is None or room <= 0:
                msg += f"the prompt alone has {n_prompt} tokens."
            else:
                msg += (
                    f"you requested {n_prompt + requested} tokens ({n_prompt} in the prompt, "
                    f"{requested} in the completion). Lower max_tokens or shorten the prompt."
                )
            raise APIError(400, msg, param="messages", code="context_length_exceeded")
        return requested if requested is not None else min(DEFAULT_MAX_TOKENS, room)

    def params(req, max_new: int) -> SamplingParams:
        kw = {"max_new_tokens": max_new, "stop": list(getattr(req, "stop", None) or [])}
        for field in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            if getattr(req, field, None) is not None:
                kw[field] = getattr(req, field)
        return SamplingParams(**kw)

    async def run_blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def encode_chat(messages: list[dict], adapter: str | None) -> list[int]:
        msgs = [
            {**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages
        ]
        try:
            return await run_blocking(engine.encode, msgs, adapter)
        except UserError as e:  # e.g. a template that refuses this sequence of roles
            raise APIError(400, str(e), param="messages") from None

    def submit(ids: list[int], sp, adapter: str | None):
        try:
            return engine.submit(ids, sp, adapter)
        except AdapterError:  # unloaded between the name check and now
            pick(adapter)
            raise
        except EngineBusy:
            raise APIError(
                503,
                "The server is overloaded: too many queued requests; retry later",
                type="server_error",
                code="overloaded",
            ) from None

    async def wait(handle, request: Request):
        """The handle's result; if the client goes away first, cancel the generation."""
        fut = asyncio.ensure_future(run_blocking(handle.result))
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.5)
            if done:
                return fut.result()
            if await request.is_disconnected():
                handle.cancel()
                raise APIError(499, "client closed the request")

    def usage(r) -> dict:
        return {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        }

    def stream(handle, head: dict, piece, include_usage: bool) -> StreamingResponse:
        """SSE: one chunk per delta, a last one with finish_reason, optional usage, [DONE]."""
        state = {"finished": False}

        async def events():
            it = iter(handle)
            first = piece("", None, role=True)
            if first is not None:
                yield _sse({**head, "choices": [first]})
            try:
                while (delta := await run_blocking(next, it, _END)) is not _END:
                    if delta:
                        yield _sse({**head, "choices": [piece(delta, None)]})
                r = await run_blocking(handle.result)
                state["finished"] = True
                yield _sse({**head, "choices": [piece("", r.finish_reason)]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(r)})
            except Exception as e:  # the status line is sent already: report in-band
                yield _sse(error_body(f"generation failed: {e}", type="server_error"))
            yield "data: [DONE]\n\n"

        class _Stream(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    if not state["finished"]:  # the client went away: stop generating for it
                        handle.cancel()

        return _Stream(events(), media_type="text/event-stream")

    # ---- endpoints ----
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base, "adapters": registry.names()}

    @app.get("/v1/models")
    async def list_models():
        def card(name: str, parent: str | None) -> dict:
            return {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "loraforge",
                "root": name,
                "parent": parent,
                "max_model_len": ctx,
            }

        data = [card(base, None)] + [card(n, base) for n in registry.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        name, adapter = pick(req.model)
        ids = await encode_chat(
            [{"role": m.role, "content": m.text()} for m in req.messages], adapter
        )
        requested = req.max_completion_tokens or req.max_tokens
        sp = params(req, budget(len(ids), requested))
        handle = submit(ids, sp, adapter)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": name,
        }
        if req.stream:

            def piece(text: str, finish: str | None, role: bool = False) -> dict:
                delta = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

            head["object"] = "chat.completion.chunk"
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(handle, head, piece, include)
        r = await wait(handle, request)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(r),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        name, adapter = pick(req.model)
        ids = await run_blocking(lambda: engine.tokenizer(req.prompt)["input_ids"])
        sp = params(req, budget(len(ids), req.max_tokens))
        handle = submit(list(ids), sp, adapter)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:

            def piece(text: str, finish: str | None, role: bool = False) -> dict | None:
                if role:
                    return None
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

            head["object"] = "text_completion"
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(handle, head, piece, include)
        r = await wait(handle, request)
        choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
        return {**head, "object": "text_completion", "choices": [choice], "usage": usage(r)}

    @app.post("/chat")
    async def simple_chat(req: SimpleChatRequest, request: Request):
        name, adapter = pick(req.model)
        ids = await encode_chat(req.messages(), adapter)
        sp = params(req, budget(len(ids), req.max_tokens))
        r = await wait(submit(ids, sp, adapter), request)
        return {"response": r.text, "model": name, "usage": usage(r)}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadAdapterRequest):
        await run_blocking(registry.load, req.lora_name, req.lora_path)
        return {"status": "ok", "message": f"Success: LoRA adapter '{req.lora_name}' loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadAdapterRequest):
        await run_blocking(registry.unload, req.lora_name)
        return {"status": "ok", "message": f"Success: LoRA adapter '{req.lora_name}' unloaded"}

    return app
