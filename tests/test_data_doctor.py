"""`loraforge data doctor`: formats counted, each problem a file:line line, exit 1 on problems."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from loraforge.cli import app


def run(*args: str):
    return CliRunner().invoke(app, ["data", "doctor", *args])


def test_doctor_reports_formats_and_problems(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"instruction": "Q", "output": "I am {{NAME}}"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
        )
        + "\n"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Q", "output": "A"}\n{nope\n{"text": "plain"}\n')
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "Q", "output": "A"},\n{"instruction": }]')

    result = run(str(good), str(bad), str(broken))
    assert result.exit_code == 1, result.output
    out = result.output
    assert f"{good}: 2 records (alpaca 1, messages 1)" in out
    assert "1 records have {{NAME}}/{{AUTHOR}} placeholders" in out
    assert f"{bad}: 3 records (alpaca 1)" in out
    assert f"  {bad}:2: malformed JSON" in out
    assert f"  {bad}:3: unknown format" in out and "keys seen: text" in out
    assert f"  {broken}:2: malformed JSON" in out
    assert out.strip().endswith("3 usable records in 3 files, 3 problems")


def test_doctor_clean_files_exit_0():
    result = run("selfcog")
    assert result.exit_code == 0, result.output
    assert "selfcog: 104 records (query_response 104)" in result.output


def test_doctor_caps_problem_lines(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": "x"}\n' * 30)
    result = run(str(path))
    assert result.exit_code == 1
    assert result.output.count("unknown format") == 20
    assert "... 10 more problems" in result.output
    assert run(str(path), "--all").output.count("unknown format") == 30
