"""The config is the CLI: every SFTConfig field is a `sft` flag, and a YAML value and the same
value given as a flag make equal configs; the sampling flags come from SamplingOptions."""

from __future__ import annotations

import contextlib
import sys
import types
import typing
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.cli.options import cli_type, flag
from loraforge.config import SamplingOptions, SFTConfig, load_config

# each verb with its required flags
SAMPLING_VERBS = {
    "chat": ["chat"],
    "infer": ["infer", "--input", "q.txt", "--output", "a.jsonl"],
    "compare": ["compare", "--adapter", "runs/a"],
    "eval": ["eval"],
    "data distill": ["data", "distill", "--output", "x.jsonl"],
}


def command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def flags_of(*path: str) -> dict[str, object]:
    """Each flag of a verb (and its --no- form) -> its click parameter."""
    return {o: p for p in command(*path).params for o in (*p.opts, *p.secondary_opts)}


def test_every_sft_field_is_a_flag_with_its_help():
    flags = flags_of("sft")
    for name, field in SFTConfig.model_fields.items():
        assert flag(name) in flags, name
        assert field.description and flags[flag(name)].help == field.description, name
        if cli_type(field.annotation) is bool:
            assert "--no-" + flag(name)[2:] in flags, name
    assert {"--config", "--resume-from"} <= flags.keys()
    res = CliRunner().invoke(app, ["sft", "--help"], env={"COLUMNS": "300"})
    for name, field in SFTConfig.model_fields.items():
        assert flag(name) in res.output and field.description in res.output, name


def sample_value(name: str) -> tuple[object, list[str]]:
    """A value unlike the default for a field: (as YAML writes it, as flags write it)."""
    field = SFTConfig.model_fields[name]
    default = field.get_default(call_default_factory=True)
    kind = cli_type(field.annotation)
    if kind is bool:
        return (not default), [flag(name) if not default else "--no-" + flag(name)[2:]]
    if typing.get_origin(kind) is typing.Literal:
        value = [c for c in typing.get_args(kind) if c != default][-1]
    elif typing.get_origin(kind) is list:
        value = ["a.jsonl", "b.jsonl#5"]
        return value, [arg for v in value for arg in (flag(name), v)]
    elif kind is int:
        value = (default or 6) + 1
    elif kind is float:
        value = round(default + 0.1, 6)
    else:  # str, Path
        value = f"{name}-x"
    return (str(value) if isinstance(value, Path) else value), [flag(name), str(value)]


SPECIAL = {  # fields whose YAML form differs from their flags' form
    "target_modules": (["q_proj", "v_proj"], ["--target-modules", "q_proj,v_proj"]),
    "resume": ("runs/x/step-000010", ["--resume-from", "runs/x/step-000010"]),
}


@pytest.fixture
def sft_config(monkeypatch):
    """Run `loraforge sft ARGS` up to the config it would train with; return that config."""
    seen: list[SFTConfig] = []
    fake = types.ModuleType("loraforge.train.recipe")
    fake.run_sft = seen.append  # the verb imports run_sft from here after building the config
    monkeypatch.setitem(sys.modules, "loraforge.train.recipe", fake)

    def run(args: list[str]) -> SFTConfig:
        res = CliRunner().invoke(app, ["sft", *args])
        assert res.exit_code == 0, res.output
        return seen.pop()

    return run


@pytest.mark.parametrize("name", list(SFTConfig.model_fields))
def test_yaml_equals_flags(name, tmp_path, sft_config):
    yaml_value, args = SPECIAL.get(name) or sample_value(name)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({name: yaml_value}))
    from_yaml = load_config(config)
    assert getattr(from_yaml, name) != getattr(SFTConfig(), name)  # the value is not the default
    assert sft_config(args) == from_yaml
    assert sft_config(["--config", str(config)]) == from_yaml  # flags not given change nothing


def test_resume_switch(sft_config):
    assert sft_config(["--resume"]).resume is True
    assert sft_config([]).resume is False


@pytest.mark.parametrize("verb", SAMPLING_VERBS)
def test_sampling_verbs_take_every_sampling_option(verb):
    flags = flags_of(*verb.split())
    for name, field in SamplingOptions.model_fields.items():
        assert flags[flag(name)].help == field.description, (verb, name)


class FakeEngine(contextlib.nullcontext):
    pass


@pytest.mark.parametrize(
    ("verb", "want"),
    [
        (["chat", "-q", "hi"], SamplingOptions()),
        (["data", "distill", "--output", "x.jsonl"], SamplingOptions(
            temperature=0.3, max_new_tokens=384, seed=0)),
        (["eval", "--expect-name", "Grace"], SamplingOptions(temperature=0.0, max_new_tokens=128)),
        (["compare", "--adapter", "a", "-q", "hi"], SamplingOptions(seed=0)),
        (["compare", "--adapter", "a", "-q", "hi", "--seed", "5", "--top-k", "3"],
         SamplingOptions(seed=5, top_k=3)),
    ],
)  # fmt: skip
def test_per_verb_sampling_defaults(verb, want, monkeypatch):
    """Each verb hands its module the SamplingParams of its own defaults plus the flags given."""
    import loraforge.data.distill
    import loraforge.evaluate
    import loraforge.infer.chat
    import loraforge.infer.compare
    import loraforge.infer.engine

    seen = []

    def capture(result):
        def fake(*args, **kwargs):
            seen.append(next(a for a in args if type(a).__name__ == "SamplingParams"))
            return result

        return fake

    stats = types.SimpleNamespace(written=0, questions=0, truncated=0, empty=0)
    identity = loraforge.evaluate.IdentityResult("Grace", questions=1, hit_rate=1, eos_rate=1)
    monkeypatch.setattr(loraforge.infer.engine, "open_engine", lambda *a: (FakeEngine(), None))
    monkeypatch.setattr(loraforge.infer.chat, "ChatSession", capture(None))
    monkeypatch.setattr(loraforge.infer.chat, "one_shot", lambda *a: None)
    monkeypatch.setattr(loraforge.data.distill, "distill", capture(stats))
    monkeypatch.setattr(loraforge.evaluate, "eval_identity", capture(identity))
    monkeypatch.setattr(loraforge.infer.compare, "run_compare", capture((["base"], [])))
    res = CliRunner().invoke(app, verb)
    assert res.exit_code == 0, res.output
    assert seen == [want.to_params()]


@pytest.mark.parametrize("verb", SAMPLING_VERBS)
def test_bad_sampling_flag_is_one_line_on_every_verb(verb):
    res = CliRunner().invoke(app, [*SAMPLING_VERBS[verb], "--top-p", "0"])  # before any model
    assert res.exit_code == 1, res.output
    assert res.output == "error: --top-p 0.0: must be > 0\n"


def test_bench_writes_markdown_only_when_asked():
    for verb in ("generate", "train"):
        assert flags_of("bench", verb)["--markdown"].default is None
