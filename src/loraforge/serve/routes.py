"""The endpoints: OpenAI's chat and text completions and model list, the tutorials' ``/chat``,
vLLM's adapter load/unload, and ``/health``. Each reads top to bottom through ``Server``'s
steps: pick the adapter, encode, budget, params, submit, then wait or stream."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    SimpleChatRequest,
    UnloadAdapterRequest,
    error_body,
)
from loraforge.serve.server import Server, usage

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


@router.get("/health")
async def health(request: Request):
    s = _server(request)
    if not s.engine.alive():  # the engine's worker died: say so, so an orchestrator restarts us
        body = error_body("the generation engine stopped", type="server_error")
        return JSONResponse({"status": "error", **body}, status_code=503)
    return {"status": "ok", "model": s.base, "adapters": s.registry.names()}


def _card(s: Server, name: str, parent: str | None) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": s.started,
        "owned_by": "loraforge",
        "root": name,
        "parent": parent,
        "max_model_len": s.ctx,
    }


@router.get("/v1/models")
async def list_models(request: Request):
    s = _server(request)
    data = [_card(s, s.base, None)] + [_card(s, n, s.base) for n in s.registry.names()]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    s = _server(request)
    name, adapter = s.pick(model_id or "/")  # "/": no model is so named, a 404 in OpenAI's shape
    return _card(s, name, None if adapter is None else s.base)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    s = _server(request)
    name, adapter = s.pick(req.model)
    ids = await s.encode_chat(
        [{"role": m.role, "content": m.text()} for m in req.messages], adapter
    )
    requested = req.max_completion_tokens or req.max_tokens
    handle = s.submit(ids, s.params(req, s.budget(len(ids), requested)), adapter)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if req.stream:

        def piece(text: str, finish: str | None, role: bool = False) -> dict:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

        head["object"] = "chat.completion.chunk"
        include = bool(req.stream_options and req.stream_options.include_usage)
        return s.stream(handle, head, piece, include)
    r = await s.wait(handle, request)
    message = {"role": "assistant", "content": r.text}
    choice = {"index": 0, "message": message, "finish_reason": r.finish_reason, "logprobs": None}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(r)}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    s = _server(request)
    name, adapter = s.pick(req.model)
    ids = await s.run_blocking(lambda: s.engine.tokenizer(req.prompt)["input_ids"])
    handle = s.submit(list(ids), s.params(req, s.budget(len(ids), req.max_tokens)), adapter)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if req.stream:

        def piece(text: str, finish: str | None, role: bool = False) -> dict | None:
            if role:
                return None
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        head["object"] = "text_completion"
        include = bool(req.stream_options and req.stream_options.include_usage)
        return s.stream(handle, head, piece, include)
    r = await s.wait(handle, request)
    choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
    return {**head, "object": "text_completion", "choices": [choice], "usage": usage(r)}


@router.post("/chat")
async def simple_chat(req: SimpleChatRequest, request: Request):
    s = _server(request)
    name, adapter = s.pick(req.model)
    ids = await s.encode_chat(req.messages(), adapter)
    handle = s.submit(ids, s.params(req, s.budget(len(ids), req.max_tokens)), adapter)
    r = await s.wait(handle, request)
    return {"response": r.text, "model": name, "usage": usage(r)}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadAdapterRequest, request: Request):
    await _server(request).run_blocking(
        _server(request).registry.load, req.lora_name, req.lora_path
    )
    return {"status": "ok", "message": f"Success: LoRA adapter '{req.lora_name}' loaded"}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadAdapterRequest, request: Request):
    s = _server(request)
    await s.run_blocking(s.registry.unload, req.lora_name)
    return {"status": "ok", "message": f"Success: LoRA adapter '{req.lora_name}' unloaded"}
