"""The Studio's settings (webui/settings.py) and data checks (webui/dataview.py), no browser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.config import ConfigError, SFTConfig
from loraforge.webui.dataview import diagnose, lengths_and_preview, save_upload
from loraforge.webui.settings import (
    ADVANCED_FIELDS,
    PRESETS,
    build_config,
    field_kind,
    form_value,
    sft_command,
)

SHOP = Path(__file__).resolve().parents[1] / "examples" / "shop.jsonl"


def cli_config(command: str, monkeypatch) -> SFTConfig:
    """The SFTConfig `loraforge sft` builds from a command line (training itself stubbed)."""
    import loraforge.train.recipe as recipe

    seen = []
    monkeypatch.setattr(recipe, "run_sft", lambda cfg: seen.append(cfg))
    args = shlex.split(command)
    assert args[:2] == ["loraforge", "sft"]
    r = CliRunner().invoke(app, args[1:])
    assert r.exit_code == 0, r.output
    return seen[0]


def test_the_shown_command_trains_the_same_config(monkeypatch, tmp_path):
    form = {
        "model": "smollm2-135m",
        "dataset": ["a b.jsonl", "selfcog#50"],  # a space and a #N survive the quoting
        "model_name": "Grace",
        "model_author": "MiaoTech",
        **PRESETS["domain knowledge"],
        "max_steps": 30,
        "target_modules": "q_proj,v_proj",
        "fast": False,  # a switch turned off: --no-fast
        "thinking": "true",  # an optional switch from its dropdown
        "quantization": "",  # "" is the default (None)
        "system": "You are Grace's helper.",
        "output": str(tmp_path / "run"),
    }
    cfg = build_config(form)
    assert cfg.lora_rank == 32 and cfg.fast is False and cfg.thinking is True
    assert cfg.quantization is None and cfg.target_modules == ["q_proj", "v_proj"]
    command = sft_command(cfg)
    assert "--no-fast" in command and "--lora-rank 32" in command
    assert cli_config(command, monkeypatch) == cfg
    assert sft_command(SFTConfig()) == "loraforge sft"  # defaults are not repeated


def test_a_bad_value_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match="--learning-rate: learning_rate: Input should be"):
        build_config({"learning_rate": -1.0})


def test_every_other_field_is_an_advanced_control():
    assert {"lora_dropout", "use_dora", "quantization", "eval_steps"} <= set(ADVANCED_FIELDS)
    assert "output" not in ADVANCED_FIELDS and "resume" not in ADVANCED_FIELDS
    assert field_kind("quantization") == ("choice", ["", "nf4", "fp4", "int8"])
    assert field_kind("use_dora") == ("bool", [])
    assert field_kind("thinking") == ("choice", ["", "true", "false"])
    assert form_value("target_modules") == "all-linear" and form_value("max_steps") is None
    for name in ADVANCED_FIELDS:  # every default shown round-trips to the field's default
        assert getattr(build_config({name: form_value(name)}), name) == getattr(SFTConfig(), name)


def test_the_doctor_names_bad_records_and_blocks_start(tmp_path):
    kept = save_upload(SHOP, tmp_path / "data")
    verdict = diagnose([str(kept)])
    assert not verdict.ok
    assert f"{kept}:5: no assistant turn" in verdict.text
    assert f"{kept}:7: messages[1]: unknown role 'robot'" in verdict.text
    assert not diagnose(["selfcog"]).ok  # needs a name and an author
    assert "needs a model name" in diagnose(["selfcog"]).text
    assert diagnose(["selfcog"], "Grace", "MiaoTech").ok


def test_preview_marks_exactly_the_trained_tokens(tiny_model_dir, tmp_path):
    from helpers import write_item_conversations

    data = write_item_conversations(tmp_path / "items.jsonl", n=8)
    assert diagnose([str(data)]).ok
    summary, html = lengths_and_preview([str(data)], str(tiny_model_dir), max_length=20)
    assert summary.startswith("**8 examples**") and "longer than --max-length 20" in summary
    assert html.count("<div class='example'>") == 3
    # the answer and its end-of-turn token are marked (HTML-escaped), the question is not
    assert "<mark class='trained'>item " in html and "nice&lt;|im_end|&gt;</mark>" in html
    marked = re.findall(r"<mark class='trained'>(.*?)</mark>", html, re.DOTALL)
    assert len(marked) == 3 and not any("what is item" in m for m in marked)
