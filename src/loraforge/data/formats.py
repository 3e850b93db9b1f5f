"""Detect a record's format and normalise it to a list of messages.

Four formats are recognised per record (a file may mix them):
alpaca (``instruction``/``input``/``output``), messages (OpenAI ``messages``), sharegpt
(``conversations`` of ``{from, value}``, optional ``tools``) and query/response (ms-swift).
Each problem is a ``RecordProblem`` whose message says what is wrong; the caller adds the file
and line, so every bad record ends up as one line "file:line: what is wrong".
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")

# sharegpt speaker names -> roles. function_call is the assistant calling a tool; observation is
# the tool's answer (LLaMA-Factory's conventions, which the glaive tool-call sets follow).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


class RecordProblem(ValueError):
    """One thing wrong with one record; the message has no location, the caller adds it."""


def detect_format(record: dict) -> str:
    """The record's format name, or raise RecordProblem listing the keys it saw."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        if "chosen" in record or "rejected" in record:
            raise RecordProblem(
                "preference pair (chosen/rejected): not a supervised fine-tuning record"
            )
        return "sharegpt"
    if "instruction" in record or ("output" in record and "input" in record):
        return "alpaca"
    if "query" in record or "response" in record:
        return "query_response"
    keys = ", ".join(sorted(map(str, record))) or "none"
    hint = " (plain text for pre-training is not supported)" if set(record) == {"text"} else ""
    raise RecordProblem(
        f"unknown format{hint}; keys seen: {keys}; expected alpaca (instruction/output), "
        "messages, sharegpt (conversations) or query/response"
    )


def normalise(record: dict) -> tuple[str, list[dict], list | None]:
    """Return (format, messages, tools) for one record, or raise RecordProblem."""
    if not isinstance(record, dict):
        raise RecordProblem(f"record is a {_kind(record)}, expected an object with named fields")
    fmt = detect_format(record)
    tools = None
    if fmt == "alpaca":
        prompt = _text(record, "instruction", required=False)
        extra = _text(record, "input", required=False)
        prompt = f"{prompt}\n{extra}" if prompt and extra else prompt or extra
        messages = _pairs(record, prompt, _text(record, "output"))
    elif fmt == "query_response":
        prompt = _text(record, "query")
        messages = _pairs(record, prompt, _text(record, "response"))
    else:  # messages and sharegpt may carry a `tools` column (OpenAI fine-tuning files do)
        parse = _openai_messages if fmt == "messages" else _sharegpt
        messages = parse(record)
        tools = _tools(record.get("tools"))
    # An empty system prompt means "none"; every other empty turn is an error.
    messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    _check(messages)
    return fmt, messages, tools


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def _as_text(value, what: str) -> str | None:
    """Text of a field: numbers become text (CSV and spreadsheets give them), None is absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RecordProblem(f"{what} is a {_kind(value)}, expected text")


def _text(record: dict, key: str, required: bool = True) -> str:
    value = _as_text(record.get(key), f"field '{key}'")
    if value is None and required:
        raise RecordProblem(f"missing field '{key}'")
    return value or ""


def _pairs(record: dict, prompt: str, answer: str) -> list[dict]:
    """system + history pairs + the final prompt/answer (alpaca and query/response share this)."""
    messages = []
    system = _text(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = _json_field(record.get("history"), "history") or []
    if not isinstance(history, list):
        raise RecordProblem(f"field 'history' is a {_kind(history)}, expected [[question, answer]]")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordProblem(f"history[{i}] is not a [question, answer] pair")
        messages.append({"role": "user", "content": _as_text(pair[0], f"history[{i}][0]") or ""})
        content = _as_text(pair[1], f"history[{i}][1]") or ""
        messages.append({"role": "assistant", "content": content})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": answer})
    return messages


def _json_field(value, key: str):
    """Nested fields arrive as JSON text from CSV files (and from some JSON exports)."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordProblem(f"field '{key}' is text but not valid JSON ({e.msg})") from None
    return value


def _turns(value, key: str) -> list:
    value = _json_field(value, key)
    if not isinstance(value, list):
        raise RecordProblem(f"field '{key}' is a {_kind(value)}, expected a list of turns")
    return value


def content_text(value, where: str = "content") -> str:
    """The text of a message's content: a string, or OpenAI content parts
    (``[{"type": "text", "text": ...}, ...]``, or one such part) joined. Training data and the
    API server read content through this. A part that is not text is a RecordProblem."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list | tuple):
        texts = []
        for i, part in enumerate(value):
            text = part.get("text") if isinstance(part, dict) else None
            if (
                isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(text, str)
            ):
                texts.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise RecordProblem(
                    f"{where}: content part {i} ({kind}) is not text; only text parts are supported"
                )
        return "".join(texts)
    return _as_text(value, f"{where} content") or ""


def _openai_messages(record: dict) -> list[dict]:
    messages = []
    for i, msg in enumerate(_turns(record["messages"], "messages")):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RecordProblem(f"{where} is a {_kind(msg)}, expected {{role, content}}")
        if "role" not in msg:
            raise RecordProblem(f"{where} has no 'role' (keys: {', '.join(map(str, msg))})")
        role = msg["role"]
        if role == "function":  # the pre-2024 OpenAI name for a tool result
            role = "tool"
        if role not in ROLES:
            raise RecordProblem(f"{where}: unknown role '{role}' (expected {'/'.join(ROLES)})")
        message = {"role": role, "content": content_text(msg.get("content"), where)}
        if role == "assistant" and msg.get("tool_calls"):
            message["tool_calls"] = _calls(msg["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            message["tool_call_id"] = msg["tool_call_id"]
        messages.append(message)
    return messages


def _calls(calls, where: str) -> list[dict]:
    """Tool calls in loraforge's one shape (tools.py), each problem a RecordProblem."""
    from loraforge.tools import ToolFormatError, normalise_calls

    try:
        return normalise_calls(_json_field(calls, where), where)
    except ToolFormatError as e:
        raise RecordProblem(str(e)) from None


def _sharegpt(record: dict) -> list[dict]:
    messages = []
    system = _text(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(_turns(record["conversations"], "conversations")):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(f"{where} is a {_kind(turn)}, expected {{from, value}}")
        # LLaMA-Factory also accepts role/content inside `conversations`.
        speaker = turn.get("from", turn.get("role"))
        if speaker is None:
            raise RecordProblem(f"{where} has no 'from' (keys: {', '.join(map(str, turn))})")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            known = "/".join(SHAREGPT_ROLES)
            raise RecordProblem(f"{where}: unknown role '{speaker}' (expected {known})")
        value = turn["value"] if "value" in turn else turn.get("content")
        if str(speaker).lower() == "function_call":  # {"name", "arguments"} as JSON text
            calls = _calls(value, where)
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        messages.append({"role": role, "content": content_text(value, where)})
    return messages


def _tools(value) -> list | None:
    value = _json_field(value, "tools")
    if value in (None, [], {}):
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordProblem(f"field 'tools' is a {_kind(value)}, expected a list of tools")
    return value


def _check(messages: list[dict]) -> None:
    for i, msg in enumerate(messages):
        if not msg["content"].strip() and not msg.get("tool_calls"):
            raise RecordProblem(f"empty content in turn {i + 1} ({msg['role']})")
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages) or "none"
        raise RecordProblem(f"no assistant turn (roles: {roles})")
