"""A `loraforge serve` process for the soak and the adversarial tests, and a stdlib HTTP client.

Only the standard library talks HTTP here (http.client), so `loraforge[serve]` is enough.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

KEY = "soak-key"
HOST = "127.0.0.1"
TIMEOUT = 120.0  # seconds: the longest any one HTTP exchange may take


# ---- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """The process's resident set size (VmRSS of /proc/PID/status) in MiB; NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(model: str, adapters: dict[str, Path], root: Path, port: int, log: Path, args):
    cmd = [
        sys.executable, "-m", "loraforge.cli", "serve", "--model", model,
        "--adapter-root", str(root), "--api-key", KEY, "--host", HOST, "--port", str(port),
        "--max-tokens", str(args.max_tokens),
    ]  # fmt: skip
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the server exited at start:\n{log.read_text()[-3000:]}")
        try:
            status, _ = Client(port, timeout=5).call("GET", "/health")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"soak: the server did not answer /health within {limit:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


# ---- clients ------------------------------------------------------------------------------------


class Client:
    """One HTTP/1.1 exchange per call over a fresh connection to 127.0.0.1."""

    def __init__(self, port: int, timeout: float = TIMEOUT):
        self.port, self.timeout = port, timeout

    def _conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout or self.timeout)

    def call(self, method: str, path: str, body=None, timeout: float | None = None):
        """(status, parsed JSON body or None)."""
        conn = self._conn(timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, None
        finally:
            conn.close()

    def stream(self, body: dict, drop_after: int | None = None) -> dict:
        """A streamed chat completion: {status, deltas, done, finish, errors, dropped, body}.
        ``drop_after``: close the connection after that many content deltas."""
        conn = self._conn()
        out = {"status": None, "deltas": 0, "done": False, "finish": None, "errors": []}
        out.update(dropped=False, body=None)
        try:
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
            resp = conn.getresponse()
            out["status"] = resp.status
            if resp.status != 200:
                try:
                    out["body"] = json.loads(resp.read())
                except ValueError:
                    pass
                return out
            for _ in range(100_000):  # far more lines than any max_tokens here makes
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                if line == b"data: [DONE]":
                    out["done"] = True
                    break
                event = json.loads(line.removeprefix(b"data: "))
                if "error" in event:
                    out["errors"].append(event["error"].get("message", ""))
                    continue
                choice = event["choices"][0] if event.get("choices") else None
                if choice is None:
                    continue
                out["finish"] = choice.get("finish_reason") or out["finish"]
                if choice["delta"].get("content"):
                    out["deltas"] += 1
                    if drop_after is not None and out["deltas"] >= drop_after:
                        out["dropped"] = True
                        return out  # conn.close() below: the client vanishes mid-stream
            return out
        finally:
            conn.close()
