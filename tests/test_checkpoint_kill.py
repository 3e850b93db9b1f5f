"""kill -9 at random points of checkpoint saving: --resume always finds a complete checkpoint
and loses at most one save interval."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from loraforge.train import checkpoint as ckpt

# The real CLI with torch.save slowed down, so that kills land inside saves as often as not.
RUNNER = """
import sys, time, torch
delay = float(sys.argv[1])
_save = torch.save
def slow_save(*a, **k):
    time.sleep(delay)
    return _save(*a, **k)
torch.save = slow_save
torch.set_num_threads(1)
from loraforge.cli import app
app(sys.argv[2:], prog_name="loraforge")
"""
FILES = ("adapter_model.safetensors", "adapter_config.json", "loraforge.json", "optimizer.pt")
FILES += ("scheduler.pt", "rng.pt", "state.json")
STEPS, SAVE_EVERY = 16, 2


def _cmd(runner: Path, delay: float, model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(runner), str(delay), "sft", "--model", str(model),
        "--dataset", str(data), "--output", str(out), "--max-steps", str(STEPS),
        "--save-steps", str(SAVE_EVERY), "--logging-steps", "1", "--val-split", "0",
        "--save-total-limit", "2", "--resume",
    ]  # fmt: skip


def _complete(d: Path) -> None:
    for name in FILES:
        assert (d / name).is_file(), f"{d} lacks {name}"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(d / name, weights_only=True)
    assert json.loads((d / "state.json").read_text())["step"] == int(d.name.split("-")[1])


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line cut by the kill
    return steps


def test_kill_during_saves_never_leaves_a_broken_checkpoint(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    with data.open("w") as f:
        for k in range(24):
            msgs = [
                {"role": "user", "content": f"item {k}?"},
                {"role": "assistant", "content": "ok"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        before = ckpt.latest_checkpoint(out)
        proc = subprocess.Popen(
            _cmd(runner, 0.15, tiny_model_dir, data, out),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:  # wait for training
                if ckpt.latest_checkpoint(out) != before:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.2))  # then kill anywhere: mid-save or between saves
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        latest = ckpt.latest_checkpoint(out)
        assert latest is not None
        for d in ckpt.checkpoint_dirs(out):
            _complete(d)
        # at most one save interval lost: the newest checkpoint is within SAVE_EVERY steps of
        # the last step the killed run logged
        logged = _logged_steps(out)
        assert max(logged) - int(latest.name.split("-")[1]) <= SAVE_EVERY, (logged, latest)
    assert kills >= 2  # the loop really killed runs, not just watched them finish

    done = subprocess.run(
        _cmd(runner, 0.0, tiny_model_dir, data, out), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == list(range(1, STEPS + 1))  # every step once: the log was cut back on resume
    _complete(ckpt.latest_checkpoint(out))
