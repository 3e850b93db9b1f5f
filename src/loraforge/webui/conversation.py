"""The Studio chat's conversation: OpenAI-format messages, tool calls and results included.

The conversation is kept as the messages an API client would send (``user``, ``assistant``
with ``tool_calls``, ``tool``), so a turn with tools is rendered by the code that renders them
for training and for `serve` (``Engine.encode``), and an answer is read for calls by `serve`'s
parser (``loraforge.tools.parse_calls``: a call of an unknown function, or with arguments that
fail the function's schema, stays text). What the chat box shows is derived from it: calls and
results are titled bubbles on the assistant's side. No Gradio here; chat.py wires it to the page.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from loraforge.errors import UserError


def parse_tools(text: str | None) -> list[dict] | None:
    """The Tools box: a JSON list of tool definitions (OpenAI's, or glaive's bare ``{name,
    parameters}``); blank is no tools. A problem is one line naming where it is."""
    from loraforge.tools import ToolFormatError, openai_tools, schema_problem

    if not text or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"Tools: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        tools = openai_tools([value] if isinstance(value, dict) else value)
    except ToolFormatError as e:
        raise UserError(f"Tools: {e}") from None
    for i, tool in enumerate(tools):
        problem = schema_problem(tool["function"])
        if problem:
            name = tool["function"].get("name")
            raise UserError(f"Tools: [{i}] ({name}) parameters: {problem}")
    return tools


def example_tools() -> str:
    """The tools of the weather/currency demo (what `examples/make_tools_demo.py` trains on)."""
    from loraforge.data.sources import BUILTIN_DIR

    with open(BUILTIN_DIR / "tools_demo.jsonl", encoding="utf-8") as f:
        first = json.loads(f.readline())
    return json.dumps(first["tools"], indent=2, ensure_ascii=False)


def pending_calls(conv: list[dict]) -> list[dict]:
    """The last assistant turn's tool calls that have no result yet, in order."""
    answered = set()
    for message in reversed(conv):
        if message["role"] == "tool":
            answered.add(message.get("tool_call_id"))
            continue
        if message["role"] == "assistant" and message.get("tool_calls"):
            return [c for c in message["tool_calls"] if c["id"] not in answered]
        return []
    return []


def add_tool_result(conv: list[dict], text: str) -> list[dict]:
    """``conv`` with ``text`` as the result of the first call still waiting for one."""
    calls = pending_calls(conv)
    if not calls:
        raise UserError("No tool call is waiting for a result.")
    if not text or not text.strip():
        raise UserError("Paste what the tool returned first.")
    call = calls[0]
    result = {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"]}
    return [*conv, {**result, "content": text.strip()}]


def call_label(call: dict) -> str:
    """``get_weather({"city": "Paris"})``: one call as a person reads it."""
    return f"{call['function']['name']}({call['function']['arguments']})"


def view(conv: list[dict]) -> list[dict]:
    """The chat box's messages: text turns as they are, each tool call and each tool result as
    a titled bubble on the assistant's side."""
    shown: list[dict] = []
    names: dict[str, str] = {}
    for message in conv:
        role, content = message["role"], message.get("content")
        if role == "user":
            shown.append({"role": "user", "content": content or ""})
        elif role == "assistant":
            if content:
                shown.append({"role": "assistant", "content": content})
            for call in message.get("tool_calls") or []:
                names[call["id"]] = call["function"]["name"]
                title = f"Tool call: {call['function']['name']}"
                shown.append(
                    {"role": "assistant", "content": call_label(call), "metadata": {"title": title}}
                )
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id"), "tool")
            title = f"Result of {name}"
            shown.append({"role": "assistant", "content": content, "metadata": {"title": title}})
    return shown


def reply(
    engine,
    conv: list[dict],
    adapter: str | None,
    params,
    tools: list[dict] | None = None,
    system: str | None = None,
) -> Iterator[list[dict]]:
    """Yield ``conv`` with the answer as it grows; the last one has the answer read for tool
    calls when ``tools`` are given. Closing the iterator (Stop, a closed tab) cancels it."""
    from loraforge.serve.tool_calls import openai_calls
    from loraforge.tools import parse_calls, tool_style

    head = [{"role": "system", "content": system}] if system else []  # else the adapter's own
    handle = engine.submit(engine.encode([*head, *conv], adapter, tools=tools), params, adapter)
    text = ""
    try:
        for delta in handle:
            text += delta
            yield [*conv, {"role": "assistant", "content": text}]
    finally:
        handle.cancel()  # a no-op once finished
    answer = {"role": "assistant", "content": text}
    if tools:
        content, calls = parse_calls(tool_style(engine.prompt_template(adapter)), text, tools)
        if calls:
            answer = {"role": "assistant", "content": content or None}
            answer["tool_calls"] = openai_calls(calls)
    yield [*conv, answer]
