"""`bench train` on the tiny model: both sides train the same tokens and report sane figures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.bench.train import TrainBenchSettings, bench_train, record
from loraforge.cli import app


def test_bench_train_both_sides(tiny_model_dir, tmp_path):
    s = TrainBenchSettings(model=str(tiny_model_dir), records=8, batch_size=4, max_length=128)
    r = bench_train(s, progress=lambda m: None)
    ours, base = r["loraforge"], r["baseline"]
    # same data, one epoch: both sides see exactly the same real tokens
    assert ours["tokens"] == base["tokens"] > 0
    for side in (ours, base):
        assert side["tokens_per_s"] > 0 and side["peak_rss_mb"] > 100
        assert 0 < side["final_loss"] < 20
    assert r["ratios"]["tokens_per_s"] == ours["tokens_per_s"] / base["tokens_per_s"]
    md = tmp_path / "benchmarks.md"
    record(r, tmp_path / "r.json", md)
    record(r, None, md)
    text = md.read_text()
    assert text.count("## train") == 1 and text.count(str(tiny_model_dir)) == 2
    assert json.loads((tmp_path / "r.json").read_text())["ratios"] == r["ratios"]


def test_bench_train_cli_one_side(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", "train", "--model", str(tiny_model_dir), "--records", "4", "--only",
            "loraforge", "--gradient-checkpointing", "--json", str(out),
            "--markdown", str(tmp_path / "b.md")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert "loraforge" in r and "baseline" not in r and "ratios" not in r
    assert r["settings"]["gradient_checkpointing"] is True
    assert not (tmp_path / "b.md").exists()  # a one-sided run has no ratios to log


def test_markdown_row_names_the_variant():
    from loraforge.bench.train import markdown_row

    side = {"tokens_per_s": 1.0, "peak_rss_mb": 1.0, "final_loss": 1.0}
    ratios = {"tokens_per_s": 1.0, "peak_rss": 1.0, "final_loss_rel_diff": 0.0}
    settings = {**TrainBenchSettings().__dict__, "gradient_checkpointing": True}
    r = {"machine": "m", "settings": settings, "loraforge": side, "baseline": side}
    assert "--gradient-checkpointing" in markdown_row({**r, "ratios": ratios})
    settings["gradient_checkpointing"] = False
    assert "--gradient" not in markdown_row({**r, "ratios": ratios})


def test_a_failed_side_is_one_line_naming_it(monkeypatch):
    """A side that dies raises BenchError (a UserError: one line), with the side and the
    subprocess's last error line, not a RuntimeError with a traceback."""
    from loraforge.bench import train as bench
    from loraforge.errors import UserError

    stderr = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no model\n\n'
    done = subprocess.CompletedProcess([], 1, stdout="loading...\n", stderr=stderr)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: done)
    with pytest.raises(bench.BenchError) as e:
        bench.run_side("baseline", TrainBenchSettings(), Path("."))
    assert isinstance(e.value, UserError)
    want = "bench train: the baseline run failed (exit code 1): ValueError: no model"
    assert str(e.value) == want
    silent = subprocess.CompletedProcess([], -9, stdout="", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: silent)
    with pytest.raises(bench.BenchError, match=r"loraforge run failed \(exit code -9\): no output"):
        bench.run_side("loraforge", TrainBenchSettings(), Path("."))
