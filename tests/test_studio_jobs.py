"""The Studio's job store (webui/jobs.py) without a browser or a model: a stand-in for
`loraforge sft` that reads the same job.yaml and writes metrics.jsonl the way sft does."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from loraforge.config import SFTConfig
from loraforge.webui.jobs import JobError, JobStore, error_line, pid_alive
from loraforge.webui.progress import job_progress, status_line

# Stand-in for sft: `steps` steps of `delay` seconds, a metrics.jsonl line per step; resume
# continues after the last line; model_name "fail" ends like a UserError does in the CLI.
FAKE_SFT = """
import json, sys, time, yaml
from pathlib import Path
cfg = yaml.safe_load(open(sys.argv[-1]))
out = Path(cfg["output"]); out.mkdir(parents=True, exist_ok=True)
if cfg.get("model_name") == "fail":
    print("error: data/x.jsonl:3: no assistant turn", file=sys.stderr); sys.exit(1)
total, delay = cfg["max_steps"], float(cfg["system"] or 0.05)
rows = [json.loads(l) for l in open(out / "metrics.jsonl")] if cfg["resume"] else []
start = rows[-1]["step"] if rows else 0
print(f"steps: {total} (batch 4 x accum 1 x 1 proc, 1.0 steps/epoch)", flush=True)
with open(out / "metrics.jsonl", "a" if cfg["resume"] else "w") as f:
    for step in range(start + 1, total + 1):
        time.sleep(delay)
        f.write(json.dumps({"step": step, "train_loss": 3.0 / step, "train_tokens_per_s": 100.0,
                            "train_seconds": delay * step}) + "\\n"); f.flush()
        print(f"step {step}/{total}", flush=True)
(out / "adapter_config.json").write_text("{}")
"""


@pytest.fixture
def store(tmp_path) -> JobStore:
    fake = tmp_path / "fake_sft.py"
    fake.write_text(FAKE_SFT)
    s = JobStore(tmp_path / "home", command=[sys.executable, str(fake)])
    yield s
    for job in s.list():  # leave no process behind
        if job.state == "running":
            s.stop(job.id, grace_s=2)
    s.close()


def cfg(steps: int = 3, delay: float = 0.05, **kw) -> SFTConfig:
    return SFTConfig(max_steps=steps, system=str(delay), dataset=["x.jsonl"], **kw)


def wait_state(store: JobStore, job_id: int, state: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        store.tick()
        job = store.get(job_id)
        if job.state == state:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {store.get(job_id).state}, not {state}")


def test_a_job_runs_to_the_end_and_the_next_waits_in_the_queue(store):
    first = store.submit(cfg(steps=4), name="Grace v1")
    second = store.submit(cfg(steps=2), name="second")
    assert first.state == "running" and second.state == "queued"  # one at a time on a CPU
    assert first.output.name == f"{first.id:04d}-grace-v1"
    assert SFTConfig.model_validate(__import__("yaml").safe_load(first.config)).output == (
        first.output
    )
    done = wait_state(store, first.id, "finished")
    assert done.has_adapter and done.error is None
    p = job_progress(done)
    assert p.total == 4 and p.step == 4 and [s for s, _ in p.train] == [1, 2, 3, 4]
    assert "finished" in status_line(done, p) and "100 tok/s" in status_line(done, p)
    wait_state(store, second.id, "finished")  # it started once the first one ended


def test_stop_then_resume_continues_the_curve(store):
    job = store.submit(cfg(steps=40, delay=0.1))
    end = time.monotonic() + 30
    while job_progress(store.get(job.id)).step < 3:
        assert time.monotonic() < end, "no progress"
        time.sleep(0.05)
    pid = store.get(job.id).pid
    stopped = store.stop(job.id)
    assert stopped.state == "stopped" and not pid_alive(pid)
    at_stop = job_progress(stopped)
    assert 3 <= at_stop.step < 40 and at_stop.eta_s is None  # no ETA unless running
    with pytest.raises(JobError, match="not running"):
        store.stop(job.id)
    resumed = store.resume(job.id)
    assert resumed.state == "running" and "resume: true" in resumed.config
    done = wait_state(store, job.id, "finished")
    steps = [s for s, _ in job_progress(done).train]
    assert steps == list(range(1, 41))  # the curve went on where it stopped, no gap or repeat


def test_a_failed_job_shows_its_one_line_error(store):
    job = store.submit(cfg(model_name="fail", model_author="x"))
    failed = wait_state(store, job.id, "failed")
    assert failed.error == "data/x.jsonl:3: no assistant turn"
    assert not failed.has_adapter
    assert store.resume(job.id).state in ("running", "queued")  # fails again, but may retry


def test_a_restarted_studio_finds_its_jobs(store, tmp_path):
    job = store.submit(cfg(steps=30, delay=0.1))
    # a second studio on the same home (the first one is gone: it no longer ticks)
    again = JobStore(store.root, command=store.command)
    assert again.get(job.id).state == "running"
    again.tick()
    assert again.get(job.id).state == "running"  # pid alive and running this job's config
    wait_state(again, job.id, "finished")  # learnt from the exit code the wrapper wrote
    store._children.clear()

    # a job marked running whose process vanished without an exit code (a reboot): failed
    ghost = again.submit(cfg(steps=1))
    wait_state(again, ghost.id, "finished")
    with sqlite3.connect(again.db_path) as db:  # the pid is now another program's (this one)
        db.execute("UPDATE jobs SET state='running', pid=? WHERE id=?", (os.getpid(), ghost.id))
    (again.get(ghost.id).dir / "exit_code").unlink()
    third = JobStore(store.root, command=store.command)
    third.tick()
    lost = third.get(ghost.id)
    assert lost.state == "failed" and "without an exit code" in lost.error


def test_delete_removes_the_job_and_its_files(store):
    job = store.submit(cfg(steps=50, delay=0.1))
    wait_state(store, job.id, "running")
    store.delete(job.id)
    assert not job.dir.exists() and not job.output.exists()
    assert [j.id for j in store.list()] == []
    with pytest.raises(JobError, match="no job"):
        store.get(job.id)


def test_error_line_picks_what_a_person_can_act_on():
    assert error_line("model: x\nerror: --output runs/x holds checkpoints\n") == (
        "--output runs/x holds checkpoints"
    )
    tb = "Traceback (most recent call last):\n  File ...\nRuntimeError: out of memory\n"
    assert error_line(tb) == "RuntimeError: out of memory"
    assert error_line("") == "the process ended without output"


def test_metrics_lines_being_written_are_skipped(tmp_path):
    from loraforge.webui.jobs import Job

    out = tmp_path / "out"
    out.mkdir()
    rows = [{"step": 5, "train_loss": 2.0, "train_seconds": 10.0}, {"step": 5, "val_loss": 2.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "train_lo'
    (out / "metrics.jsonl").write_text(text)
    d = tmp_path / "job"
    d.mkdir()
    (d / "log.txt").write_text("steps: 20 (batch 4 x accum 1 x 1 proc, 5.0 steps/epoch)\n")
    job = Job(1, "j", "running", out, "", 0.0, None, None, None, None, d)
    p = job_progress(job)
    assert (p.step, p.total, p.train_loss, p.val_loss) == (5, 20, 2.0, 2.5)
    assert p.eta_s == pytest.approx(30.0)  # 2 s per step, 15 steps to go
    assert Path(job.log_path).is_file()
