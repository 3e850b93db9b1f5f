"""`loraforge bench generate` runs end to end on the tiny model and writes sane JSON/Markdown."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from loraforge.cli import app


def test_bench_generate_tiny(tiny_model_dir, tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "docs" / "benchmarks.md"
    args = [
        "bench",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--adapters",
        "4",
        "--max-new-tokens",
        "6",
        "--streams",
        "3",
        "--repeats",
        "2",
        "--dtype",
        "float32",
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["max_new_tokens"] == 6 and data["dtype"] == "float32"
    for key in ("single", "batch"):
        fig = data[key]
        assert fig["engine_tokens"] > 0 and fig["hf_tokens"] > 0
        # greedy engine == greedy HF: the same number of tokens on the same prompts
        assert fig["engine_tokens"] == fig["hf_tokens"]
        assert fig["engine_tps"] > 0 and fig["hf_tps"] > 0 and fig["speedup"] > 0
        assert fig["repeats"] == 2 and len(fig["engine_tps_all"]) == 2
    assert data["batch"]["streams"] == 3
    sw = data["adapter_switch"]
    assert sw["adapters_loaded"] == 4
    assert 0 < sw["switch_p50_ms"] <= sw["switch_p95_ms"]
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "## generate" in text
    assert text.count(str(tiny_model_dir)) == 1
    CliRunner().invoke(app, args)
    assert md.read_text().count(str(tiny_model_dir)) == 2  # appended, header kept once
