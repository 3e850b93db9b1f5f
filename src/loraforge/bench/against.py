"""`loraforge bench generate --against vllm[,llama.cpp]`: the same prompts through each server.

Each server runs as its own process on 127.0.0.1, one after the other (never two at once: they
would share this machine's cores), and gets the same chat requests over HTTP: greedy, one stream,
then ``streams`` streams at once; tokens/s is the completion tokens the server reports over the
wall time. Ratios are against loraforge's own server in the same run. With ``adapter`` every
server answers through that LoRA adapter (the deployed case), else through the base model.
- loraforge: `loraforge serve` (its engine, ``dtype``);
- vllm: `loraforge serve --backend vllm` (vLLM's CPU build behind loraforge's proxy, bf16), when
  a python with vLLM is found (serve/vllm_backend.py);
- llama.cpp: llama-cpp-python's server on an f16 GGUF of the base written by `export gguf`
  (llama.cpp's converter, so 16-bit weights like the others, not the bundled file's Q4_1), and
  the adapter as a GGUF LoRA (``--lora-only``), when llama-cpp-python and its server extras
  are installed. That server decodes one request at a time: its 8-stream figure says so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraforge.bench.generate import PROMPTS
from loraforge.bench.served import Client, free_port, stop_server

BACKENDS = ("vllm", "llama.cpp")
SERVED_NAME = "bench"  # the adapter's name on every server, and what requests ask for
LLAMA_SERVER_DEPS = ("pydantic_settings", "sse_starlette", "starlette_context")


def _server_cmd(
    side: str, model: str, adapter: str | None, dtype: str | None, port: int, tmp: Path,
    vllm_python: str | None,
) -> list[str] | str:  # fmt: skip
    """The command line for ``side``, or why it cannot run here."""
    lf = [sys.executable, "-m", "loraforge.cli", "serve", "--model", model, "--port", str(port)]
    lf += ["--api-key", "soak-key"]  # bench/served.Client sends this key
    if adapter:
        lf += ["--adapter", f"{SERVED_NAME}={adapter}"]
    if side == "loraforge":
        return lf + (["--dtype", dtype] if dtype else [])
    if side == "vllm":
        from loraforge.serve.vllm_backend import VLLMError, find_vllm_python

        try:
            return [*lf, "--backend", "vllm", "--vllm-python", find_vllm_python(vllm_python)]
        except VLLMError as e:
            return f"vllm: {e}"
    if side == "llama.cpp":
        return _llama_cpp_cmd(model, adapter, port, tmp)
    raise ValueError(side)


def _llama_cpp_cmd(model: str, adapter: str | None, port: int, tmp: Path) -> list[str] | str:
    from loraforge.errors import UserError
    from loraforge.export.gguf import export_gguf
    from loraforge.models import resolve_model

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp: llama-cpp-python is not installed (`loraforge export gguf --setup`)"
    missing = [m for m in LLAMA_SERVER_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"llama.cpp: its server needs {', '.join(missing)} "
            "(`pip install pydantic-settings sse-starlette 'starlette-context<0.4'`)"
        )
    base, lora = tmp / "base-f16.gguf", tmp / "adapter.gguf"
    try:
        export_gguf(base, model=resolve_model(model), check=False, echo=lambda m: None)
        if adapter:
            export_gguf(lora, adapter=adapter, lora_only=True, echo=lambda m: None)
    except UserError as e:
        return f"llama.cpp: {e}"
    threads = str(os.cpu_count() or 1)  # every core, as torch uses for the other servers
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(base), "--port", str(port),
        "--n_threads", threads, "--n_ctx", "2048", "--api_key", "soak-key",
    ]  # fmt: skip
    return cmd + (["--lora_path", str(lora)] if adapter else [])


def _wait(port: int, proc: subprocess.Popen, log: Path, limit: float = 900) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited at start: {log.read_text()[-2000:]}")
        for path in ("/health", "/v1/models"):  # llama_cpp.server has no /health
            try:
                if Client(port, timeout=5).call("GET", path)[0] == 200:
                    return
            except OSError:
                pass
        time.sleep(1)
    raise RuntimeError(f"no answer within {limit:.0f} s")


def _request(port: int, model: str, prompt: str, max_new: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body.update(temperature=0, max_tokens=max_new)
    status, r = Client(port, timeout=900).call("POST", "/v1/chat/completions", body)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {r}")
    return int(r["usage"]["completion_tokens"])


def _tps(port: int, model: str, n: int, max_new: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(lambda p: _request(port, model, p, max_new), prompts))
    return tokens / (time.perf_counter() - t)


def measure(
    side: str, model: str, adapter: str | None, dtype: str | None, streams: int, max_new: int,
    repeats: int, vllm_python: str | None = None,
) -> dict:  # fmt: skip
    """{"one": tok/s, "many": tok/s} for one server (best of ``repeats``), or {"skipped": why}."""
    port = free_port()
    asked = SERVED_NAME if adapter else model
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _server_cmd(side, model, adapter, dtype, port, Path(tmp), vllm_python)
        if isinstance(cmd, str):
            return {"skipped": cmd}
        log = Path(tmp) / "server.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait(port, proc, log)
            _request(port, asked, PROMPTS[0], 8)  # warm-up
            one = max(_tps(port, asked, 1, max_new) for _ in range(repeats))
            many = max(_tps(port, asked, streams, max_new) for _ in range(repeats))
            return {"one": one, "many": many}
        except RuntimeError as e:
            return {"skipped": f"{side}: {e}"}
        finally:
            stop_server(proc)


def run_against(
    model: str | None,
    against: list[str],
    adapter: str | None = None,
    dtype: str | None = None,
    streams: int = 8,
    max_new_tokens: int = 128,
    repeats: int = 2,
    vllm_python: str | None = None,
    progress=print,
) -> dict:
    """{"model", "adapter", "dtype", "streams", "max_new_tokens", "machine", "sides": {side:
    figures}}; ``model`` defaults to the adapter's base, else the bundled model."""
    from loraforge.adapters import resolve_adapter
    from loraforge.bench.report import machine_info
    from loraforge.models import DEFAULT_MODEL

    if adapter:
        model = model or resolve_adapter(adapter).base_model
        resolve_adapter(adapter, model)  # one line when the adapter is not for --model
    model = model or DEFAULT_MODEL
    machine = machine_info()
    machine["loadavg"] = round(os.getloadavg()[0], 2)
    sides = {}
    for side in ("loraforge", *against):
        progress(f"{side}: 1 and {streams} streams...")
        sides[side] = measure(
            side, model, adapter, dtype, streams, max_new_tokens, repeats, vllm_python
        )
        if "skipped" in sides[side]:
            progress(sides[side]["skipped"])
    res = dict(model=model, adapter=adapter, dtype=dtype or "bfloat16", streams=streams)
    res.update(max_new_tokens=max_new_tokens, machine=machine)
    return {**res, "sides": sides}


