"""`loraforge eval --tools`: the right function, the right arguments, no call where none is due."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.evaluate import eval_tools
from loraforge.infer.sampling import GenerationResult, SamplingParams

BUILTIN = Path(__file__).resolve().parent.parent / "src" / "loraforge" / "data" / "builtin"
TOOLS = [
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
    }
]


def conversation(a: int, b: int) -> dict:
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": f"{a}+{b}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": f"It is {a + b}."},
        ],
    }


class ScriptedEngine:
    """Answers each prompt from a script keyed by the prompt's last message."""

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.prompts: list[list[dict]] = []

    def prompt_template(self, adapter=None) -> str:
        return "{{ messages }}"  # no tool support: the json style

    def encode(self, messages, adapter=None, tools=None):
        assert tools == TOOLS  # the conversation's tools go into every prompt
        self.prompts.append(messages)
        return messages

    def generate(self, prompts, params, adapters=None):
        return [GenerationResult(self.script[p[-1]["content"]], [], "stop", 1, 1) for p in prompts]


def test_scores_function_arguments_and_no_call(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(conversation(*ab)) + "\n" for ab in [(1, 2), (3, 4)]))
    engine = ScriptedEngine(
        {
            "1+2?": '{"name": "add", "arguments": {"a": 1, "b": 2}}',  # right
            "3+4?": '{"name": "add", "arguments": {"a": 3, "b": 5}}',  # right function only
            "3": "It is 3.",  # a text answer after the tool result: right
            "7": '{"name": "add", "arguments": {"a": 3, "b": 4}}',  # a call where none was due
        }
    )
    r = eval_tools(engine, str(path), SamplingParams(temperature=0))
    assert (r.turns, r.call_turns, r.answer_turns) == (4, 2, 2)
    assert (r.right_function, r.right_arguments, r.no_call) == (1.0, 0.5, 0.5)
    # each turn is asked after the data's own history, not the model's earlier answers
    assert sorted(len(p) for p in engine.prompts) == [1, 1, 3, 3]


def test_cli_eval_tools_on_the_demo_held_out_set(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from loraforge.cli import app

    out = tmp_path / "r.json"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--tools",
        str(BUILTIN / "tools_demo_test.jsonl"),
    ]
    args += ["--max-new-tokens", "4", "--dtype", "float32", "--output", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())["tools"]
    assert report["call_turns"] == 16 and report["answer_turns"] == 20
    assert report["right_function"] == 0.0  # 4 random tokens are never a call
    assert "right function" in " ".join(res.output.split())
