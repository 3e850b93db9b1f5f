"""`loraforge bench generate --against`: servers side by side, through the same adapter.

The rows and the refusals need nothing installed; the end-to-end run serves a tiny random model
and adapter from loraforge's own server and, where llama-cpp-python is set up (`make test-gguf`
runs this file), from llama.cpp's server on an f16 GGUF plus a GGUF LoRA written by `export gguf`.
"""

from __future__ import annotations

import json

import pytest
from helpers import make_adapter
from typer.testing import CliRunner

from loraforge.bench.against import markdown_rows
from loraforge.cli import app
from loraforge.export import llamacpp


def test_rows_name_weights_skips_and_ratios():
    machine = {"cpu": "cpu", "cores": 2, "torch": "t", "loadavg": 1.0}
    sides = {"loraforge": {"one": 20.0, "many": 100.0}, "vllm": {"one": 10.0, "many": 150.0}}
    sides["llama.cpp"] = {"skipped": "llama.cpp: llama-cpp-python is not installed"}
    res = dict(model="m", adapter="/x/runs/grace", dtype="int4", streams=8, max_new_tokens=64)
    rows = markdown_rows({**res, "machine": machine, "sides": sides})
    assert (
        "| m + grace, 64 | loraforge (int4) | 20.0 (×1.00) | 100.0 (×1.00) (8 streams) |"
        in (rows[0])
    )
    assert "| vllm (bf16) | 10.0 (×0.50) | 150.0 (×1.50) (8 streams) |" in rows[1]
    assert "llama.cpp (f16 GGUF) | llama.cpp: llama-cpp-python is not installed" in rows[2]


def test_adapter_without_against_is_refused(tmp_path):
    r = CliRunner().invoke(app, ["bench", "generate", "--adapter", str(tmp_path)])
    assert r.exit_code != 0 and "--adapter goes with --against" in r.output


def test_adapter_for_another_base_is_one_line(tmp_path, tiny_model_dir, bundled_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", 0)
    args = ["bench", "generate", "--against", "llama.cpp", "--adapter", str(adapter)]
    r = CliRunner().invoke(app, [*args, "--model", str(bundled_dir)])
    assert r.exit_code == 1 and "was trained on" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_side_by_side_through_an_adapter(tmp_path, tiny_model_dir):
    """Both servers answer through the adapter; tokens/s are numbers and the Markdown row sets
    each against loraforge. Without llama-cpp-python the llama.cpp row says what to install."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "grace", 0)
    out, md = tmp_path / "against.json", tmp_path / "benchmarks.md"
    args = ["bench", "generate", "--against", "llama.cpp", "--adapter", str(adapter)]
    args += ["--max-new-tokens", "8", "--streams", "2", "--json", str(out), "--markdown", str(md)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["model"] == str(tiny_model_dir) and res["adapter"] == str(adapter)
    lf = res["sides"]["loraforge"]
    assert lf["one"] > 0 and lf["many"] > 0, lf
    cpp = res["sides"]["llama.cpp"]
    if llamacpp.runtime_installed() and (llamacpp.tools_dir() / "convert_hf_to_gguf.py").is_file():
        assert cpp.get("one", 0) > 0 and cpp["many"] > 0, cpp
    else:
        assert "llama.cpp:" in cpp["skipped"] and "install" in cpp["skipped"], cpp
    text = md.read_text()
    assert "## generate --against" in text and "+ grace, 8 | llama.cpp (f16 GGUF)" in text


@pytest.mark.skipif(llamacpp.runtime_installed(), reason="checks the refusal without llama.cpp")
def test_llama_cpp_missing_is_a_row(tmp_path, tiny_model_dir):
    from loraforge.bench.against import measure

    r = measure("llama.cpp", str(tiny_model_dir), None, None, 2, 4, 1)
    assert r == {
        "skipped": "llama.cpp: llama-cpp-python is not installed (`loraforge export gguf --setup`)"
    }