AGAINST_HEADER = [
    "| date (UTC) | machine | model + adapter, new tokens | server | 1 stream tok/s (× loraforge) "
    "| 8 streams tok/s (× loraforge) |",
    "|---|---|---|---|---|---|",
]
WEIGHTS = {"vllm": "bf16", "llama.cpp": "f16 GGUF"}


def markdown_rows(res: dict) -> list[str]:
    from loraforge.bench.report import machine_description

    base = res["sides"]["loraforge"]
    where = f"{machine_description(res['machine'])}, load avg {res['machine']['loadavg']}"
    what = res["model"] + (f" + {Path(res['adapter']).name}" if res.get("adapter") else "")
    rows = []
    for side, f in res["sides"].items():
        weights = WEIGHTS.get(side, res.get("dtype", "bfloat16"))
        head = f"| {where} | {what}, {res['max_new_tokens']} | {side} ({weights}) "
        if "skipped" in f:
            rows.append(head + f"| {f['skipped']} | |")
            continue
        ratio = "skipped" not in base
        one = f"{f['one']:.1f}" + (f" (×{f['one'] / base['one']:.2f})" if ratio else "")
        many = f"{f['many']:.1f}" + (f" (×{f['many'] / base['many']:.2f})" if ratio else "")
        rows.append(head + f"| {one} | {many} ({res['streams']} streams) |")
    return rows


def append_markdown(res: dict, path: Path) -> None:
    from loraforge.bench.report import append_row

    for row in markdown_rows(res):
        append_row(path, "generate --against", AGAINST_HEADER, row)


def print_against(res: dict) -> None:
    from rich.table import Table

    from loraforge.console import console

    table = Table("server", "1 stream tok/s", f"{res['streams']} streams tok/s", title=res["model"])
    for row in markdown_rows(res):
        cells = [c.strip() for c in row.strip("|").split("|")]
        table.add_row(cells[2], cells[3], cells[4])
    console.print(table)
