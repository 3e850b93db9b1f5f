"""The Studio's training jobs: a SQLite table under ``LORAFORGE_HOME`` and one process per job.

A job is an ``SFTConfig`` written as YAML and run by ``loraforge sft --config job.yaml`` in its own
process (its own session, so closing the page or restarting the studio does not stop it): the
CLI and a job run the same code with the same config object, and a job's output dir is an
ordinary adapter dir. A small ``sh`` wrapper writes the exit code into the job dir when sft
ends, so a studio started after the job ended still learns how it ended.

States: queued -> running -> finished | failed | stopped; Resume puts a stopped or failed job
back in the queue with ``resume: true`` (sft continues from the newest checkpoint). At most
``max_running`` jobs train at once (1 on a CPU: two runs on two cores are each half as fast and
need twice the memory); ``tick`` reaps ended processes and starts queued jobs, oldest first.

No UI imports here: the page (webui/app.py) and the tests drive this class directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loraforge.config import SFTConfig, load_config
from loraforge.errors import UserError

STATES = ("queued", "running", "finished", "failed", "stopped")
JOB_CONFIG, JOB_LOG, EXIT_FILE = "job.yaml", "log.txt", "exit_code"

# sh runs sft, then writes its exit code beside the log (write + rename: never half a number).
# A job stopped by a signal kills the wrapper too, so no code is written: the DB says "stopped".
_WRAPPER = 'PYTHONUNBUFFERED=1 "$@" >>"$0/log.txt" 2>&1; echo $? >"$0/exit.tmp" && mv "$0/exit.tmp" "$0/exit_code"'  # noqa: E501

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    output TEXT NOT NULL,
    config TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    pid INTEGER,
    error TEXT
)
"""


class JobError(UserError):
    """A job action that cannot be done (unknown job, wrong state)."""


@dataclass
class Job:
    id: int
    name: str
    state: str
    output: Path  # the adapter dir sft writes
    config: str  # the SFTConfig as YAML, exactly as the job runs it
    created: float
    started: float | None
    ended: float | None
    pid: int | None
    error: str | None
    dir: Path  # job.yaml, log.txt, exit_code

    @property
    def log_path(self) -> Path:
        return self.dir / JOB_LOG

    @property
    def has_adapter(self) -> bool:
        return self.state == "finished" and (self.output / "adapter_config.json").is_file()


def slug(text: str) -> str:
    """A name safe as a dir name: ``My Grace v2!`` -> ``my-grace-v2``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "job"


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """The process exists, is not a zombie, and (given ``marker``) its command line holds it:
    a pid the OS reused for another program after a reboot is not our job."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():  # Linux: also tells a zombie (exited, not reaped) from a live process
        try:
            if ") Z" in (proc / "stat").read_text():
                return False
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return marker is None or marker in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return marker is None
    return True


