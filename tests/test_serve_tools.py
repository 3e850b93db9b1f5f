"""OpenAI `tools` on `loraforge serve`: the official client's tool-calling loop, streamed
`delta.tool_calls`, the 400s, and how answers are read back as calls (or left as text).

The tiny random model never writes a call by itself: `tool_choice` "required" or a named
function makes it write one through the constrained decoder, so the loop is real (the call's
arguments come from the model, a Python function runs on them, its result goes back).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import openai
import pytest
from helpers import start_server

from loraforge.infer.engine import Engine
from loraforge.infer.sampling import GenerationResult
from loraforge.serve.app import create_app
from loraforge.serve.tool_calls import ToolCallStream, ToolPlan, chat_message
from loraforge.tools import JSON_STYLE, QWEN

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# enums keep the tiny model's forced arguments short (a free string could run to max_tokens)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
needs_grammar = pytest.mark.skipif(
    importlib.util.find_spec("loraforge.infer.constrain") is None,
    reason="infer/constrain.py (the constrained decoder) is not in this tree",
)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def url(engine):
    app = create_app(engine, max_tokens_limit=200)
    base, srv, thread = start_server(app)
    yield base
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def post(url: str, **body) -> httpx.Response:
    body = {"messages": ASK, "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


# ---- the 400s ---------------------------------------------------------------------------------


def test_unknown_function_in_tool_choice_is_400_naming_tool_choice(url):
    choice = {"type": "function", "function": {"name": "nope"}}
    r = post(url, tools=TOOLS, tool_choice=choice)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("tool_choice", "invalid_value")
    assert "nope" in err["message"] and "get_weather" in err["message"]


def test_tool_choice_without_tools_is_400(url):
    r = post(url, tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_a_parameters_schema_that_is_not_a_schema_is_400(url):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]
    r = post(url, tools=bad)
    err = r.json()["error"]
    assert r.status_code == 400
    assert (err["param"], err["code"]) == ("tools.0.function.parameters", "invalid_schema")


# ---- tool turns in the prompt -----------------------------------------------------------------


def test_tool_calls_and_tool_results_are_rendered_into_the_prompt(url, engine):
    """An assistant turn with tool_calls (arguments as JSON text, as clients send them) and a
    tool result are accepted and rendered as the template's family writes them."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = post(url, messages=history, tools=TOOLS, tool_choice="none")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    ids = engine.encode(history, tools=TOOLS)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    text = engine.tokenizer.decode(ids)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert '<|im_start|>tool\n{"temperature": 21}' in text


# ---- reading answers as calls (no model needed) -----------------------------------------------


def _result(text: str, reason: str = "stop") -> GenerationResult:
    return GenerationResult(text, [], reason, 3, 5)


class FakeHandle:
    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def __iter__(self):
        yield from self.pieces

    def result(self, timeout=None):
        return _result("".join(self.pieces))

    def cancel(self):
        pass


PLAN = ToolPlan(TOOLS, JSON_STYLE, parse=True)
GOOD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'


@pytest.mark.parametrize(
    ("text", "called"),
    [
        (GOOD, True),
        ('{"name": "add", "arguments": {"a": 1}}', False),  # misses a required argument
        ('{"name": "add", "arguments": {"a": "one", "b": 2}}', False),  # wrong type
        ('{"name": "sub", "arguments": {"a": 1, "b": 2}}', False),  # unknown function
        ('{"name": "add", "arguments": {"a": 1, "b": 2}', False),  # cut short
        ("The answer is 3.", False),
    ],
)
def test_only_a_valid_call_becomes_tool_calls(text, called):
    message, finish = chat_message(PLAN, _result(text))
    if called:
        assert finish == "tool_calls" and message["content"] is None
        (call,) = message["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] == "add"
        assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    else:
        assert message == {"role": "assistant", "content": text} and finish == "stop"


def test_stream_holds_back_a_call_and_sends_it_as_delta_tool_calls():
    stream = ToolCallStream(FakeHandle([GOOD[:10], GOOD[10:30], GOOD[30:]]), PLAN)
    out = list(stream)
    assert all(isinstance(d, dict) for d in out)  # no piece of the JSON leaked as content
    first = out[0]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_")
    assert first["function"] == {"name": "add", "arguments": ""}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in out[1:])
    assert json.loads(args) == {"a": 1, "b": 2}
    assert stream.result().finish_reason == "tool_calls"


def test_stream_of_text_or_a_broken_call_is_content():
    assert "".join(ToolCallStream(FakeHandle(["Hello", " there"]), PLAN)) == "Hello there"
    broken = ['{"name": "add", ', '"arguments": {"a": 1}}']
    stream = ToolCallStream(FakeHandle(broken), PLAN)
    assert list(stream) == ["".join(broken)]
    assert stream.result().finish_reason == "stop"


def test_qwen_style_streams_the_text_before_the_call():
    plan = ToolPlan(TOOLS, QWEN, parse=True)
    call = f"<tool_call>\n{GOOD}\n</tool_call>"
    out = list(ToolCallStream(FakeHandle(["Let me add.\n<tool", "_call>" + call[11:]]), plan))
    assert out[0] == "Let me add.\n"
    assert out[1]["tool_calls"][0]["function"]["name"] == "add"


# ---- forced calls through the grammar, end to end ---------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def get_weather(city: str, unit: str) -> dict:
    return {"city": city, "temperature": 21 if unit == "celsius" else 70}


@needs_grammar
def test_openai_client_tool_loop(client, engine):
    """Request with tools -> the model's tool_calls -> a real Python function runs on the
    model's arguments -> its result goes back as a tool message -> the final answer."""
    functions = {"add": add, "get_weather": get_weather}
    messages = list(ASK)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=engine.base_name, messages=messages, tools=TOOLS, tool_choice=choice, max_tokens=60
    )
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Oslo") and args["unit"] in ("celsius", "fahrenheit")
    result = functions[call.function.name](**args)
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    final = client.chat.completions.create(
        model=engine.base_name, messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and result were sent


@needs_grammar
def test_required_call_streams_as_delta_tool_calls(client, engine):
    stream = client.chat.completions.create(
        model=engine.base_name,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        stream=True,
    )
    name, args, finish, ids = "", "", None, set()
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        assert not choice.delta.content  # a call is never leaked as text
        for tc in choice.delta.tool_calls or []:
            assert tc.index == 0
            ids.add(tc.id) if tc.id else None
            name += tc.function.name or ""
            args += tc.function.arguments or ""
    assert finish == "tool_calls" and len(ids) == 1
    assert name in ("get_weather", "add")
    json.loads(args)  # whole, valid JSON


@needs_grammar
def test_the_readme_example_client_runs_its_loop(url, engine, monkeypatch):
    """examples/tool_client.py against a live server: a forced first call, executed, answered."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import tool_client
    finally:
        sys.path.remove(str(EXAMPLES))
    monkeypatch.setattr(tool_client, "TOOLS", TOOLS[:1])  # enums: short forced arguments
    answer, calls = tool_client.run(
        ASK[0]["content"], f"{url}/v1", engine.base_name, tool_choice="required"
    )
    assert [c["name"] for c in calls] == ["get_weather"]
    assert calls[0]["result"]["city"] == calls[0]["arguments"]["city"]
    assert isinstance(answer, str)
