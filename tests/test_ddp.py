"""More than one process: `sft` as one DDP training over 2 CPU processes (gloo).

One 2-process run (``sft --nproc 2``, i.e. torch.distributed.run) is shared by the tests; the
resume test adds an ``accelerate launch --multi_gpu --num_processes 2`` run (accelerate's
torchrun path; on a machine without CUDA it is gloo on CPU). Every process gets one thread
(2 cores). Determinism: --no-fast (fp32, padded) and LoRA dropout 0, so 2 processes x batch 2
and 1 process x batch 4 compute the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_item_conversations

from loraforge.config import load_config
from loraforge.train import checkpoint as ckpt
from loraforge.train import distributed as ddp

# Max abs difference of the per-step train losses (and val losses) between 2 processes x
# batch 2 and 1 process x batch 4, measured here over 4 steps: 1.4e-6 (--no-fast, fp32).
# Without the token weighting across ranks (the ranks' mean losses averaged) it is 1.1e-2
# (train) and 1.1e-3 (val); the fast path (bf16 autocast, packing) measured 4e-5 train,
# 1.5e-4 val.
TOL = 1e-4
STEPS = 4
TIMEOUT = 300  # a loaded 2-core machine; an idle one runs each launch in ~20 s


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_item_conversations(tmp_path_factory.mktemp("ddp-data") / "train.jsonl")


def _args(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "--model", str(model), "--dataset", str(data), "--output", str(out),
        "--batch-size", str(batch_size), "--max-steps", str(STEPS), "--save-steps", "2",
        "--eval-steps", "2", "--logging-steps", "1", "--val-split", "0.1",
        "--learning-rate", "5e-3", "--lora-dropout", "0", "--no-fast",
    ]  # fmt: skip


def _run(cmd: list[str]) -> str:
    """Run a launch with one thread per process and no GPU; its stdout+stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
    env["PYTHONUNBUFFERED"] = "1"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    return out


def _losses(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if key in r]
    assert len(steps) == len(set(steps)), f"repeated steps in {key}: {steps}"
    return {r["step"]: r[key] for r in rows if key in r}


def _max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (a, b)
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, tiny_model_dir, dataset) -> tuple[Path, str]:
    """`loraforge sft --nproc 2` with batch 2: (output dir, what it printed)."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    cmd = [sys.executable, "-m", "loraforge.cli", "sft", "--nproc", "2"]
    return out, _run(cmd + _args(tiny_model_dir, dataset, out, batch_size=2))


def test_two_processes_match_one_with_twice_the_batch(two_proc, tiny_model_dir, dataset, tmp_path):
    from typer.testing import CliRunner

    from loraforge.cli import app

    two, printed = two_proc
    assert "x 2 proc" in printed, printed[-2000:]
    one = tmp_path / "one"  # the same flags, one process (this one), twice the batch
    done = CliRunner().invoke(app, ["sft", *_args(tiny_model_dir, dataset, one, batch_size=4)])
    assert done.exit_code == 0, done.output[-2000:]
    train_diff = _max_diff(_losses(one, "train_loss"), _losses(two, "train_loss"))
    val_diff = _max_diff(_losses(one, "val_loss"), _losses(two, "val_loss"))
    assert train_diff < TOL and val_diff < TOL, (train_diff, val_diff)


def test_only_rank0_writes_and_prints(two_proc):
    out, printed = two_proc
    lines = printed.splitlines()
    for want in ["steps: 4 (batch 2 x accum 1 x 2 proc", "adapter: ", "best val loss"]:
        assert sum(want in line for line in lines) == 1, (want, printed[-3000:])
    for step in range(1, STEPS + 1):
        assert sum(line.startswith(f"step {step}/{STEPS} ") for line in lines) == 1, step
    assert len(list(out.glob("adapter_model*.safetensors"))) == 1
    assert [d.name for d in ckpt.checkpoint_dirs(out)] == ["step-000002", "step-000004"]
    assert not list((out / ckpt.CKPT_DIR).glob(".*")), "a temp dir was left behind"
    last = out / ckpt.CKPT_DIR / "step-000004"
    assert (last / "rng.pt").is_file() and (last / "rng-rank1.pt").is_file()
    assert json.loads((last / "state.json").read_text())["world"] == 2
    assert sorted(_losses(out, "train_loss")) == list(range(1, STEPS + 1))  # each step once
    assert len(list((out / "tb").glob("events.*"))) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_under_two_processes_ends_at_the_same_loss(
    two_proc, tiny_model_dir, dataset, tmp_path
):
    full, _ = two_proc
    out = tmp_path / "resumed"
    shutil.copytree(full, out)  # as if killed after step 2's checkpoint
    shutil.rmtree(out / ckpt.CKPT_DIR / "step-000004")
    for f in out.glob("adapter_model*.safetensors"):
        f.unlink()
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_free_port()), "-m", "loraforge.cli", "sft",
        *_args(tiny_model_dir, dataset, out, batch_size=2), "--resume",
    ]  # fmt: skip
    printed = _run(cmd)
    assert sum("at step 2" in line for line in printed.splitlines()) == 1, printed[-3000:]
    assert "x 2 proc" in printed
    resumed, whole = _losses(out, "train_loss"), _losses(full, "train_loss")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert abs(resumed[STEPS] - whole[STEPS]) < TOL, (resumed, whole)
    assert _max_diff(resumed, whole) < TOL


def test_resume_with_another_process_count_is_refused(two_proc, tmp_path):
    from loraforge.train.recipe import run_sft

    out = tmp_path / "copy"
    shutil.copytree(two_proc[0], out)
    cfg = load_config(out / "config.yaml", output=out, resume=True, nproc=1)
    with pytest.raises(ckpt.CheckpointError, match="2 process"):
        run_sft(cfg)


def test_each_rank_resumes_its_own_rng(tiny_model_dir, tmp_path):
    """Dropout draws differ per rank (batch shapes differ), so each rank's RNG is saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    torch.manual_seed(1)
    rank0 = ckpt.rng_state()
    torch.rand(100)
    rank1 = ckpt.rng_state()
    state = ckpt.TrainState(step=2, world=2)
    path = ckpt.save_checkpoint(tmp_path, model, opt, sched, state, rng_states=[rank0, rank1])
    draws = {}
    for rank in (0, 1):
        torch.manual_seed(99)
        assert ckpt.load_checkpoint(path, model, opt, sched, rank=rank).world == 2
        draws[rank] = torch.rand(4)
    torch.set_rng_state(rank1["torch"])
    assert torch.equal(draws[1], torch.rand(4))
    torch.set_rng_state(rank0["torch"])
    assert torch.equal(draws[0], torch.rand(4))


def test_accelerate_cpu_launch_of_n_processes_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (mpirun is its CPU
    launcher): that process must say so, not train alone as '1 proc'."""
    for var in ddp.LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # --cpu; "False" without
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ddp.LaunchError, match="--multi_gpu"):
        ddp.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun / mpirun: fine
    ddp.check_launch()
