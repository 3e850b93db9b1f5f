"""The endpoints: OpenAI's chat and text completions and model list, the tutorials' ``/chat``,
vLLM's adapter load/unload, and ``/health``. Each reads top to bottom through ``Server``'s
steps: pick the adapter, encode, budget, params, submit, then wait or stream."""

from __future__ import annotations

import queue
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraforge.infer.logprobs import chat_logprobs, completion_logprobs, for_tokenizer
from loraforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    SimpleChatRequest,
    UnloadAdapterRequest,
    error_body,
)
from loraforge.serve.server import Server, usage
from loraforge.serve.tool_calls import (
    ToolCallStream,
    chat_message,
    check_grammar,
    plan_tools,
    with_grammar,
)

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
    plan = plan_tools(req, s.engine.prompt_template(adapter) if req.tools else "")
    ids = await s.encode_chat([m.as_dict() for m in req.messages], adapter, plan.tools)
    await s.run_blocking(check_grammar, plan, s.engine.tokenizer)
    fmt = await s.run_blocking(s.response_grammar, req)  # a forced tool call's grammar wins
    requested = req.max_completion_tokens or req.max_tokens
    params = with_grammar(s.params(req, s.budget(len(ids), requested)), plan)
    if fmt is not None and params.grammar is None:
        params = replace(params, grammar=fmt)
    if req.logprobs:
        params = replace(params, logprobs=req.top_logprobs or 0)
    # streamed choices interleave through one queue; the tool-call parser reads one at a time
    out = queue.Queue() if req.stream and req.n > 1 and not plan.parse else None
    handles = s.submit_n(ids, params, adapter, req.n, out=out)
    text = for_tokenizer(s.engine.tokenizer)

    def chat_lps(items: list | None) -> dict | None:
        return chat_logprobs(items, text) if req.logprobs and items else None

    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if req.stream:

        def piece(
            text: str | dict, finish: str | None, role: bool = False, index: int = 0, logprobs=None
        ) -> dict:
            delta = {"role": "assistant", "content": ""} if role else {}
            if isinstance(text, dict):  # delta.tool_calls (serve/tool_calls.py)
                delta.update(text)
            elif text:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": finish,
                    "logprobs": chat_lps(logprobs)}  # fmt: skip

        head["object"] = "chat.completion.chunk"
        include = bool(req.stream_options and req.stream_options.include_usage)
        if plan.parse:
            handles = [ToolCallStream(h, plan) for h in handles]
        return s.stream(handles, head, piece, include, req.n)
    results = await s.wait_all(handles, request)
    choices = []
    for i, r in enumerate(results):
        message, finish = chat_message(plan, r)
        choices.append({"index": i, "message": message, "finish_reason": finish,
                        "logprobs": chat_lps(r.logprobs)})  # fmt: skip
    usage_ = usage(results, req.n)
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage_}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    """Choice ``i * n + j`` is choice j of prompt i (OpenAI's order); ``echo`` puts the prompt
    (and its logprobs, the first token's null) in front of each."""
    s = _server(request)
    name, adapter = s.pick(req.model)
    prompts = await s.completion_prompts(req.prompt)
    n, k = req.n, req.logprobs
    fmt = await s.run_blocking(s.response_grammar, req)
    params = [
        replace(
            s.params(req, s.budget(len(ids), req.max_tokens)),
            logprobs=k,
            prompt_logprobs=k if req.echo else None,
            grammar=fmt,
        )
        for ids in prompts
    ]
    tok = s.engine.tokenizer
    echoes = [p if isinstance(p, str) else tok.decode(p) for p in req.prompt] if req.echo else []
    out = queue.Queue() if req.stream else None
    handles: list = []
    try:
        for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            handles += s.submit_n(ids, sp, adapter, n, out=out, index=i * n)
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    text = for_tokenizer(tok)
    offsets: dict[int, int] = {}

    def choice(index: int, piece: str, finish, items, prompt_items) -> dict:
        """One choice's text and logprobs; the first of a choice carries its echo."""
        lps = None
        if req.echo and index not in offsets:
            piece = echoes[index // n] + piece
            items = (prompt_items or []) + (items or [])
        if k is not None and (items or index not in offsets):
            lps, offsets[index] = completion_logprobs(items or [], text, offsets.get(index, 0))
        offsets.setdefault(index, 0)
        return {"index": index, "text": piece, "finish_reason": finish, "logprobs": lps}

    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if req.stream:

        def piece(text: str, finish, role: bool = False, index: int = 0, logprobs=None):
            if role:
                return None
            return choice(index, text, finish, logprobs, handles[index].prompt_logprobs)

        head["object"] = "text_completion"
        include = bool(req.stream_options and req.stream_options.include_usage)
        return s.stream(handles, head, piece, include, n)
    results = await s.wait_all(handles, request)
    choices = [
        choice(i, r.text, r.finish_reason, r.logprobs, r.prompt_logprobs)
        for i, r in enumerate(results)
    ]
    usage_ = usage(results, n)
    return {**head, "object": "text_completion", "choices": choices, "usage": usage_}


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
