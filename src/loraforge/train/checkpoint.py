"""Checkpoints: atomic, resumable, rotated.

A checkpoint is ``<output>/checkpoints/step-000040/``: a plain PEFT adapter dir (so it can be
chatted with or served as is) plus ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` and
``state.json`` (step, data position, best val loss, process count). A run of N processes
(DDP) adds ``rng-rank<r>.pt`` for ranks 1..N-1, so each one's dropout continues on resume.
It is written into a hidden temp dir and renamed into place only when complete, so a kill
during a save leaves the previous checkpoint usable; readers only consider dirs whose
``state.json`` exists.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraforge.errors import UserError
from loraforge.fsutil import atomic_dir

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """A --resume that has nothing usable to resume from."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches consumed: the data position
    tokens_seen: int = 0
    train_seconds: float = 0.0  # time in training steps (not eval/save), across resumes
    best_val_loss: float | None = None
    best_step: int | None = None
    world: int = 1  # processes (DDP): micro_step is per process, so a resume needs the same


# Fields that fix the data stream, the model's shape or the schedule: a resumed run with other
# values would silently continue a different run, so it is refused.
RESUME_FIXED = (
    "model", "dataset", "val_dataset", "val_split", "template", "system", "max_length",
    "model_name", "model_author", "lora_rank", "lora_alpha", "target_modules", "use_rslora",
    "use_dora", "lr_scheduler", "learning_rate", "warmup_ratio", "batch_size", "grad_accum",
    "epochs", "max_steps", "seed", "fast", "pack_length", "thinking", "think", "quantization",
)  # fmt: skip


def check_resume_config(saved: dict, current: dict, config_path: Path) -> None:
    """Refuse to resume when a RESUME_FIXED field differs from the run that made the
    checkpoints (``saved``: its config.yaml, both as ``SFTConfig.model_dump(mode="json")``)."""
    for key in RESUME_FIXED:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"--resume: {key} is {current.get(key)!r} but the checkpoints were trained "
                f"with {saved[key]!r} ({config_path}); use the same value or --overwrite"
            )


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), d)
        for d in root.iterdir()
        if (m := _NAME.match(d.name)) and (d / "state.json").is_file()
    ]
    return [d for _, d in sorted(found)]


def latest_checkpoint(output: Path) -> Path | None:
    dirs = checkpoint_dirs(output)
    return dirs[-1] if dirs else None


def resolve_resume(resume: bool | str, output: Path) -> Path | None:
    """``False`` -> None; ``True``/"auto" -> newest checkpoint in ``output`` (None if there is
    none yet: a first run with --resume just starts); a path -> that checkpoint."""
    if resume is False or resume in ("", "false", "no"):
        return None
    if resume is True or resume == "auto":
        return latest_checkpoint(output)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"--resume {path}: not a complete checkpoint (no state.json)")
    return path


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain numbers only, so that loading it
    needs no pickle (``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    return state


_rng_state = rng_state  # the name tests/test_untrusted_files.py uses


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _load(path: Path):
    """A checkpoint's .pt file without unpickling code: a checkpoint someone shared must not be
    able to run anything (``weights_only`` allows tensors, numbers, strings and containers)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal or damage is the same answer here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"--resume: {path} cannot be loaded safely ({first[:200]}); a checkpoint from an "
            "older loraforge or another tool is not resumed: start afresh with --overwrite"
        ) from None


def save_checkpoint(
    output: Path,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    write_extra=None,
    rng_states: list[dict] | None = None,
    weights: dict | None = None,
) -> Path:
    """Write checkpoint ``step-<state.step>`` atomically; ``write_extra(dir)`` adds files
    (loraforge.json) before the rename. ``rng_states``: every rank's ``rng_state()`` (DDP);
    None: this process's. ``weights``: the PEFT model's state dict gathered from all ranks
    (None: ``model``'s own)."""
    rng_states = rng_states or [rng_state()]
    final = Path(output) / CKPT_DIR / f"step-{state.step:06d}"
    # A re-save of the same step (after a resume) swaps the new dir in atomically (fsutil).
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, **({} if weights is None else {"state_dict": weights}))
        if write_extra is not None:
            write_extra(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states[0], tmp / "rng.pt")
        for rank, rng in enumerate(rng_states[1:], 1):
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and ``rank``'s RNG from ``path``; return
    its state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(_load(path / "optimizer.pt"))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    rng = path / f"rng-rank{rank}.pt"
    _set_rng_state(_load(rng if rank > 0 and rng.is_file() else path / "rng.pt"))
    raw = json.loads((path / "state.json").read_text())
    return TrainState(**{k: v for k, v in raw.items() if k in TrainState.__dataclass_fields__})


def rotate_checkpoints(output: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, always keeping the best one; also
    clear temp dirs that a killed save left behind (only one process saves at a time)."""
    dirs = checkpoint_dirs(output)
    keep = set(dirs[-keep_last:])
    if best_step is not None:
        keep |= {d for d in dirs if d.name == f"step-{best_step:06d}"}
    for d in dirs:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)
    root = Path(output) / CKPT_DIR
    for d in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a save that was killed
        shutil.rmtree(d, ignore_errors=True)
