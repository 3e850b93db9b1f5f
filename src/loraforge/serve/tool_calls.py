"""OpenAI ``tools`` / ``tool_choice`` on chat completions: what the prompt shows, whether the
grammar forces a call, and the answer read back as ``message.tool_calls`` (``delta.tool_calls``
chunks when streamed). How a family writes a call is loraforge/tools.py's business.

``tool_choice``: ``auto`` (the default with tools) reads the answer for calls; ``required`` and a
named function make the answer one call through the constrained decoder (infer/constrain.py);
``none`` keeps the tools in the prompt, as OpenAI does (its prompt token count includes them),
and returns whatever the model writes as text. A call whose function is unknown or whose
arguments fail the function's JSON schema is returned as text, never as a broken tool call.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass

from loraforge.serve.schemas import APIError
from loraforge.tools import (
    JSON_STYLE,
    ToolStyle,
    call_grammar,
    parse_calls,
    schema_problem,
    tool_style,
)

ARGUMENT_PIECE = 16  # characters of arguments per streamed chunk, as OpenAI streams them


@dataclass
class ToolPlan:
    tools: list[dict] | None  # OpenAI tool definitions the prompt shows (None: no tools)
    style: ToolStyle = JSON_STYLE
    parse: bool = False  # read the answer for calls
    grammar: object | None = None  # a GrammarSpec that forces one call


def plan_tools(req, template: str) -> ToolPlan:
    """The request's tools and tool_choice, checked (400s name ``tools`` or ``tool_choice``)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(
                400,
                "tool_choice is only allowed when tools are given",
                param="tool_choice",
                code="invalid_value",
            )
        return ToolPlan(None)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    for i, tool in enumerate(tools):
        problem = schema_problem(tool["function"])
        if problem:
            raise APIError(
                400,
                f"tools[{i}].function.parameters: {problem}",
                param=f"tools.{i}.function.parameters",
                code="invalid_schema",
            )
    style = tool_style(template)
    if choice == "none":
        return ToolPlan(tools, style)
    if choice in (None, "auto"):
        return ToolPlan(tools, style, parse=True)
    name = None if choice == "required" else choice.function.name
    names = [t["function"]["name"] for t in tools]
    if name is not None and name not in names:
        raise APIError(
            400,
            f"tool_choice names the function '{name}', which is not in tools ({', '.join(names)})",
            param="tool_choice",
            code="invalid_value",
        )
    return ToolPlan(tools, style, parse=True, grammar=_grammar(style, tools, name))


def _grammar(style: ToolStyle, tools: list[dict], name: str | None):
    from loraforge.infer.constrain import GrammarError

    try:
        return call_grammar(style, tools, name)
    except GrammarError as e:
        raise APIError(400, str(e), param="tools", code="invalid_schema") from None


def check_grammar(plan: ToolPlan, tokenizer) -> None:
    """Compile the forcing grammar now, so a schema the engine cannot take is a 400 before the
    request is queued (run it off the event loop: the first compile takes ~0.1 s)."""
    if plan.grammar is None:
        return
    from loraforge.infer.constrain import GrammarError, check

    try:
        check(plan.grammar, tokenizer)
    except GrammarError as e:
        raise APIError(400, str(e), param="tools", code="invalid_schema") from None


def with_grammar(params, plan: ToolPlan):
    return dataclasses.replace(params, grammar=plan.grammar) if plan.grammar else params


def openai_calls(calls: list[dict]) -> list[dict]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": c["name"],
                "arguments": json.dumps(c["arguments"], ensure_ascii=False),
            },
        }
        for c in calls
    ]


def chat_message(plan: ToolPlan, r) -> tuple[dict, str]:
    """(message, finish_reason) of a finished request."""
    if plan.parse:
        content, calls = parse_calls(plan.style, r.text, plan.tools)
        if calls:
            message = {"role": "assistant", "content": content or None}
            return {**message, "tool_calls": openai_calls(calls)}, "tool_calls"
    return {"role": "assistant", "content": r.text}, r.finish_reason


class ToolCallStream:
    """A request handle seen through the call parser, for ``Server.stream``: iterating gives the
    text while it cannot be a call, holds back what may be one, and at the end gives the calls
    as ``delta.tool_calls`` dicts (id and name first, then the arguments in pieces); the
    arguments are sent once they have been checked against the schema."""

    def __init__(self, handle, plan: ToolPlan):
        self.handle, self.plan = handle, plan
        self.text = ""
        self.sent = 0
        self.called = False

    def cancel(self) -> None:
        self.handle.cancel()

    def result(self, timeout: float | None = None):
        r = self.handle.result(timeout)
        return dataclasses.replace(r, finish_reason="tool_calls") if self.called else r

    def __iter__(self):
        for delta in self.handle:
            self.text += delta
            end = _safe_end(self.plan.style, self.text)
            if end > self.sent:
                yield self.text[self.sent : end]
                self.sent = end
        _, calls = parse_calls(self.plan.style, self.text, self.plan.tools)
        if not calls:
            if self.sent < len(self.text):
                yield self.text[self.sent :]
            return
        self.called = True  # the text before the call went out already (up to its start)
        for i, call in enumerate(openai_calls(calls)):
            fn = call["function"]
            head = {"index": i, "id": call["id"], "type": "function"}
            yield {"tool_calls": [{**head, "function": {"name": fn["name"], "arguments": ""}}]}
            args = fn["arguments"]
            for at in range(0, len(args), ARGUMENT_PIECE):
                piece = {"arguments": args[at : at + ARGUMENT_PIECE]}
                yield {"tool_calls": [{"index": i, "function": piece}]}


def _safe_end(style: ToolStyle, text: str) -> int:
    """How much of ``text`` is surely content: up to where a call begins or may begin."""
    head = style.begin.strip().split()[0] if style.begin.strip() else ""
    if not head:  # the whole answer is the call: hold it all while it may be JSON
        stripped = text.lstrip()
        return 0 if not stripped or stripped[0] in "{[" else len(text)
    at = text.find(head)
    if at >= 0:
        return at
    for n in range(min(len(head) - 1, len(text)), 0, -1):  # a marker still arriving
        if text.endswith(head[:n]):
            return len(text) - n
    return len(text)
