"""Bad data: every problem is one line naming the file, the line and what is wrong."""

from __future__ import annotations

import json
import re

import pytest

from loraforge.data import DataError, DataReport, load_conversations
from loraforge.errors import UserError

GOOD = {"instruction": "Q", "output": "A"}

# (record line as written in a .jsonl file, what the problem line must say)
BAD_LINES = [
    ('{"instruction": "Q", "output": ', r"malformed JSON"),
    ('{"messages": [{"role": "user", "content": "Q"}]}', r"no assistant turn \(roles: user\)"),
    (
        '{"messages": [{"role": "bot", "content": "Q"}]}',
        r"messages\[0\]: unknown role 'bot'",
    ),
    (
        '{"conversations": [{"from": "alien", "value": "Q"}]}',
        r"conversations\[0\]: unknown role 'alien'",
    ),
    ('{"instruction": "Q", "output": "  "}', r"empty content in turn 2 \(assistant\)"),
    ('{"prompt": "Q", "completion": "A"}', r"unknown format.*keys seen: completion, prompt"),
    ('{"instruction": "Q"}', r"missing field 'output'"),
    ('{"query": "Q", "response": ["A"]}', r"field 'response' is a list, expected text"),
    ('{"instruction": "Q", "output": "A", "history": [["only one"]]}', r"history\[0\] is not"),
    ('["Q", "A"]', r"record is a list, expected an object"),
    (
        '{"conversations": [{"from": "human", "value": "Q"}], "chosen": {}, "rejected": {}}',
        "preference",
    ),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_each_problem_is_one_line_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    report = DataReport()
    convs = load_conversations([str(path)], report=report)
    assert len(convs) == 2 and report.skipped == 1 and report.loaded == 2
    [problem] = report.problems
    assert problem.startswith(f"{path}:2: ") and "\n" not in problem
    assert re.search(message, problem), problem
    with pytest.raises(DataError, match=rf"^{path}:2: "):
        load_conversations([str(path)], strict=True)


def test_strict_stops_at_the_first_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations([str(path)], strict=True)
    assert str(e.value).startswith(f"{path}:1: unknown format")
    assert isinstance(e.value, UserError)


def test_all_bad_is_a_clear_error_not_an_empty_list(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x"}\n{"text": "y"}\n{"text": "z"}\n')
    with pytest.raises(
        DataError, match=rf"no usable records in {path}: 3 problems, first: {path}:1: "
    ):
        load_conversations([str(path)])


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"instruction": "Q", "output": "A"},\n  {"instruction": "Q" "output": "A"}\n]'
    )
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON \(Expecting ',' delimiter"):
        load_conversations([str(path)])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("missing.jsonl", "dataset not found: missing.jsonl"),
        ("{dir}/notes.txt", "unsupported file type '.txt'"),
        ("{dir}/d.jsonl#0", "must be a positive record count"),
        ("{dir}/empty.jsonl", "empty.jsonl: no records"),
        ("{dir}/latin1.jsonl", r"latin1.jsonl: not UTF-8"),
    ],
)
def test_unusable_sources(tmp_path, spec, message):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin1.jsonl").write_bytes(
        '{"instruction": "café", "output": "A"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=message):
        load_conversations([spec.format(dir=tmp_path)])


def test_no_dataset_given():
    with pytest.raises(DataError, match="--dataset"):
        load_conversations([])
