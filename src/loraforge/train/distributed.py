"""More than one process (DDP): start them (``--nproc``), and the few collectives `sft` needs.

`sft` runs as one DDP training under ``torchrun``, ``accelerate launch`` (``--multi_gpu``, or a
config file from examples/accelerate/) or ``--nproc N``, which re-launches itself through
``torch.distributed.run``. Rank r takes every world-th micro-batch (train/data.py), DDP
all-reduces the gradients, rank 0 alone prints and writes; the others wait at barriers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from loraforge.config import SFTConfig
from loraforge.cpu import guard
from loraforge.errors import UserError

# Set by torchrun, accelerate's launchers and MPI: a process that sees one is already launched.
LAUNCHER_VARS = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class LaunchError(UserError):
    """A multi-process launch that cannot work as asked."""


def under_launcher() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARS)


def check_launch() -> None:
    """Refuse the launch that silently trains alone: on a machine without CUDA, ``accelerate
    launch [--cpu] --num_processes N`` (no --multi_gpu) starts ONE process unless given
    ``--mpirun_hostfile`` (accelerate 1.16's CPU launcher for more is mpirun). That process has
    accelerate's ACCELERATE_USE_CPU and the MASTER_ADDR set for N > 1, but no world size."""
    from_accelerate = "ACCELERATE_USE_CPU" in os.environ  # its one-process launcher sets it
    if from_accelerate and "MASTER_ADDR" in os.environ and not under_launcher():
        raise LaunchError(
            "accelerate launch started one process for --num_processes N (without --multi_gpu "
            "its launcher here is mpirun: --mpirun_hostfile); use `accelerate launch "
            "--multi_gpu --num_processes N`, `torchrun --nproc_per_node N` or "
            "`loraforge sft --nproc N` (gloo on CPU)"
        )


def relaunch(cfg: SFTConfig, verb: str = "sft") -> int:
    """Run this `sft` (or ``verb``: dpo) as ``cfg.nproc`` processes through
    torch.distributed.run and wait: the resolved config goes to a temp YAML that every process
    reads. Returns the exit code."""
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    with tempfile.TemporaryDirectory(prefix="loraforge-nproc-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(cfg.to_yaml())
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(cfg.nproc), "-m", "loraforge.cli", verb,
            "--config", str(config),
        ]  # fmt: skip
        return subprocess.run(cmd, env=env).returncode


def sum_across(acc, *values: float) -> list[float]:
    """``values`` summed over all processes (one all-reduce); as they are with one process."""
    if acc.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def rank0_value(acc, value: Any) -> Any:
    """Rank 0's ``value`` on every process (pickled: small objects only)."""
    if acc.num_processes == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(acc, value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (pickled: small objects only)."""
    if acc.num_processes == 1:
        return [value]
    out: list[Any] = [None] * acc.num_processes
    torch.distributed.all_gather_object(out, value)
    return out


# No version range: whether the private method is there is the whole question (the probe).
STATE_RESET = guard.Patch(
    "accelerate state reset (AcceleratorState._reset_state)",
    "the state as it is: another sft in this process must keep the same precision",
    {},
)


def reset_accelerator_state() -> None:
    """Clear ``AcceleratorState``, a per-process singleton that refuses a second mixed-precision
    setting: without this, a second `run_sft` in one process (tests, the web UI) with another
    precision (fast, then --no-fast) fails in ``Accelerator()`` ("AcceleratorState has already
    been initialized"). The distributed part (PartialState) is kept. ``_reset_state`` is private
    accelerate API: if it goes, one warning says so and only such second runs fail."""
    from accelerate.state import AcceleratorState

    if guard.check(STATE_RESET, lambda: AcceleratorState._reset_state):
        AcceleratorState._reset_state()
