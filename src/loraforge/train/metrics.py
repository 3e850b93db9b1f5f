"""Metrics: ``metrics.jsonl`` + TensorBoard events + ``loss.png``, the rich progress bar, and the
step counters (``StepFigures``, ``Throughput``) they are fed from.

On resume the log is cut back to the checkpoint's step (lines a killed run wrote after its last
checkpoint would repeat), and TensorBoard is told to purge events after that step, so both
curves continue as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loraforge.console import console

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, output: Path, start_step: int = 0):
        self.path = Path(output) / METRICS_FILE
        kept = []
        if start_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is gone too
        self.path.write_text("".join(line + "\n" for line in kept))
        self._fh = open(self.path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(Path(output) / "tb"), purge_step=start_step + 1 if start_step else None
            )
        except ImportError:  # tensorboard is optional at run time
            pass

    def log(self, step: int, **values: float) -> None:
        self._fh.write(json.dumps({"step": step, **values}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k.replace("_", "/", 1), v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output: Path) -> list[dict]:
    path = Path(output) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(output: Path) -> Path | None:
    """``loss.png``: train loss per logged step and val loss per eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(output)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def progress_bar(disable: bool = False, title: str = "sft") -> Progress:
    """step/total, loss, learning rate, tokens/s, the task's ``extra`` field (dpo: reward margin
    and accuracy), elapsed and ETA."""
    return Progress(
        TextColumn(f"[bold]{title}[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


def fmt_loss(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"


@dataclass
class StepFigures:
    """What one optimizer step did."""

    loss: float  # the global batch's: micro-batch token-mean losses, ranks weighted by tokens
    tokens: int  # real (non-pad) tokens, all processes
    seconds: float
    lr: float  # the learning rate this step used
    grad_norm: float | None  # before clipping; None when clipping is off


@dataclass
class Throughput:
    """Step counters: the logging window (mean loss, tokens/s since the last logged line) and
    this process's run (a resume starts afresh). Step time only: no loading, eval, saving."""

    window_losses: list[float] = field(default_factory=list)
    window_tokens: int = 0
    window_seconds: float = 0.0
    run_tokens: int = 0
    run_seconds: float = 0.0

    def add(self, step: StepFigures) -> None:
        self.window_losses.append(step.loss)
        self.window_tokens += step.tokens
        self.window_seconds += step.seconds
        self.run_tokens += step.tokens
        self.run_seconds += step.seconds

    @property
    def window_loss(self) -> float:
        return sum(self.window_losses) / len(self.window_losses)

    @property
    def window_tokens_per_s(self) -> float:
        return self.window_tokens / max(self.window_seconds, 1e-9)

    def reset_window(self) -> None:
        self.window_losses, self.window_tokens, self.window_seconds = [], 0, 0.0