def error_line(log_text: str) -> str:
    """The one line that says why a run failed: the CLI's ``error: ...`` line, else the last
    line of a traceback (``RuntimeError: ...``), else the last line written."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln.removeprefix("error:").strip()
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    return lines[-1] if lines else "the process ended without output"


class JobStore:
    """The job table and the processes behind it. Thread-safe; every method reads the DB afresh,
    so several threads (the page's handlers, the scheduler) and a restarted studio agree."""

    def __init__(
        self,
        root: Path,
        runs_dir: Path | None = None,
        *,
        max_running: int = 1,
        command: list[str] | None = None,
    ):
        """``root``: the DB and job dirs; ``runs_dir``: where jobs' adapter dirs go;
        ``command``: what runs a job, before ``--config job.yaml`` (tests give a stand-in)."""
        self.root = Path(root)
        self.command = command or [sys.executable, "-m", "loraforge.cli", "sft"]
        self.runs_dir = Path(runs_dir) if runs_dir else self.root / "runs"
        self.max_running = max_running
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "jobs.sqlite"
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen] = {}  # processes this studio started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self._db() as db:
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _db(self):
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commit on success
                yield db
        finally:
            db.close()

    def _job(self, row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            name=row["name"],
            state=row["state"],
            output=Path(row["output"]),
            config=row["config"],
            created=row["created"],
            started=row["started"],
            ended=row["ended"],
            pid=row["pid"],
            error=row["error"],
            dir=self.root / "jobs" / str(row["id"]),
        )

    def _set(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    # ---- reading ------------------------------------------------------------------------------
    def list(self) -> list[Job]:
        """Every job, newest first."""
        with self._db() as db:
            return [self._job(r) for r in db.execute("SELECT * FROM jobs ORDER BY id DESC")]

    def get(self, job_id: int) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"no job {job_id}")
        return self._job(row)

    def config_of(self, job: Job) -> SFTConfig:
        return load_config(job.dir / JOB_CONFIG)

    # ---- actions ------------------------------------------------------------------------------
    def submit(self, cfg: SFTConfig, name: str = "") -> Job:
        """Queue a new job. Its output dir is ``runs_dir/<id>-<name>`` (never an existing
        run's); the config is stored as the job runs it."""
        name = name.strip() or (cfg.model_name or "job")
        with self._lock, self._db() as db:
            cur = db.execute(
                "INSERT INTO jobs (name, state, output, config, created) VALUES (?, ?, ?, ?, ?)",
                (name, "queued", "", "", time.time()),
            )
            job_id = int(cur.lastrowid)
            output = (self.runs_dir / f"{job_id:04d}-{slug(name)}").resolve()
            cfg = cfg.model_copy(update={"output": output, "resume": False, "overwrite": False})
            db.execute(
                "UPDATE jobs SET output = ?, config = ? WHERE id = ?",
                (str(output), cfg.to_yaml(), job_id),
            )
        job = self.get(job_id)
        job.dir.mkdir(parents=True, exist_ok=True)
        (job.dir / JOB_CONFIG).write_text(job.config)
        self.tick()
        return self.get(job_id)

    def stop(self, job_id: int, grace_s: float = 15.0) -> Job:
        """Stop a running job (SIGTERM to its process group, SIGKILL after ``grace_s``) or take
        a queued one out of the queue. Its checkpoints stay, for Resume."""
        with self._lock:
            job = self.get(job_id)
            if job.state not in ("running", "queued"):
                raise JobError(f"job {job_id} is {job.state}, not running")
            self._set(job.id, state="stopped", ended=time.time(), error=None)
            if job.state == "running" and job.pid:
                self._kill(job, grace_s)
        self.tick()
        return self.get(job_id)

    def _kill(self, job: Job, grace_s: float) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signal.SIGTERM)
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self._alive(job):
            time.sleep(0.1)
        if self._alive(job):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)
        child = self._children.pop(job.id, None)
        if child is not None:
            child.wait()

    def resume(self, job_id: int) -> Job:
        """Queue a stopped or failed job again; sft continues from its newest checkpoint
        (``resume: true``; with none yet it starts from the beginning)."""
        with self._lock:
            job = self.get(job_id)
            if job.state not in ("stopped", "failed"):
                raise JobError(f"job {job_id} is {job.state}: only a stopped or failed job resumes")
            cfg = self.config_of(job).model_copy(update={"resume": True})
            (job.dir / JOB_CONFIG).write_text(cfg.to_yaml())
            self._set(job.id, state="queued", config=cfg.to_yaml(), error=None, ended=None)
        self.tick()
        return self.get(job_id)

    def delete(self, job_id: int) -> None:
        """Stop it if it runs, then remove the row, the job dir and its output (adapter) dir."""
        job = self.get(job_id)
        if job.state in ("running", "queued"):
            self.stop(job_id)
        with self._lock:
            with self._db() as db:
                db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            shutil.rmtree(job.dir, ignore_errors=True)
            if job.output.is_relative_to(self.runs_dir.resolve()):  # only dirs the studio made
                shutil.rmtree(job.output, ignore_errors=True)

    # ---- the scheduler ------------------------------------------------------------------------
    def _alive(self, job: Job) -> bool:
        child = self._children.get(job.id)
        if child is not None:
            return child.poll() is None
        return pid_alive(job.pid, marker=str(job.dir))

    def tick(self) -> None:
        """Settle the jobs whose process ended, then start queued jobs while there is room."""
        with self._lock:
            running = 0
            for job in self.list():
                if job.state != "running":
                    continue
                if self._alive(job):
                    running += 1
                else:
                    self._settle(job)
            queued = [j for j in reversed(self.list()) if j.state == "queued"]
            for job in queued[: max(0, self.max_running - running)]:
                self._launch(job)

    def _settle(self, job: Job) -> None:
        """Record how a job whose process is gone ended: its exit code, else (killed, or the
        machine went down) failed."""
        child = self._children.pop(job.id, None)
        if child is not None:
            child.wait()
        exit_file = job.dir / EXIT_FILE
        code = exit_file.read_text().strip() if exit_file.is_file() else None
        log = job.log_path.read_text(errors="replace") if job.log_path.is_file() else ""
        if code == "0":
            self._set(job.id, state="finished", ended=time.time(), error=None)
            return
        why = error_line(log) if code else "the process ended without an exit code (killed?)"
        self._set(job.id, state="failed", ended=time.time(), error=why)

    def _launch(self, job: Job) -> None:
        job.dir.mkdir(parents=True, exist_ok=True)
        (job.dir / EXIT_FILE).unlink(missing_ok=True)
        (job.dir / JOB_CONFIG).write_text(job.config)
        with job.log_path.open("a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} loraforge sft ---\n")
        cmd = [*self.command, "--config", str(job.dir / JOB_CONFIG)]
        proc = subprocess.Popen(
            ["sh", "-c", _WRAPPER, str(job.dir), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: Stop kills sft and the wrapper
        )
        self._children[job.id] = proc
        self._set(job.id, state="running", pid=proc.pid, started=time.time(), error=None)

    def start_scheduler(self, every_s: float = 1.0) -> None:
        """A daemon thread calling ``tick`` every ``every_s`` seconds (the page never waits)."""

        def loop() -> None:
            while not self._stop.wait(every_s):
                with contextlib.suppress(Exception):  # a locked DB now is fine next second
                    self.tick()

        self._thread = threading.Thread(target=loop, name="studio-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the scheduler. Running jobs go on: a restarted studio finds them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
