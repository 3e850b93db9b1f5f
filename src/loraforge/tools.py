"""Tool calls (function calling): how each model family writes one, in one place.

Training, chat, the server and ``eval --tools`` all go through here to render the tool list and
the tool turns into a prompt, to know where a call begins and ends in the model's output, and to
read a call back out of it:

- ``qwen``: Qwen2.5 / Qwen3 (Hermes style), ``<tool_call>\\n{"name": ..., "arguments": ...}
  \\n</tool_call>``, one block per call, after optional text;
- ``llama3``: Llama-3.1+, the whole answer is ``{"name": ..., "parameters": ...}``;
- ``mistral``: Mistral v0.3, ``[TOOL_CALLS] [{"name": ..., "arguments": ..., "id": ...}]``;
- ``json``: every template that knows nothing of tools (SmolLM2's, ChatML, Llama-3.0): the tool
  list goes into the system prompt (``TOOLS_PROMPT``), a call is the whole answer as one JSON
  object ``{"name": ..., "arguments": ...}`` per line, and a tool result is a ``tool`` turn.

Native templates get the tools and the structured ``tool_calls`` themselves, so a fine-tune
learns exactly the format the model was built with. Inside loraforge a message's calls are
``[{"id", "type": "function", "function": {"name", "arguments": dict}}]``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from loraforge.errors import UserError

# For templates that know nothing of tools: the tool list goes into the system prompt, so a
# model trained on tool calls sees the definitions it is calling. Chat time renders the same way.
TOOLS_PROMPT = (
    "You can call the tools below. To call one, answer with a JSON object "
    '{"name": <tool name>, "arguments": <arguments object>}.\n'
)


@dataclass(frozen=True)
class ToolStyle:
    """How one family writes a call: the text around each call's JSON, the arguments' key."""

    name: str
    begin: str  # text before a call's JSON ("" = the answer is the JSON)
    end: str  # text after it
    args_key: str = "arguments"
    native: bool = True  # the chat template renders tools and tool_calls itself


QWEN = ToolStyle("qwen", "<tool_call>\n", "\n</tool_call>")
LLAMA3 = ToolStyle("llama3", "", "", args_key="parameters")
MISTRAL = ToolStyle("mistral", "[TOOL_CALLS] [", "]")
JSON_STYLE = ToolStyle("json", "", "", native=False)


def tool_style(template: str) -> ToolStyle:
    """The style a chat template writes tool calls in (``json`` when it has none)."""
    if "tool_calls" in template:
        if "<tool_call>" in template:
            return QWEN
        if "[TOOL_CALLS]" in template:
            return MISTRAL
        if '"parameters": ' in template:
            return LLAMA3
    return JSON_STYLE


class ToolFormatError(UserError, ValueError):
    """A tool call or tool definition that cannot be read; the message says which part."""


# ---- definitions and calls in loraforge's one shape -------------------------------------------


def openai_tools(tools) -> list[dict]:
    """Tool definitions as OpenAI's ``[{"type": "function", "function": {name, ...}}]``; the
    glaive / LLaMA-Factory files give the bare ``{name, description, parameters}``."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolFormatError(f"tools[{i}]: a tool needs a function name")
        out.append({"type": "function", "function": fn})
    return out


def tool_names(tools) -> list[str]:
    return [t["function"]["name"] for t in openai_tools(tools)]


