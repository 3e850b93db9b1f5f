"""The Studio chat with tools: a tool call is shown as one, a pasted result goes back to the model
as a ``tool`` turn of the conversation, and the model's next answer is read from the prompt that
training and `serve` would render. The engine is scripted (a random model never writes a call),
the prompt rendering is the real one; the page itself is driven in tests/test_webui.py."""

from __future__ import annotations

import json

import pytest

from loraforge.data.tokenize import prompt_ids, resolve_template
from loraforge.errors import UserError
from loraforge.tools import JSON_STYLE, QWEN, call_text
from loraforge.webui.conversation import (
    add_tool_result,
    example_tools,
    parse_tools,
    pending_calls,
    reply,
    view,
)

TOOLS = json.loads(example_tools())


class ScriptedEngine:
    """Engine's encode/submit/prompt_template; answers are scripted, prompts are the real ones."""

    def __init__(self, tokenizer, answers: list[str], template: str | None = None):
        self.tokenizer, self.answers = tokenizer, list(answers)
        self.template = template or resolve_template(tokenizer)
        self.prompts: list[str] = []
        self.cancelled = 0

    def prompt_template(self, adapter=None) -> str:
        return self.template

    def encode(self, messages, adapter=None, tools=None) -> list[int]:
        ids = prompt_ids(self.tokenizer, messages, template=self.template, tools=tools)
        self.prompts.append(self.tokenizer.decode(ids))
        return ids

    def submit(self, ids, params, adapter=None):
        engine, text = self, self.answers.pop(0)

        class Handle:
            def __iter__(self):
                for i in range(0, len(text), 5):  # streamed in pieces
                    yield text[i : i + 5]

            def cancel(self):
                engine.cancelled += 1

        return Handle()


def _call(name: str, args: dict, style=JSON_STYLE) -> str:
    return call_text([{"function": {"name": name, "arguments": args}}], style)


@pytest.mark.parametrize("style", [JSON_STYLE, QWEN])
def test_call_shown_result_pasted_answer_read_from_it(tokenizer, style):
    template = None
    if style is QWEN:  # a native template: the tools and the tool turn are its own markup
        template = "{% for m in messages %}{{ m.role }}{% if tools %}<tool_call>{{ tools }}"
        template += "{% endif %}{% if m.tool_calls %}tool_calls{% endif %}{{ m.content }}"
        template += "{% endfor %}"
    engine = ScriptedEngine(
        tokenizer,
        [_call("get_weather", {"city": "Paris", "unit": "celsius"}, style), "It is 18 °C."],
        template,
    )
    conv = [{"role": "user", "content": "Weather in Paris?"}]
    steps = list(reply(engine, conv, None, None, TOOLS))
    assert len(steps) > 2, "the answer was not streamed"
    conv = steps[-1]
    (call,) = conv[-1]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and conv[-1]["content"] is None
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert pending_calls(conv) == [call]
    shown = view(conv)
    assert shown[-1]["metadata"]["title"] == "Tool call: get_weather"
    assert "Paris" in shown[-1]["content"]

    conv = add_tool_result(conv, '  {"temperature": 18}  ')
    assert conv[-1] == {
        "role": "tool",
        "tool_call_id": call["id"],
        "name": "get_weather",
        "content": '{"temperature": 18}',
    }
    assert pending_calls(conv) == []
    assert view(conv)[-1]["metadata"]["title"] == "Result of get_weather"
    conv = list(reply(engine, conv, None, None, TOOLS))[-1]
    assert conv[-1] == {"role": "assistant", "content": "It is 18 °C."}
    # the second prompt is what training renders for this conversation: call and result in it
    expected = prompt_ids(tokenizer, conv[:-1], template=engine.template, tools=TOOLS)
    assert engine.prompts[-1] == tokenizer.decode(expected)
    assert '{"temperature": 18}' in engine.prompts[-1] and "get_weather" in engine.prompts[-1]
    assert [m["role"] for m in view(conv)] == ["user"] + ["assistant"] * 3


def test_invalid_call_stays_text(tokenizer):
    """A call of an unknown function, or arguments that fail the schema, is shown as text."""
    bad = [_call("get_wether", {"city": "Paris"}), _call("get_weather", {"city": 3})]
    engine = ScriptedEngine(tokenizer, bad)
    for text in bad:
        conv = list(reply(engine, [{"role": "user", "content": "?"}], None, None, TOOLS))[-1]
        assert conv[-1] == {"role": "assistant", "content": text}
        assert pending_calls(conv) == [] and "metadata" not in view(conv)[-1]


def test_without_tools_nothing_is_read_as_a_call(tokenizer):
    text = _call("get_weather", {"city": "Paris", "unit": "celsius"})
    engine = ScriptedEngine(tokenizer, [text])
    conv = list(reply(engine, [{"role": "user", "content": "?"}], None, None, None))[-1]
    assert conv[-1] == {"role": "assistant", "content": text}
    assert "get_weather" not in engine.prompts[-1]


def test_system_prompt_and_stop(tokenizer):
    engine = ScriptedEngine(tokenizer, ["a long answer that is stopped early"])
    answers = reply(engine, [{"role": "user", "content": "hi"}], None, None, None, "Be terse.")
    next(answers)
    answers.close()  # Stop, or the tab closed: the request is cancelled
    assert engine.cancelled == 1
    assert "Be terse." in engine.prompts[-1]


def test_two_calls_take_two_results(tokenizer):
    both = _call("get_weather", {"city": "Oslo", "unit": "celsius"}) + "\n"
    both += _call("convert_currency", {"amount": 5, "from_currency": "EUR", "to_currency": "NOK"})
    engine = ScriptedEngine(tokenizer, [both])
    conv = list(reply(engine, [{"role": "user", "content": "?"}], None, None, TOOLS))[-1]
    first, second = conv[-1]["tool_calls"]
    conv = add_tool_result(conv, "3 degrees")
    assert pending_calls(conv) == [second] and conv[-1]["tool_call_id"] == first["id"]
    conv = add_tool_result(conv, "57 NOK")
    assert conv[-1]["name"] == "convert_currency" and pending_calls(conv) == []
    with pytest.raises(UserError, match="No tool call is waiting"):
        add_tool_result(conv, "again")


def test_tools_box_errors_are_one_line():
    assert parse_tools("  ") is None and len(parse_tools(example_tools())) == 2
    assert parse_tools('{"name": "f", "parameters": {"type": "object"}}')[0]["type"] == "function"
    for text, where in [
        ("[1,", "not JSON (line 1"),
        ('[{"description": "x"}]', "function name"),
        ('[{"name": "f", "parameters": {"type": "objekt"}}]', "(f) parameters"),
    ]:
        with pytest.raises(UserError, match=r"^Tools: ") as e:
            parse_tools(text)
        assert where in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="Paste what the tool returned"):
        add_tool_result([{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}], " ")
