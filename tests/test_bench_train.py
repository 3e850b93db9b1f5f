"""`bench train` on the tiny model: both sides train the same tokens and report sane figures."""

from __future__ import annotations

import json

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
