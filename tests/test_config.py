"""The sft config: YAML and flags set the same fields, flags win, errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.config import ConfigError, SFTConfig, load_config, parse_target_modules


def test_defaults_follow_the_facts():
    c = SFTConfig()
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (8, 32, 0.05)
    assert c.target_modules == "all-linear"
    assert (c.learning_rate, c.batch_size, c.fast) == (2e-4, 4, True)


def test_yaml_then_flags_override(tmp_path: Path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "model: smollm2-135m\n"
        "dataset: [a.jsonl, selfcog]\n"
        "lora-rank: 16\n"
        "target_modules: [q_proj, v_proj]\n"
        "learning_rate: 1.0e-4\n"
        "fast: false\n"
    )
    c = load_config(f, lora_rank=4, seed=None, output="runs/x")
    assert c.lora_rank == 4  # the flag wins
    assert c.dataset == ["a.jsonl", "selfcog"]
    assert c.target_modules == ["q_proj", "v_proj"]
    assert c.learning_rate == 1e-4 and c.fast is False
    assert c.seed == 42  # a flag left at None does not override
    assert c.output == Path("runs/x")
    # the resolved config round-trips through YAML
    again = tmp_path / "again.yaml"
    again.write_text(c.to_yaml())
    assert load_config(again) == c


def test_target_modules_forms():
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules("o_proj") == ["o_proj"]
    assert parse_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"


def test_dataset_comma_list():
    assert load_config(dataset="a.jsonl,b.csv#10").dataset == ["a.jsonl", "b.csv#10"]


@pytest.mark.parametrize(
    ("text", "flags", "needle"),
    [
        ("lora_rankk: 8\n", {}, "run.yaml line 1: lora_rankk"),
        ("seed: 1\nlora-rank: -1\n", {}, "run.yaml line 2: lora_rank"),
        ("", {"lr_scheduler": "exp"}, "flag --lr-scheduler"),
        ("model: [unclosed\n", {}, "run.yaml line"),
        ("- a\n- b\n", {}, "mapping"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, text, flags, needle):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, **flags)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
