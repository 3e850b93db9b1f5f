"""What a user reads: bad records named as in `data doctor`, --strict, and clean lines."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from loraforge.cli import app


def _data(tmp_path):
    path = tmp_path / "shop.jsonl"
    good = {"query": "Do you ship abroad?", "response": "Yes, to 30 countries."}
    lines = [json.dumps(good)] * 3 + ['{"question": "x", "answer": "y"}', "{broken"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sft_names_each_skipped_record_and_strict_stops(tmp_path, tiny_model_dir):
    data = _data(tmp_path)
    args = ["sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--max-steps", "1"]
    args += ["--val-split", "0", "--output", str(tmp_path / "out")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"skipped {data}:4: unknown format" in r.output
    assert f"skipped {data}:5: malformed JSON" in r.output
    r = CliRunner().invoke(app, [*args, "--strict", "--overwrite"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith(f"error: {data}:4: unknown format")


def test_many_skipped_records_end_with_a_count_and_the_doctor(tmp_path):
    from loraforge.data import DataReport

    report = DataReport()
    for i in range(9):
        report.problem(f"f.jsonl:{i}: bad", strict=False)
    lines = report.problem_lines(["f.jsonl#100"])
    assert lines[:5] == [f"skipped f.jsonl:{i}: bad" for i in range(5)]
    assert lines[5] == "... 4 more skipped; to list them: loraforge data doctor --all f.jsonl"


def test_long_lines_are_not_cut(capsys):
    from loraforge.console import console

    text = "identity 'Grace': 92% of 24 answers name it (en 92%, zh 92%); 100% ended with EOS " * 3
    console.print(text)
    assert capsys.readouterr().out.count("\n") == 1


def test_a_verb_prints_no_library_noise(tmp_path, tiny_model_dir):
    """A real process, as a user starts it: no "Loading weights" bars, no FutureWarnings, no
    bitsandbytes kernel notice (PEFT imports bitsandbytes when the qlora extra is there)."""
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "Do you ship?", "response": "Yes."}) + "\n")
    cmd = [sys.executable, "-m", "loraforge.cli", "sft", "--model", str(tiny_model_dir)]
    cmd += ["--dataset", str(data), "--max-steps", "1", "--val-split", "0"]
    cmd += ["--output", str(tmp_path / "out")]  # sft imports peft, peft imports bitsandbytes
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for noise in ("Loading weights", "Warning", "kernels", "Traceback"):
        assert noise not in r.stdout + r.stderr, (noise, r.stdout, r.stderr)
