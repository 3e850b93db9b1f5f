"""`loraforge serve`: an OpenAI-compatible HTTP API over one Engine, many adapters on one base.

Every generation goes through ``Engine.submit``, which batches concurrent requests (whatever
adapter each uses) into one decode loop, so switching adapters never reloads anything. The
request's ``model`` picks the adapter; the base model's name means none.

This file wires the app: errors always in OpenAI's format, the API key, the body-size limit;
``server.py`` holds the shared state and steps, ``routes.py`` the endpoints.
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.serve.routes import router
from loraforge.serve.schemas import APIError, error_body
from loraforge.serve.server import Server, context_length  # noqa: F401 - re-exported


def _validation_error(exc: RequestValidationError) -> dict:
    """OpenAI's error body for a request the schema refused: the first problem, its ``param``
    (the dotted field path) and a stable ``code`` (invalid_json, missing_parameter or
    invalid_value)."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        why = err.get("ctx", {}).get("error", err.get("msg"))
        return error_body(f"invalid JSON body: {why}", code="invalid_json")
    if not loc and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
        what = "is missing" if err.get("type") == "missing" else "must be a JSON object"
        return error_body(f"request body {what}", code="invalid_json")
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    code = "missing_parameter" if err.get("type") == "missing" else "invalid_value"
    return error_body(f"{param}: {msg}" if param else msg, param=param, code=code)


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


MAX_BODY_BYTES = 4 * 1024 * 1024  # a chat request far above any context this server takes


def create_app(
    engine,
    *,
    api_key: str | None = None,
    adapter_root: str | Path | None = None,
    default_model: str | None = None,
    max_tokens_limit: int = 4096,
    max_context: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """The FastAPI app. ``engine`` follows loraforge.infer.engine.Engine; the caller closes it.
    ``cors_origins``: browser origins allowed to call the API (none by default; "*" any)."""
    from loraforge import __version__

    server = Server(
        engine,
        adapter_root=adapter_root,
        default_model=default_model,
        max_tokens_limit=max_tokens_limit,
        max_context=max_context,
    )

    @asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = FastAPI(title="loraforge", version=__version__, lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    app.add_middleware(_LimitBody, limit=max_body_bytes)
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)
    if cors_origins:  # added last: the outermost layer, so preflights never meet the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.include_router(router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Always OpenAI's error format, never a bare 422/500 page."""
    from loraforge.errors import UserError

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        return JSONResponse(_validation_error(exc), status_code=400)

    @app.exception_handler(UserError)
    async def _user_error(_req, exc: UserError):
        return JSONResponse(error_body(str(exc), code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # 400 here is FastAPI's "There was an error parsing the body" (e.g. a 5000-digit int)
        codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        body = error_body(str(exc.detail), type=kind, code=code)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req, exc: Exception):
        msg = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(msg, type="server_error"), status_code=500)


class _LimitBody:
    """413 for a body over ``limit`` bytes, by its Content-Length or as it streams in, before
    any of it is parsed: a client must not make the server hold gigabytes of JSON."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = JSONResponse(
            error_body(f"request body over {self.limit} bytes", code="request_too_large"),
            status_code=413,
        )
        if declared is not None:  # the HTTP server reads no more than the declared length
            if not declared.isdigit() or int(declared) > self.limit:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        # Bug fix: a chunked body (no Content-Length) over the limit was a 400 "There was an
        # error parsing the body": the APIError raised from inside ``receive`` reached FastAPI's
        # body parser, which turns any error into that. Read it here, up to the limit, instead.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: no one to answer
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: the client's disconnect, as the app expects
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
