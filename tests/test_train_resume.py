"""Checkpoints and resume: SIGKILL mid-run, then the same command continues the same curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_item_conversations

from loraforge.train import checkpoint as ckpt

# Runs the real CLI with every optimizer step slowed down, so the test can kill it mid-run.
RUNNER = """
import sys, time, torch
delay = float(sys.argv[1])
_step = torch.optim.AdamW.step
def slow_step(self, *a, **k):
    time.sleep(delay)
    return _step(self, *a, **k)
torch.optim.AdamW.step = slow_step
torch.set_num_threads(1)
from loraforge.cli import app
app(sys.argv[2:], prog_name="loraforge")
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_item_conversations(tmp_path_factory.mktemp("data") / "train.jsonl")


def _cmd(runner: Path, delay: float, model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(runner), str(delay), "sft",
        "--model", str(model), "--dataset", str(data), "--output", str(out),
        "--max-steps", "24", "--save-steps", "8", "--eval-steps", "8", "--logging-steps", "1",
        "--val-split", "0.1", "--learning-rate", "5e-3", "--resume",
    ]  # fmt: skip


def _losses(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if key in r]
    assert len(steps) == len(set(steps)), f"repeated steps in {key}: {steps}"
    return {r["step"]: r[key] for r in rows if key in r}


def test_sigkill_then_resume_continues_the_curve(tmp_path, tiny_model_dir, dataset):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    ref = tmp_path / "ref"
    done = subprocess.run(
        _cmd(runner, 0.0, tiny_model_dir, dataset, ref), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(runner, 0.25, tiny_model_dir, dataset, out),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        # kill once step-8 is saved and the run has logged a few steps past it
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            saved = (out / "checkpoints" / "step-000008" / "state.json").is_file()
            if saved and metrics.is_file() and metrics.read_text().count("train_loss") >= 11:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ckpt.latest_checkpoint(out).name in ("step-000008", "step-000016")
    assert max(_losses(out, "train_loss")) < 24

    again = subprocess.run(
        _cmd(runner, 0.0, tiny_model_dir, dataset, out), env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout

    want, got = _losses(ref, "train_loss"), _losses(out, "train_loss")
    assert sorted(got) == list(range(1, 25))  # every step exactly once, ending at 24
    for step in want:  # the same curve as the run that was never stopped
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    assert _losses(out, "val_loss") == pytest.approx(_losses(ref, "val_loss"), rel=1e-4)
    assert (
        json.loads((out / "checkpoints" / "step-000024" / "state.json").read_text())["step"] == 24
    )
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


class _Opt:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def state_dict(self):
        if self.fail:
            raise KeyboardInterrupt("killed during save")
        return {"x": 1}


class _Model:
    def save_pretrained(self, d):
        (Path(d) / "adapter_model.safetensors").write_bytes(b"w")
        (Path(d) / "adapter_config.json").write_text("{}")


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    sched = _Opt()
    first = ckpt.save_checkpoint(tmp_path, _Model(), _Opt(), sched, ckpt.TrainState(step=8))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, _Model(), _Opt(fail=True), sched, ckpt.TrainState(step=16))
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "checkpoints" / "step-000016").exists()
    # a step dir without state.json (not ours, or damaged) is never picked either
    (tmp_path / "checkpoints" / "step-000099").mkdir()
    assert ckpt.resolve_resume(True, tmp_path) == first
    assert torch.load(first / "optimizer.pt") == {"x": 1}


def test_rotation_keeps_last_k_and_best(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, _Model(), _Opt(), _Opt(), ckpt.TrainState(step=step))
    ckpt.rotate_checkpoints(tmp_path, keep_last=2, best_step=10)
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path)] == [
        "step-000010",
        "step-000030",
        "step-000040",
    ]


def test_resume_paths(tmp_path):
    assert ckpt.resolve_resume(False, tmp_path) is None
    assert ckpt.resolve_resume(True, tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_resume_with_another_data_stream_is_refused(tmp_path, tiny_model_dir, dataset):
    from loraforge.config import SFTConfig
    from loraforge.train.recipe import run_sft

    base = dict(model=str(tiny_model_dir), dataset=[str(dataset)], output=tmp_path / "run",
                max_steps=2, save_steps=1, val_split=0.0, lora_rank=2)  # fmt: skip
    run_sft(SFTConfig(**base))
    with pytest.raises(ckpt.CheckpointError, match=r"--resume: batch_size is 2 .* with 4"):
        run_sft(SFTConfig(**base, batch_size=2, resume=True))
    # the same settings resume (nothing left to do: it ends at the same step)
    out = run_sft(SFTConfig(**base, resume=True))
    assert (out / "adapter_model.safetensors").is_file()
