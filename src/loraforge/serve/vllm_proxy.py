"""The thin proxy in front of vLLM for `loraforge serve --backend vllm` (serve/vllm_backend.py).

It adds what loraforge promises and vLLM alone does not give: the api key, body limit, CORS and
error format of loraforge's own server (serve/app.py), prompts rendered with each adapter's
training template and system prompt, and runtime adapter changes confined to --adapter-root.
Bodies are relayed as bytes; a client that disconnects closes the upstream connection, which
makes vLLM abort that request.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from loraforge.serve.schemas import APIError

FORWARDED_HEADERS = ("content-type",)


def create_proxy(
    upstream: str,
    upstream_key: str,
    formats: dict[str, tuple[str, str | None]],
    *,
    base_spec: str,
    api_key: str | None = None,
    adapter_root: str | Path | None = None,
    max_lora_rank: int = 16,
    default_model: str | None = None,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """``formats``: served model name -> (chat template, default system prompt); adapters
    loaded at runtime are added to it. ``base_spec``: the base model adapters must be for."""
    import httpx

    from loraforge import __version__
    from loraforge.serve.app import MAX_BODY_BYTES, _install_error_handlers, _LimitBody, _RequireKey

    client = httpx.AsyncClient(
        base_url=upstream,
        headers={"Authorization": f"Bearer {upstream_key}"},
        timeout=httpx.Timeout(None, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )
    root = Path(adapter_root) if adapter_root is not None else None
    base_name = next(iter(formats))  # the first entry is the base model's
    default = default_model or base_name

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = FastAPI(title="loraforge (vLLM backend)", version=__version__, lifespan=lifespan)
    _install_error_handlers(app)
    app.add_middleware(_LimitBody, limit=MAX_BODY_BYTES)
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )

    async def relay(method: str, path: str, body: bytes | None = None) -> Response:
        """Send to vLLM; stream its answer back (server-sent events and JSON alike)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        req = client.build_request(method, path, content=body, headers=headers)
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            msg = f"vLLM is unreachable ({type(e).__name__})"
            raise APIError(503, msg, code="backend_down") from None

        async def chunks():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:  # also on a client disconnect: vLLM then aborts the request
                await resp.aclose()

        kept = {k: v for k, v in resp.headers.items() if k.lower() in FORWARDED_HEADERS}
        return StreamingResponse(chunks(), status_code=resp.status_code, headers=kept)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"invalid JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health():
        return await relay("GET", "/health")

    @app.get("/v1/models")
    async def models():
        return await relay("GET", "/v1/models")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from loraforge.data.tokenize import with_system

        body = await json_body(request)
        body["model"] = body.get("model") or default
        if "chat_template" in body:
            raise APIError(
                400,
                "chat_template: each model's template is the one it was trained with",
                param="chat_template",
                code="invalid_value",
            )
        template, system = formats.get(body["model"], (None, None))
        messages = body.get("messages")
        if template is not None and isinstance(messages, list):
            if all(isinstance(m, dict) for m in messages):
                body["messages"] = with_system(messages, system)
            body["chat_template"] = template
        return await relay("POST", "/v1/chat/completions", json.dumps(body).encode())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        body["model"] = body.get("model") or default
        return await relay("POST", "/v1/completions", json.dumps(body).encode())

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        from loraforge.adapters import prompt_format, resolve_adapter
        from loraforge.errors import UserError
        from loraforge.models import load_tokenizer, resolve_model
        from loraforge.serve.registry import resolve_in_root
        from loraforge.serve.vllm_backend import check_adapter_for_vllm

        body = await json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name:
            raise APIError(400, "lora_name: a name is required", param="lora_name",
                           code="missing_parameter")  # fmt: skip
        if not isinstance(path, str) or not path:
            raise APIError(400, "lora_path: a path is required", param="lora_path",
                           code="missing_parameter")  # fmt: skip
        real = resolve_in_root(root, path)  # refuses outside --adapter-root, or without one
        try:
            meta = resolve_adapter(real, base_spec)
            rank = check_adapter_for_vllm(real)
        except UserError as e:
            raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
        if rank > max_lora_rank:
            raise APIError(
                400,
                f"lora_path: rank {rank} is above this server's --max-lora-rank {max_lora_rank}",
                param="lora_path",
                code="invalid_adapter",
            )
        forwarded = json.dumps({"lora_name": name, "lora_path": str(real)}).encode()
        resp = await relay("POST", "/v1/load_lora_adapter", forwarded)
        if resp.status_code == 200:
            formats[name] = prompt_format(meta, load_tokenizer(resolve_model(base_spec)))
        return resp

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        from loraforge.serve.registry import _require_root

        _require_root(root, "lora_name")
        body = await json_body(request)
        name = body.get("lora_name")
        if name not in formats or name == base_name:
            raise APIError(
                404,
                f"The lora adapter '{name}' cannot be found.",
                param="lora_name",
                code="model_not_found",
                type="not_found_error",
            )
        resp = await relay("POST", "/v1/unload_lora_adapter", json.dumps(body).encode())
        if resp.status_code == 200:
            formats.pop(name, None)
        return resp

    return app
