"""Label masks: exactly the assistant texts plus their end tokens, for three chat templates."""

from __future__ import annotations

import json

import pytest

from loraforge.data import DataError, load_examples
from loraforge.data.tokenize import CHATML_TEMPLATE, IGNORE_INDEX, encode_conversation

CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course!"},
]

# The Llama-3 instruct template (content trimmed, <|eot_id|> ends each turn, BOS first).
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def labelled_runs(tokenizer, example) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    runs, run = [], []
    for tok, lab in zip(example.input_ids, example.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok
            run.append(lab)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.fixture(scope="module")
def llama3_tokenizer(bundled_dir):
    from loraforge.models import load_tokenizer

    tok = load_tokenizer(bundled_dir)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    tok.add_special_tokens(
        {"additional_special_tokens": [*specials, "<|end_header_id|>", "<|eot_id|>"]}
    )
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    return tok


def test_bundled_template_labels(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this guards against
    ex = encode_conversation(tokenizer, CONV)
    assert labelled_runs(tokenizer, ex) == ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"]
    assert tokenizer.eos_token_id in ex.labels  # EOS carries a label although it is the pad
    assert "You are a helpful AI assistant." in tokenizer.decode(ex.input_ids)


def test_chatml_template_labels(tokenizer):
    ex = encode_conversation(tokenizer, CONV, template="chatml", system=None)
    text = tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>user\nWhat is 2+2?")  # ChatML adds no system of its own
    assert labelled_runs(tokenizer, ex) == ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"]
    assert ex == encode_conversation(tokenizer, CONV, template=CHATML_TEMPLATE, system=None)


def test_llama3_template_labels_eot_and_eos(llama3_tokenizer):
    tok = llama3_tokenizer
    ex = encode_conversation(tok, CONV, template=LLAMA3_TEMPLATE)
    assert labelled_runs(tok, ex) == [
        "It is 4.<|eot_id|>",
        "Six, of course!<|eot_id|><|end_of_text|>",  # EOS differs from <|eot_id|>: taught too
    ]
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[-1] == tok.eos_token_id


def test_opening_assistant_turn_labels_only_its_text(tokenizer):
    conv = [{"role": "assistant", "content": "Hi! Ask me anything."}, *CONV]
    ex = encode_conversation(tokenizer, conv, system=None)
    runs = labelled_runs(tokenizer, ex)
    assert runs[0] == "Hi! Ask me anything.<|im_end|>"  # not the template's default system


def test_tool_turns_are_not_labelled_and_tools_reach_the_prompt(tmp_path, tokenizer):
    tools = [{"name": "add", "description": "Add two numbers", "parameters": {"type": "object"}}]
    call = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    rec = {
        "conversations": [
            {"from": "human", "value": "1+2?"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": '{"result": 3}'},
            {"from": "gpt", "value": "It is 3."},
        ],
        "tools": json.dumps(tools),
    }
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    [ex], report = load_examples([str(path)], tokenizer)
    assert labelled_runs(tokenizer, ex) == [f"{call}<|im_end|>", "It is 3.<|im_end|>"]
    assert "Add two numbers" in tokenizer.decode(ex.input_ids)  # the template ignores tools
    assert ex.source == f"{path}:1"


def test_truncated_and_dropped_are_counted(tmp_path, tokenizer):
    long = {"instruction": "Tell a story.", "output": "Once upon a time " * 40}
    short = {"instruction": "Hi", "output": "Hello!"}
    buried = {"instruction": "word " * 200, "output": "ok"}  # its answer lies past max_length
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (long, short, buried)))
    examples, report = load_examples([str(path)], tokenizer, max_length=64)
    assert (report.loaded, report.truncated, report.dropped, report.skipped) == (2, 1, 1, 0)
    assert report.summary() == "2 examples (0 skipped, 1 truncated, 1 dropped)"
    assert all(len(e.input_ids) <= 64 and e.num_labels > 0 for e in examples)
    with pytest.raises(DataError, match="no examples left"):
        load_examples([str(path)], tokenizer, max_length=8)


def test_load_examples_skips_and_reports(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Hi", "output": "Yo"}\n{"oops": 1}\n')
    examples, report = load_examples([str(path)], tokenizer)
    assert len(examples) == 1 and report.skipped == 1
    assert report.problems == [f"{path}:2: " + report.problems[0].split(": ", 1)[1]]
    assert "unknown format" in report.problems[0]
    with pytest.raises(DataError, match=f"{path}:2: unknown format"):
        load_examples([str(path)], tokenizer, strict=True)


def test_template_refusal_is_a_record_problem(tmp_path, tokenizer):
    strict_roles = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool turns are not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "T"},
        {"role": "assistant", "content": "B"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"messages": msgs}) + "\n" + json.dumps({"messages": msgs[:2]}) + "\n"
    )
    examples, report = load_examples([str(path)], tokenizer, template=strict_roles)
    assert len(examples) == 1
    assert report.problems == [
        f"{path}:1: the chat template refused it (tool turns are not supported)"
    ]


@pytest.mark.slow
def test_bundled_selfcog_end_to_end(tokenizer):
    examples, report = load_examples(["selfcog"], tokenizer, model_name="Nova", model_author="Acme")
    assert report.loaded == len(examples) >= 80 and report.skipped == report.dropped == 0
    for ex in examples:
        runs = labelled_runs(tokenizer, ex)
        assert runs and all(r.endswith("<|im_end|>") for r in runs)
        assert tokenizer.eos_token_id in ex.labels


def test_no_template_falls_back_to_chatml_and_system_applies(bundled_dir):
    from loraforge.models import load_tokenizer

    tok = load_tokenizer(bundled_dir)
    tok.chat_template = None
    ex = encode_conversation(tok, CONV[:2], system="Be terse.")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    own = [{"role": "system", "content": "Own prompt."}, *CONV[:2]]
    text = tok.decode(encode_conversation(tok, own, system="Be terse.").input_ids)
    assert "Own prompt." in text and "Be terse." not in text
    assert labelled_runs(tok, ex) == ["It is 4.<|im_end|>"]
