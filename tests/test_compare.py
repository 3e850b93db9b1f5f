"""`loraforge compare`: columns are base and each adapter, same sampling and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_adapter

from loraforge.errors import UserError
from loraforge.infer.compare import column_names, questions_from, run_compare, write_output
from loraforge.infer.sampling import SamplingOptions

QUESTIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "你是谁？"}],
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, tokenizer) -> list[Path]:
    root = tmp_path_factory.mktemp("cmp")
    return [
        make_adapter(tiny_model_dir, root / "a" / "grace", 1),
        make_adapter(tiny_model_dir, root / "b" / "grace", 2),
    ]


def test_column_names():
    assert column_names(["runs/x/", "other/x", "base", "y"]) == ["x", "x-2", "base-2", "y"]


def test_columns_match_single_generations(adapters):
    from loraforge.infer.engine import Engine

    params = SamplingOptions(temperature=0.0, max_new_tokens=8).to_params()
    columns, rows = run_compare([str(a) for a in adapters], QUESTIONS, params, dtype="float32")
    assert columns == ["base", "grace", "grace-2"]
    assert [r["question"] for r in rows] == ["Who are you?", "你是谁？"]
    engine = Engine.from_adapter(str(adapters[0]), name="one", dtype="float32")
    try:
        engine.load_adapter("two", str(adapters[1]))
        for conv, row in zip(QUESTIONS, rows, strict=True):
            for col, name in (("base", None), ("grace", "one"), ("grace-2", "two")):
                (res,) = engine.generate([conv], params, adapters=name)
                assert row[col] == res.text
    finally:
        engine.close()
    # Adapters with different random weights answer differently from the base (the columns
    # really come from different weights).
    assert any(r["base"] != r["grace"] for r in rows)


def test_same_seed_same_table(adapters):
    params = SamplingOptions(temperature=1.0, top_k=50, max_new_tokens=8, seed=3).to_params()
    a = run_compare([str(adapters[0])], QUESTIONS, params, dtype="float32")
    b = run_compare([str(adapters[0])], QUESTIONS, params, dtype="float32")
    assert a == b


def test_outputs(tmp_path):
    rows = [{"question": "a|b", "base": "x\ny", "t": "z"}]
    write_output(["base", "t"], rows, tmp_path / "c.md")
    md = (tmp_path / "c.md").read_text().splitlines()
    assert md[0] == "| question | base | t |" and md[2] == "| a\\|b | x<br>y | z |"
    write_output(["base", "t"], rows, tmp_path / "c.jsonl")
    assert [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()] == rows
    with pytest.raises(UserError, match="jsonl or .md"):
        write_output(["base"], rows, tmp_path / "c.csv")


def test_questions_from_file_and_flags(tmp_path):
    src = tmp_path / "q.txt"
    src.write_text("one\ntwo\n")
    convs = questions_from(["zero"], str(src))
    assert [c[-1]["content"] for c in convs] == ["zero", "one", "two"]
    with pytest.raises(UserError, match="nothing to compare"):
        questions_from([], None)


def test_cli_compare(tmp_path, adapters):
    from typer.testing import CliRunner

    from loraforge.cli import app

    out = tmp_path / "cmp.jsonl"
    args = ["compare", "--adapter", str(adapters[0]), "--adapter", str(adapters[1])]
    args += ["-q", "Who are you?", "-q", "你是谁？", "--output", str(out)]
    args += ["--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(r) for r in rows] == [["question", "base", "grace", "grace-2"]] * 2
    assert "grace-2" in res.output
