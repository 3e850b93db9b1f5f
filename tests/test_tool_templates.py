"""Tool turns through each family's own chat template: what is trained, and train/serve agreement.

A call is an assistant turn (trained, with its end-of-turn token); a tool result is not. The
official templates with tool support (Qwen3, Llama-3.1, Mistral v0.3) get the tools and the
structured calls; SmolLM2's (no tool support) gets the tool list in the system prompt and the
call as one JSON object (loraforge/tools.py). Each is rendered with the bundled tokenizer plus
the family's special tokens, as in test_family_templates.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraforge.data import load_conversations
from loraforge.data.tokenize import IGNORE_INDEX, encode_conversation, prompt_ids
from loraforge.tools import LLAMA3, MISTRAL, QWEN, TOOLS_PROMPT, parse_calls, tool_style

TEMPLATES = Path(__file__).parent / "templates"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**CALL, "function": {**CALL["function"], "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    {"role": "assistant", "content": "It is 21 C in Paris."},
]
ARGS = '{"city": "Paris"}'

# name -> (template file or None for the tokenizer's own, special tokens, eos, bos, labelled runs)
FAMILIES = {
    "qwen3": (
        "qwen3.jinja",
        ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "<|im_end|>",
        None,
        [
            f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call><|im_end|>',
            "<think>\n\n</think>\n\nIt is 21 C in Paris.<|im_end|>",
        ],
    ),
    "llama31": (
        "llama31.jinja",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
        [
            f'{{"name": "get_weather", "parameters": {ARGS}}}<|eot_id|>',
            "It is 21 C in Paris.<|eot_id|>",
        ],
    ),
    "mistral": (
        "mistral.jinja",
        ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]"]
        + ["[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        "</s>",
        "<s>",
        None,  # the call carries a made-up 9-character id: checked in its own test
    ),
    "smollm2": (
        None,
        [],
        None,
        None,
        [
            f'{{"name": "get_weather", "arguments": {ARGS}}}<|im_end|>',
            "It is 21 C in Paris.<|im_end|>",
        ],
    ),
}


@pytest.fixture(scope="module")
def family(bundled_dir):
    made = {}

    def make(name: str):
        if name not in made:
            file, special, eos, bos, _ = FAMILIES[name]
            tok = AutoTokenizer.from_pretrained(bundled_dir)
            if special:
                extra = {"additional_special_tokens": special, "eos_token": eos}
                tok.add_special_tokens({**extra, **({"bos_token": bos} if bos else {})})
            made[name] = (tok, (TEMPLATES / file).read_text() if file else None)
        return made[name]

    return make


def _runs(tok, ex) -> list[str]:
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    runs += [cur] if cur else []
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n][4]])
def test_the_call_is_trained_and_the_tool_result_is_not(name, family):
    tok, template = family(name)
    ex = encode_conversation(tok, CONV, template=template, system="S", tools=TOOLS)
    assert _runs(tok, ex) == FAMILIES[name][4]
    assert not any('{"temp": 21}' in run for run in _runs(tok, ex))
    assert '{"temp": 21}' in tok.decode(ex.input_ids) or "temp" in tok.decode(ex.input_ids)


def test_mistral_call_is_trained_with_its_nine_character_id(family):
    tok, template = family("mistral")
    ex = encode_conversation(tok, CONV, template=template, system="S", tools=TOOLS)
    call, answer = _runs(tok, ex)
    assert call.startswith('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}')
    call_id = json.loads(call.removeprefix("[TOOL_CALLS] ").removesuffix("</s>"))[0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()
    assert f'"call_id": "{call_id}"' in tok.decode(ex.input_ids)  # the result answers that id
    assert answer == " It is 21 C in Paris.</s>"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_serving_prompt_is_the_training_prefix(name, family):
    """The prompt chat/serve render before the call, and before the final answer (after the
    tool result), is a token prefix of the training rendering, labels starting right there."""
    tok, template = family(name)
    ex = encode_conversation(tok, CONV, template=template, system="S", tools=TOOLS)
    for upto in (1, 3):
        prompt = prompt_ids(tok, CONV[:upto], template=template, system="S", tools=TOOLS)
        assert ex.input_ids[: len(prompt)] == prompt
        assert ex.labels[len(prompt)] != IGNORE_INDEX
        assert ex.labels[len(prompt) - 1] == IGNORE_INDEX


def test_smollm2_fallback_lists_the_tools_in_the_system_prompt(family):
    tok, template = family("smollm2")
    text = tok.decode(prompt_ids(tok, CONV[:1], template=template, system="S", tools=TOOLS))
    assert f"S\n\n{TOOLS_PROMPT}{json.dumps(TOOLS[0])}" in text
    # glaive's bare {name, ...} tools render exactly like OpenAI's, so a served request with
    # OpenAI tools sees the prompt the glaive-trained model saw
    bare = [TOOLS[0]["function"]]
    assert tok.decode(prompt_ids(tok, CONV[:1], system="S", tools=bare)) == text


@pytest.mark.parametrize(
    ("file", "style"),
    [("qwen3.jinja", QWEN), ("llama31.jinja", LLAMA3), ("mistral.jinja", MISTRAL)],
)
def test_each_family_reads_back_the_call_it_was_trained_to_write(file, style, family):
    """What the template renders as the call is what parse_calls reads (the server's side)."""
    name = {"qwen3.jinja": "qwen3", "llama31.jinja": "llama31", "mistral.jinja": "mistral"}[file]
    tok, template = family(name)
    assert tool_style(template) is style
    ex = encode_conversation(tok, CONV, template=template, system="S", tools=TOOLS)
    written = _runs(tok, ex)[0].rsplit("<", 1)[0] if style is not MISTRAL else _runs(tok, ex)[0]
    written = written.removesuffix("</s>")
    content, calls = parse_calls(style, written, TOOLS)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert content == ""


def test_sharegpt_function_call_and_openai_tool_calls_load_as_one_shape(tmp_path):
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": ' + ARGS},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 C."},
        ],
        "tools": json.dumps([TOOLS[0]["function"]]),
    }
    call = {**CALL, "function": {**CALL["function"], "arguments": ARGS}}  # JSON text, as OpenAI
    messages = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is 21 C."},
        ],
        "tools": TOOLS,
    }
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (sharegpt, messages)) + "\n")
    convs = sorted(load_conversations([str(path)]), key=lambda c: c.source)
    for conv in convs:
        fn = conv.messages[1]["tool_calls"][0]["function"]
        assert fn == {"name": "get_weather", "arguments": {"city": "Paris"}}
        assert conv.messages[2]["role"] == "tool"
