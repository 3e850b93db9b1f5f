"""`loraforge sft`: config file + flags, the artefacts, and an adapter plain PEFT loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loraforge.cli import app


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with path.open("w") as f:
        for k in range(24):
            rec = {"instruction": f"Name item {k}.", "input": "", "output": f"Item {k}."}
            f.write(json.dumps(rec) + "\n")
    return path


def _trainable_printed(stdout: str) -> int:
    m = re.search(r"trainable params: ([\d,]+) of", stdout)
    assert m, stdout
    return int(m.group(1).replace(",", ""))


def test_sft_config_file_flags_and_artefacts(tmp_path, tiny_model_dir, dataset):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.adapters import read_meta

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "dataset": [str(dataset)],
                "output": str(out),
                "max_steps": 2,
                "lora_rank": 2,
                "target_modules": "q_proj,v_proj",
                "use_rslora": True,
                "eval_steps": 1,
                "save_steps": 1,
                "val_split": 0.2,
                "system": "You are a test bot.",
            }
        )
    )
    r = CliRunner().invoke(app, ["sft", "--config", str(config), "--lora-rank", "4"])
    assert r.exit_code == 0, r.output

    for name in ("adapter_config.json", "adapter_model.safetensors", "loraforge.json"):
        assert (out / name).is_file(), name
        # readable as the umask allows (0o644 here), not safetensors' owner-only 0o600
        assert (out / name).stat().st_mode & 0o044 == 0o044 & ~_umask(), name
    assert (out / "loss.png").stat().st_size > 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lora_rank"] == 4 and resolved["use_rslora"] is True  # flag beat the file
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ppl" in r for r in rows) and any("train_tokens_per_s" in r for r in rows)

    meta = read_meta(out)
    assert meta.base_model == str(tiny_model_dir) and meta.system == "You are a test bot."
    assert "<|im_start|>" in meta.chat_template

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, out, is_trainable=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["use_rslora"] is True
    # the printed count is PEFT's own count for this LoRA setup
    assert _trainable_printed(r.output) == tuned.get_nb_trainable_parameters()[0]
    ids = torch.tensor([[1, 2, 3]])
    assert tuned(input_ids=ids).logits.shape[-1] == base.config.vocab_size

    # the same output dir again without --resume: one clear line, not a silent wipe
    again = CliRunner().invoke(app, ["sft", "--config", str(config)])
    assert again.exit_code == 1 and "--resume or --overwrite" in again.output


def test_bad_target_modules_is_one_line(tmp_path, tiny_model_dir, dataset):
    r = CliRunner().invoke(
        app,
        ["sft", "--model", str(tiny_model_dir), "--dataset", str(dataset),
         "--output", str(tmp_path / "x"), "--target-modules", "nope_proj", "--max-steps", "1"],
    )  # fmt: skip
    assert r.exit_code == 1
    assert "--target-modules" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_sft_selfcog_on_bundled_model(tmp_path):
    """The issue's command on the real model, shortened to a few steps."""
    from peft import PeftModel

    from loraforge.models import load_model

    out = tmp_path / "grace"
    r = CliRunner().invoke(
        app,
        ["sft", "--dataset", "selfcog", "--model-name", "Grace", "--model-author", "MiaoTech",
         "--output", str(out), "--max-steps", "3", "--eval-steps", "3", "--batch-size", "2"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "adapter:" in r.output and "examples" in r.output
    tuned = PeftModel.from_pretrained(load_model("smollm2-135m"), out, is_trainable=True)
    assert _trainable_printed(r.output) == tuned.get_nb_trainable_parameters()[0] > 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