def normalise_calls(calls, where: str = "tool_calls") -> list[dict]:
    """OpenAI ``tool_calls`` (arguments as JSON text or an object) or bare ``{name, arguments}``
    objects as ``[{"id", "type": "function", "function": {"name", "arguments": dict}}]``."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise ToolFormatError(f"{where}: expected a list of tool calls")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolFormatError(f"{where}[{i}]: a tool call without a function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise ToolFormatError(f"{where}[{i}]: arguments are not valid JSON") from None
        if not isinstance(args, dict):
            raise ToolFormatError(f"{where}[{i}]: arguments must be a JSON object")
        call_id = call.get("id") if isinstance(call, dict) else None
        out.append(
            {
                "id": call_id if isinstance(call_id, str) else None,
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out


def call_text(calls: list[dict], style: ToolStyle = JSON_STYLE) -> str:
    """Calls as the model writes them (the ``json`` and ``qwen`` styles)."""
    objs = [
        json.dumps(
            {"name": c["function"]["name"], style.args_key: c["function"]["arguments"]},
            ensure_ascii=False,
        )
        for c in calls
    ]
    if style is MISTRAL:
        return style.begin + ", ".join(objs) + style.end
    return "\n".join(style.begin + o + style.end for o in objs)


# ---- rendering ----------------------------------------------------------------------------------


def render_inputs(template: str, messages: list[dict], tools) -> tuple[list[dict], dict]:
    """(messages, extra template kwargs) to render ``messages`` with ``tools`` through
    ``template``: native templates get the tools and structured calls; the others get the tool
    list in the system prompt and the calls as text in the assistant turn."""
    has_calls = any(m.get("tool_calls") for m in messages)
    if not tools and not has_calls and not any(m["role"] == "tool" for m in messages):
        return messages, {}
    messages = [  # calls from a client carry their arguments as JSON text: objects here
        {**m, "tool_calls": normalise_calls(m["tool_calls"])} if m.get("tool_calls") else m
        for m in messages
    ]
    style = tool_style(template)
    if style.native:
        kwargs = {"tools": openai_tools(tools)} if tools and not isinstance(tools, str) else {}
        return _native_messages(messages, style), kwargs
    out = []
    for orig in messages:
        m = {k: v for k, v in orig.items() if k not in ("tool_calls", "tool_call_id", "name")}
        if orig.get("tool_calls"):
            text = call_text(orig["tool_calls"])
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        out.append(m)
    return (_tools_in_system(out, tools) if tools else out), {}


def _native_messages(messages: list[dict], style: ToolStyle) -> list[dict]:
    """Messages for a template that renders calls itself. Mistral's insists on 9-character
    alphanumeric call ids, on the calls and on the tool results that answer them: ids are
    mapped (or made up, in order, for data that has none)."""
    out, pending, n = [], [], 0
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                n += 1
                cid = c.get("id") or f"call{n}"
                if style is MISTRAL:
                    cid = _short_id(cid)
                pending.append(cid)
                calls.append({**c, "id": cid})
            m["tool_calls"] = calls
        elif "tool_calls" in m:
            del m["tool_calls"]  # Llama-3.1 tests `'tool_calls' in message`
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if style is MISTRAL and cid:
                cid = _short_id(cid)
            if cid in pending:
                pending.remove(cid)
            elif pending:
                cid = pending.pop(0)
            if cid:
                m["tool_call_id"] = cid
        out.append(m)
    return out


def _short_id(call_id: str) -> str:
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    return hashlib.sha1(call_id.encode()).hexdigest()[:9]


def _tools_in_system(messages: list[dict], tools) -> list[dict]:
    if not isinstance(tools, str):
        try:  # one shape whatever the data gave (glaive's bare {name, ...} or OpenAI's), so a
            tools = openai_tools(tools)  # request's tools render as the training data did
        except ToolFormatError:
            pass
    listing = (
        tools
        if isinstance(tools, str)
        else "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    )
    text = TOOLS_PROMPT + listing
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ---- reading calls out of a model's answer ------------------------------------------------------


def parse_calls(style: ToolStyle, text: str, tools) -> tuple[str, list[dict]]:
    """(content, calls) read from an answer. Calls are ``{"name", "arguments": dict}`` of known
    tools whose arguments match the tool's JSON schema; when the answer holds no call, or any
    call is invalid, it is all content and there are no calls (never a broken call)."""
    content, objs = _split(style, text)
    if not objs:
        return text, []
    defs = {t["function"]["name"]: t["function"] for t in openai_tools(tools)}
    calls = []
    for obj in objs:
        if not isinstance(obj, dict) or obj.get("name") not in defs:
            return text, []
        args = obj.get(style.args_key, obj.get("arguments", obj.get("parameters")))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return text, []
        if args is None:
            args = {}
        if not isinstance(args, dict) or arguments_problem(defs[obj["name"]], args):
            return text, []
        calls.append({"name": obj["name"], "arguments": args})
    return content, calls


def _split(style: ToolStyle, text: str) -> tuple[str, list]:
    if style.begin.strip():
        head = style.begin.strip().split()[0]  # "<tool_call>", "[TOOL_CALLS]"
        at = text.find(head)
        if at < 0:
            return text, []
        rest = text[at:].replace(head, " ")
        if style is MISTRAL:  # one JSON list of calls; its "]" is the list's own
            objs = _json_values(rest) or []
            objs = [o for v in objs for o in (v if isinstance(v, list) else [v])]
        else:  # one block per call
            objs = _json_values(rest.replace(style.end.strip(), " ")) or []
        return text[:at].strip(), objs
    return "", _json_values(text) or []


def _json_values(text: str) -> list | None:
    """The JSON values ``text`` consists of (whitespace between), or None if anything else."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(value)


def arguments_problem(function: dict, args: dict) -> str | None:
    """Why ``args`` does not match the function's ``parameters`` schema, or None."""
    schema = function.get("parameters")
    if not schema:
        return None
    import jsonschema

    try:
        jsonschema.validate(args, schema)
    except jsonschema.ValidationError as e:
        return e.message
    except jsonschema.SchemaError as e:
        return f"the tool's parameters are not a valid JSON schema ({e.message})"
    return None


def schema_problem(function: dict) -> str | None:
    """Why a tool's ``parameters`` is not a JSON schema, or None (checked before queueing)."""
    schema = function.get("parameters")
    if schema is None:
        return None
    if not isinstance(schema, dict):
        return "parameters must be a JSON schema object"
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    return None


# ---- forcing a call with the grammar ------------------------------------------------------------


def call_schema(style: ToolStyle, function: dict) -> dict:
    """The JSON schema of one call of ``function`` as ``style`` writes it."""
    params = dict(function.get("parameters") or {"type": "object"})
    # No property beyond the declared ones while forced: left open, a grammar lets a small model
    # invent ",":"" pairs until max_tokens (seen on the tiny test model) instead of closing.
    if params.get("type") == "object" and "properties" in params:
        params.setdefault("additionalProperties", False)
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, style.args_key: params},
        "required": ["name", style.args_key],
        "additionalProperties": False,
    }


def call_grammar(style: ToolStyle, tools, name: str | None = None):
    """A GrammarSpec that makes the answer one call (of ``name``, or of any of ``tools``): the
    engine masks every other token (``tool_choice`` "required" or a named function)."""
    from loraforge.infer.constrain import tagged

    fns = [t["function"] for t in openai_tools(tools)]
    if name is not None:
        fns = [f for f in fns if f["name"] == name]
    return tagged(style.begin, [call_schema(style, f) for f in fns], style.end)
