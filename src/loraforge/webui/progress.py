"""What a job's page shows, read from the files its run writes: ``metrics.jsonl`` (train/metrics.py:
loss, tokens/s, step seconds, val loss) and the log (the step total sft prints at start).

Read afresh on every refresh, so it needs no state: a job started by an earlier studio, or
resumed (metrics.jsonl is cut back to the checkpoint's step), shows the same as any other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.train.metrics import METRICS_FILE
from loraforge.webui.jobs import Job

_TOTAL = re.compile(r"^steps: (\d+) \(", re.MULTILINE)


@dataclass
class JobProgress:
    step: int = 0
    total: int | None = None
    tokens_per_s: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    eta_s: float | None = None
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) per logged line
    val: list[tuple[int, float]] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total if self.total else 0.0


def read_rows(output: Path) -> list[dict]:
    """metrics.jsonl's rows; a line being written (or cut by a kill) is left out."""
    path = Path(output) / METRICS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def log_tail(job: Job, lines: int = 60) -> str:
    if not job.log_path.is_file():
        return ""
    with job.log_path.open("rb") as f:  # the end only: a long run's log can be large
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64_000))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def job_progress(job: Job) -> JobProgress:
    p = JobProgress()
    for r in read_rows(job.output):
        if "train_loss" in r:
            p.train.append((r["step"], r["train_loss"]))
            p.step = max(p.step, r["step"])
            p.tokens_per_s = r.get("train_tokens_per_s", p.tokens_per_s)
            seconds = r.get("train_seconds")  # step time since the first step, across resumes
            if seconds and p.step:
                p.eta_s = seconds / p.step  # seconds per step, made an ETA below
        if "val_loss" in r:
            p.val.append((r["step"], r["val_loss"]))
    p.train_loss = p.train[-1][1] if p.train else None
    p.val_loss = p.val[-1][1] if p.val else None
    totals = _TOTAL.findall(log_tail(job, lines=10_000))
    p.total = int(totals[-1]) if totals else None
    if job.state == "finished" and p.total:
        p.step = p.total
    if p.eta_s is not None and p.total and job.state == "running":
        p.eta_s *= max(0, p.total - p.step)
    else:
        p.eta_s = None
    return p


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def status_line(job: Job, p: JobProgress) -> str:
    """One line per job for the table and the job's header."""
    total = p.total or "?"
    parts = [f"{job.state}", f"step {p.step}/{total}"]
    if job.state == "running":
        parts.append(f"ETA {fmt_duration(p.eta_s)}")
    if p.tokens_per_s:
        parts.append(f"{p.tokens_per_s:,.0f} tok/s")
    if p.train_loss is not None:
        parts.append(f"loss {p.train_loss:.4f}")
    if p.val_loss is not None:
        parts.append(f"val {p.val_loss:.4f}")
    return " · ".join(parts)


def loss_svg(p: JobProgress, width: int = 640, height: int = 240) -> str:
    """The loss chart as inline SVG: train loss as a line with a dot per logged step, val loss
    as larger dots. Drawn here rather than by a plotting library so that a refresh every second
    is a string, and the points are plain elements (``data-train-points``) a test can count."""
    pad = 36
    pts = p.train + p.val
    if not pts:
        return "<div id='loss-empty'>no loss logged yet</div>"
    max_step = max(p.total or 0, max(s for s, _ in pts), 1)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    hi = hi if hi > lo else lo + 1.0

    def xy(step: int, loss: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * step / max_step
        y = height - pad - (height - 2 * pad) * (loss - lo) / (hi - lo)
        return round(x, 1), round(y, 1)

    train = [xy(s, v) for s, v in p.train]
    val = [xy(s, v) for s, v in p.val]
    line = " ".join(f"{x},{y}" for x, y in train)
    dots = "".join(f"<circle class='train' cx='{x}' cy='{y}' r='2.5'/>" for x, y in train)
    vdots = "".join(f"<circle class='val' cx='{x}' cy='{y}' r='4'/>" for x, y in val)
    return (
        f"<svg id='loss-svg' data-train-points='{len(train)}' data-val-points='{len(val)}' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        "xmlns='http://www.w3.org/2000/svg' style='background:#fff;border:1px solid #ddd'>"
        f"<polyline points='{line}' fill='none' stroke='#2563eb' stroke-width='2'/>"
        f"<g fill='#2563eb'>{dots}</g><g fill='#ea580c'>{vdots}</g>"
        f"<text x='{pad}' y='{pad - 12}' font-size='12'>loss {hi:.3f}</text>"
        f"<text x='{pad}' y='{height - pad + 16}' font-size='12'>{lo:.3f} · step 0</text>"
        f"<text x='{width - pad}' y='{height - pad + 16}' font-size='12' text-anchor='end'>"
        f"step {max_step}</text>"
        f"<text x='{width - pad}' y='{pad - 12}' font-size='12' text-anchor='end'>"
        "<tspan fill='#2563eb'>— train</tspan> <tspan fill='#ea580c'>● val</tspan></text></svg>"
    )
