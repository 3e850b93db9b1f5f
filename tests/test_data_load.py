"""Records -> conversations: every format, sources, #N sampling, mixing, self-cognition."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from loraforge.data import Conversation, DataError, DataReport, load_conversations
from loraforge.data.selfcog import language, split_pair


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def only(path: Path, **kw) -> Conversation:
    convs = load_conversations([str(path)], **kw)
    assert len(convs) == 1
    return convs[0]


def roles(conv: Conversation) -> list[str]:
    return [m["role"] for m in conv.messages]


# --- formats -----------------------------------------------------------------------------


def test_alpaca_joins_input_and_trains_history(tmp_path):
    rec = {
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
        "system": "Be brief.",
        "history": [["hi", "hey"], ["2+2?", "4"]],
    }
    conv = only(write_jsonl(tmp_path / "a.jsonl", [rec]))
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert conv.source == f"{tmp_path / 'a.jsonl'}:1"


def test_alpaca_empty_input_adds_no_newline(tmp_path):
    conv = only(
        write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "input": "", "output": "Yo"}])
    )
    assert conv.messages[0] == {"role": "user", "content": "Hi"}


def test_messages_format(tmp_path):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "T"},
        {"role": "assistant", "content": "B"},
    ]
    conv = only(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    assert conv.messages == msgs


def test_sharegpt_tool_calls(tmp_path):
    tools = [{"name": "add", "description": "add", "parameters": {"type": "object"}}]
    rec = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "1+2?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "It is 3."},
        ],
        "tools": json.dumps(tools),  # glaive files keep tools as JSON text
    }
    conv = only(write_jsonl(tmp_path / "s.jsonl", [rec]))
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2]["tool_calls"][0]["function"] == {
        "name": "add",
        "arguments": {"a": 1, "b": 2},
    }
    assert conv.tools == tools


def test_query_response_with_history(tmp_path):
    rec = {"query": "Q2", "response": "A2", "system": "S", "history": [["Q1", "A1"]]}
    conv = only(write_jsonl(tmp_path / "q.jsonl", [rec]))
    assert roles(conv) == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conv.messages] == ["S", "Q1", "A1", "Q2", "A2"]


# --- sources -----------------------------------------------------------------------------


def test_json_list_records_know_their_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)], indent=2)
    )
    convs = load_conversations([str(path)])
    lines = {c.messages[0]["content"]: c.source for c in convs}
    assert lines == {"q0": f"{path}:2", "q1": f"{path}:6", "q2": f"{path}:10"}


def test_csv_with_json_history(tmp_path):
    path = tmp_path / "a.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output", "history"])
        w.writerow(["Q", "", "A", json.dumps([["h1", "h2"]])])
        w.writerow(["multi\nline", "x", "B", ""])
    convs = sorted(load_conversations([str(path)]), key=lambda c: c.source)
    assert [m["content"] for m in convs[0].messages] == ["h1", "h2", "Q", "A"]
    assert convs[0].source == f"{path}:2"
    assert convs[1].messages[0]["content"] == "multi\nline\nx"
    assert convs[1].source == f"{path}:3"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    table = pa.table({"query": ["Q1", "Q2"], "response": ["A1", "A2"], "system": [None, "S"]})
    pq.write_table(table, path)
    convs = sorted(load_conversations([str(path)]), key=lambda c: c.source)
    assert roles(convs[0]) == ["user", "assistant"]
    assert roles(convs[1]) == ["system", "user", "assistant"]
    assert convs[1].source == f"{path}#record 2"


def test_directory_mixes_formats(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"instruction": "I", "output": "O"}])
    (d / "b.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"},
                    ]
                }
            ]
        )
    )
    (d / "notes.txt").write_text("ignored")
    assert len(load_conversations([str(d)])) == 2


def _numbered(tmp_path: Path, name: str, n: int) -> Path:
    return write_jsonl(
        tmp_path / name, [{"query": f"{name}-{i}", "response": "r"} for i in range(n)]
    )


def _queries(convs) -> list[str]:
    return [c.messages[0]["content"] for c in convs]


def test_hash_n_samples_with_seed(tmp_path):
    path = _numbered(tmp_path, "a.jsonl", 20)
    first = _queries(load_conversations([f"{path}#5"], seed=1))
    assert len(first) == len(set(first)) == 5
    assert _queries(load_conversations([f"{path}#5"], seed=1)) == first
    others = {tuple(sorted(_queries(load_conversations([f"{path}#5"], seed=s)))) for s in range(5)}
    assert len(others) > 1


def test_hash_n_above_size_repeats_and_tops_up(tmp_path):
    path = _numbered(tmp_path, "a.jsonl", 4)
    counts = Counter(_queries(load_conversations([f"{path}#10"])))
    assert sum(counts.values()) == 10
    assert set(counts) == {f"a.jsonl-{i}" for i in range(4)}
    assert sorted(counts.values()) == [2, 2, 3, 3]


def test_several_datasets_are_mixed(tmp_path):
    a, b = _numbered(tmp_path, "a.jsonl", 10), _numbered(tmp_path, "b.jsonl", 10)
    qs = _queries(load_conversations([str(a), f"{b}#3"]))
    assert sum(q.startswith("a.jsonl") for q in qs) == 10
    assert sum(q.startswith("b.jsonl") for q in qs) == 3
    assert not all(q.startswith("a.jsonl") for q in qs[:10])  # shuffled, not concatenated


# --- self-cognition ----------------------------------------------------------------------


def test_placeholders_any_case_both_languages(tmp_path):
    recs = [
        {"instruction": "Who are you?", "output": "I am {{NAME}} by {{AUTHOR}}."},
        {"instruction": "你是谁？", "output": "我是{{name}}，由{{Author}}开发。"},
        {"instruction": "Name?", "output": "{{ name }}", "tag": "zh"},  # the tag wins
        {"instruction": "hi", "input": "", "output": "Hello, {{name}} here", "system": "{{NAME}}"},
    ]
    path = write_jsonl(tmp_path / "id.jsonl", recs)
    convs = load_conversations(
        [str(path)], model_name="喵星人Grace,Grace", model_author="喵厂,Meow Inc"
    )
    answers = {c.messages[-2]["content"]: c.messages for c in convs}
    assert answers["Who are you?"][-1]["content"] == "I am Grace by Meow Inc."
    assert answers["你是谁？"][-1]["content"] == "我是喵星人Grace，由喵厂开发。"
    assert answers["Name?"][-1]["content"] == "喵星人Grace"
    assert [m["content"] for m in answers["hi"]] == ["Grace", "hi", "Hello, Grace here"]


def test_single_value_serves_both_languages():
    assert split_pair("Nova") == {"zh": "Nova", "en": "Nova"}
    assert split_pair("喵星人Grace,Grace") == {"zh": "喵星人Grace", "en": "Grace"}
    assert split_pair("Acme, Inc.") == {"zh": "Acme, Inc.", "en": "Acme, Inc."}
    assert language(["Explain 北京 in English, please, with many words"]) == "en"
    assert language(["用Python写一个函数"]) == "zh"


def test_placeholder_without_model_name_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "id.jsonl", [{"instruction": "hi", "output": "I am {{NAME}}"}])
    with pytest.raises(DataError, match=r"id.jsonl:1: .*\{\{NAME\}\}.*--model-name"):
        load_conversations([str(path)])


def test_builtin_selfcog():
    report = DataReport()
    convs = load_conversations(
        ["selfcog"], model_name="小助,Helper", model_author="某团队,Some Team", report=report
    )
    assert len(convs) >= 80 and report.skipped == 0
    text = [m["content"] for c in convs for m in c.messages]
    assert not any("{{" in t for t in text)
    assert sum("Helper" in t for t in text) >= 35 and sum("小助" in t for t in text) >= 35
    assert len({c.messages[-2]["content"] for c in convs}) == len(convs)  # no repeated question
    assert len(load_conversations(["selfcog#10"], model_name="a", model_author="b")) == 10


def test_builtin_selfcog_needs_identity():
    with pytest.raises(DataError, match="--model-name and --model-author"):
        load_conversations(["selfcog"], model_name="only a name")


def test_one_line_json_uses_record_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}]))
    report = DataReport()
    load_conversations([str(path)], report=report)
    assert report.problems == [f"{path}#record 2: missing field 'output'"]


def test_messages_with_openai_tool_calls(tmp_path):
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    msgs = [
        {"role": "user", "content": "add 1"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "Done."},
    ]
    tools = [{"type": "function", "function": {"name": "add"}}]
    conv = only(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs, "tools": tools}]))
    assert conv.messages[1] == {  # one shape for every source of calls (loraforge/tools.py)
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": None, "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
        ],
    }
    assert conv.tools == tools
