"""Heavy optional parts stay optional: a data-only or training-only install never imports the
server or the web UI (``pip install loraforge`` without ``[serve,webui,tensorboard]``)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("gradio", "fastapi", "uvicorn", "tensorboard")

PROBE = """
import json, sys
from loraforge.cli import app
try:
    app(sys.argv[1:], prog_name="loraforge")
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""


def _modules(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


def test_data_doctor_imports_no_heavy_part():
    mods = _modules("data", "doctor", "examples/shop.jsonl")
    assert not mods & {*HEAVY, "torch", "transformers"}, mods & {*HEAVY, "torch", "transformers"}


def test_sft_imports_no_server_or_webui(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "hi", "response": "hello"}) + "\n")
    mods = _modules(
        "sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--max-steps", "1",
        "--output", str(tmp_path / "out"), "--val-split", "0",
    )  # fmt: skip
    assert "torch" in mods  # it did train
    assert not mods & {"gradio", "fastapi", "uvicorn"}


def test_a_missing_extra_is_one_line(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from loraforge.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a)
    )
    r = CliRunner().invoke(app, ["webui"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "error: this needs gradio, which is not installed: pip install 'loraforge[webui]'"
    )


def test_webui_password_check():
    from loraforge.webui.app import _password_check

    check = _password_check("s3cret")
    assert check("anyone", "s3cret") and not check("anyone", "s3cre") and not check("x", "")
