"""vLLM as the scale-out server: adapters it takes unchanged, `serve --backend vllm` and its proxy.

The first tests need no vLLM (the adapter contract, the command line, the proxy against a fake
vLLM). The last ones run the real vLLM CPU build (`make test-vllm` builds .venv-vllm and runs
this file with LORAFORGE_VLLM_PYTHON set); without it they skip, saying how to get it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi import Request  # module level: FastAPI reads the fake's annotations from here
from helpers import make_adapter, start_server
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.serve.vllm_backend import (
    VLLMError,
    check_adapter_for_vllm,
    lora_rank_setting,
    vllm_command,
)

# ---- the adapter contract (no vLLM needed) ---------------------------------------------------


def test_sft_adapter_is_what_vllm_reads(tmp_path, tiny_model_dir):
    """`loraforge sft`'s adapter dir: only lora_A / lora_B tensors of the projections (the keys
    vLLM's LoRAModel reads), no embedding or lm_head weights, nothing vLLM refuses."""
    from safetensors import safe_open

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Name item {k}.", "output": f"Item {k}."} for k in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output", str(out)]
    r = CliRunner().invoke(app, [*args, "--max-steps", "1", "--val-split", "0"])
    assert r.exit_code == 0, r.output
    assert check_adapter_for_vllm(out) == 8
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert all(k.startswith("base_model.model.model.layers.") for k in keys), keys[:3]
    assert not [k for k in keys if "embed" in k or "lm_head" in k]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["modules_to_save"] and not cfg["use_dora"] and cfg["bias"] == "none"


def test_vllm_refuses_what_it_cannot_serve(tmp_path, tiny_model_dir):
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(VLLMError, match="DoRA") as e:
        check_adapter_for_vllm(dora)
    assert "\n" not in str(e.value)
    wide = make_adapter(tiny_model_dir, tmp_path / "wide", seed=2, r=24)
    assert check_adapter_for_vllm(wide) == 24
    assert lora_rank_setting([24], runtime_loads=False) == 32
    assert lora_rank_setting([8], runtime_loads=False) == 8
    assert lora_rank_setting([8], runtime_loads=True) == 16  # room for adapters loaded later


def test_vllm_command(tmp_path):
    argv, env = vllm_command(
        "py", tmp_path, "smollm2-135m", {"a": "runs/a"}, port=9, api_key="k", max_batch=8,
        max_lora_rank=8,
    )  # fmt: skip
    text = " ".join(argv)
    assert "--enable-lora" in argv and f"a={Path('runs/a').resolve()}" in argv
    assert "--served-model-name smollm2-135m" in text and "--api-key k" in text
    assert "--host 127.0.0.1" in text and "--max-lora-rank 8" in text
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "False"
    argv, env = vllm_command("py", tmp_path, "m", {}, port=9, api_key=None, runtime_loads=True)
    assert "--enable-lora" in argv and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--lora-modules" not in argv


def test_backend_vllm_without_vllm_is_one_line(tmp_path):
    r = CliRunner().invoke(
        app, ["serve", "--backend", "vllm", "--vllm-python", str(tmp_path / "none")]
    )
    assert r.exit_code == 1
    assert "make setup-vllm" in r.output and len(r.output.strip().splitlines()) == 1, r.output


# ---- the proxy, against a fake vLLM ----------------------------------------------------------


@pytest.fixture
def fake_vllm():
    """A stand-in for vLLM's server that records what reaches it."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    seen: list[tuple[str, str, dict]] = []
    fake = FastAPI()

    @fake.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str, request: Request):
        raw = await request.body()
        seen.append((f"/{path}", request.headers.get("authorization"), json.loads(raw or "{}")))
        body = json.loads(raw or "{}")
        if body.get("stream"):
            events = [b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n', b"data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return JSONResponse({"ok": True})

    url, server, _ = start_server(fake)
    yield url, seen
    server.should_exit = True


def test_proxy_keeps_loraforge_semantics(tmp_path, tiny_model_dir, fake_vllm):
    import httpx

    from loraforge.serve.vllm_proxy import create_proxy

    upstream, seen = fake_vllm
    root = tmp_path / "root"
    make_adapter(tiny_model_dir, root / "shop", seed=3, system="You sell shoes.")
    outside = make_adapter(tiny_model_dir, tmp_path / "outside", seed=4)
    formats = {"tiny": ("BASE-TEMPLATE {{ x }}", "Base system."), "a": ("A {{ x }}", None)}
    proxy = create_proxy(
        upstream, "inner-key", formats, base_spec=str(tiny_model_dir), api_key="outer-key",
        adapter_root=root, default_model="a",
    )  # fmt: skip
    url, server, _ = start_server(proxy)
    try:
        c = httpx.Client(base_url=url, headers={"Authorization": "Bearer outer-key"}, timeout=30)
        hi = [{"role": "user", "content": "hi"}]
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": hi}).status_code == 401

        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": hi})
        assert r.status_code == 200, r.text
        path, auth, body = seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer inner-key"
        assert body["chat_template"] == "BASE-TEMPLATE {{ x }}"
        assert body["messages"][0] == {"role": "system", "content": "Base system."}
        c.post("/v1/chat/completions", json={"messages": hi})  # the default model, no system
        assert seen[-1][2]["model"] == "a" and seen[-1][2]["messages"] == hi

        streamed = c.post("/v1/chat/completions", json={"messages": hi, "stream": True}).text
        assert '"content": "hi"' in streamed and streamed.endswith("data: [DONE]\n\n")
        r = c.post("/v1/chat/completions", json={"messages": hi, "chat_template": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"

        n = len(seen)
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": str(outside)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "outside_adapter_root"
        assert len(seen) == n  # refused before vLLM saw it
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "shop", "lora_path": "shop"})
        assert r.status_code == 200
        assert seen[-1][2] == {"lora_name": "shop", "lora_path": str((root / "shop").resolve())}
        c.post("/v1/chat/completions", json={"model": "shop", "messages": hi})
        assert seen[-1][2]["messages"][0]["content"] == "You sell shoes."

        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
        assert r.status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "shop"}).status_code == 200
        assert c.get("/tokenize").status_code == 404  # vLLM's other endpoints stay internal
    finally:
        server.should_exit = True


# ---- the real vLLM ----------------------------------------------------------------------------

# The bf16 rule for free-running greedy answers (vLLM's logprobs give its top 5 per position, not
# full logits): the token ids must be equal up to the first position where they differ, and there
# loraforge's token must be among vLLM's top 5 and a near tie with vLLM's top-1 (their logprob gap,
# which equals the logit gap, at most NEAR_TIE); after it the answers may legitimately part. Not
# "vLLM's second choice": a random adapter leaves three-way ties (seen: vLLM's top-2 were equal to
# the last bit and loraforge's pick was the third). NEAR_TIE is test_engine's bf16 bound (1.75).
NEAR_TIE = 1.75
PROMPTS = ["What is the capital of France?", "Give me two tips to sleep better.", "Who are you?"]
MAX_NEW = 24


def _vllm_python() -> str:
    from loraforge.serve.vllm_backend import INSTALL_HINT, find_vllm_python

    try:
        return find_vllm_python()
    except VLLMError:
        pytest.skip(f"{INSTALL_HINT} (make test-vllm does both)")


def _start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    from loraforge.bench.served import Client

    cmd = [sys.executable, "-m", "loraforge.cli", "serve", "--backend", "vllm", "--api-key"]
    cmd += ["soak-key", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if Client(port, timeout=5).call("GET", "/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"no /health in 900 s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # the serve process stops its vLLM child in its `finally` (<= 40 s)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def _vllm_greedy(client, model: str, prompt) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """vLLM's greedy token ids and top-5 (id, logprob) per position, for chat messages or ids."""
    body = {"model": model, "temperature": 0, "max_tokens": MAX_NEW}
    body["return_tokens_as_token_ids"] = True
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        path = "/v1/completions"
        body.update(prompt=prompt, logprobs=5)
    else:
        path = "/v1/chat/completions"
        body.update(messages=prompt, logprobs=True, top_logprobs=5)
    status, r = client.call("POST", path, body, timeout=600)
    assert status == 200, r

    def tid(s: str) -> int:
        return int(s.removeprefix("token_id:"))

    lp = r["choices"][0]["logprobs"]
    if "content" in lp:  # chat
        toks = [tid(p["token"]) for p in lp["content"]]
        tops = [[(tid(t["token"]), t["logprob"]) for t in p["top_logprobs"]] for p in lp["content"]]
    else:
        toks = [tid(t) for t in lp["tokens"]]
        tops = [[(tid(k), v) for k, v in d.items()] for d in lp["top_logprobs"]]
    return toks, [sorted(t, key=lambda x: -x[1]) for t in tops]


def _assert_bf16_rule(ref: list[int], got: list[int], tops, what: str) -> int:
    """The rule above; returns how many tokens were equal before any parting."""
    for t, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            l1, theirs = tops[t][0][1], dict(tops[t])
            assert a in theirs and l1 - theirs[a] <= NEAR_TIE, (
                f"{what}: token {t} is {b} in vLLM, {a} in loraforge; vLLM's top-5 {tops[t]}"
            )
            return t
    if len(ref) != len(got):  # one stopped (EOS) where the other did not: also a parting
        return min(len(ref), len(got))
    return len(ref)


@pytest.mark.slow
def test_vllm_answers_like_loraforge(tmp_path):
    """Base and adapter through `loraforge serve --backend vllm` (vLLM's chat endpoint with the
    prompt the proxy renders) vs loraforge's engine in bf16; runtime load inside the root; then
    the merged dir served by vLLM as a plain model."""
    from loraforge.bench.generate import make_random_adapters
    from loraforge.bench.served import Client, free_port
    from loraforge.export.merge import merge_adapter
    from loraforge.infer.engine import Engine, SamplingParams
    from loraforge.models import resolve_model

    _vllm_python()
    root = tmp_path / "root"
    root.mkdir()
    adapter = make_random_adapters(resolve_model("smollm2-135m"), "smollm2-135m", 1, root)[0]
    engine = Engine("smollm2-135m", {"t": str(adapter)}, dtype="bfloat16")
    chats = {q: [{"role": "user", "content": q}] for q in PROMPTS}
    ref = {}
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    for name in ("smollm2-135m", "t"):
        res = engine.generate([engine.encode(m, name) for m in chats.values()], params, name)
        ref[name] = [r.token_ids for r in res]
    ids = [engine.encode(m, "t") for m in chats.values()]
    engine.close()

    port = free_port()
    args = ["--adapter", f"t={adapter}", "--adapter-root", str(root)]
    proc = _start(args, port, tmp_path / "serve.log")
    client, equal = Client(port), 0
    try:
        for name in ("smollm2-135m", "t"):
            for q, want in zip(PROMPTS, ref[name], strict=True):
                got, tops = _vllm_greedy(client, name, chats[q])
                equal += _assert_bf16_rule(want, got, tops, f"{name}, {q!r}")
        status, _ = client.call("POST", "/v1/load_lora_adapter", {"lora_name": "t2",
                                "lora_path": adapter.name})  # fmt: skip
        assert status == 200
        again, _ = _vllm_greedy(client, "t2", chats[PROMPTS[0]])
        assert again == _vllm_greedy(client, "t", chats[PROMPTS[0]])[0]
        status, r = client.call("POST", "/v1/load_lora_adapter", {"lora_name": "x",
                                "lora_path": str(tmp_path)})  # fmt: skip
        assert status == 400 and r["error"]["code"] == "outside_adapter_root"
    finally:
        _stop(proc)
    # enough equal tokens for the comparison to mean something (6 answers x 24 tokens at most)
    assert equal >= 40, equal

    merged = tmp_path / "merged"
    merge_adapter(adapter, merged, dtype="bfloat16")
    proc = _start(["--model", str(merged)], port, tmp_path / "merged.log")
    try:
        for q, prompt, want in zip(PROMPTS, ids, ref["t"], strict=True):
            got, tops = _vllm_greedy(client, "merged", prompt)
            _assert_bf16_rule(want, got, tops, f"merged, {q!r}")
    finally:
        _stop(proc)


def test_stop_vllm_ends_children_that_ignore_sigterm(tmp_path):
    """vLLM's engine-core processes were seen surviving their leader's SIGTERM (orphans holding
    3 GB each): stop_vllm must leave nothing of the group alive."""
    from loraforge.serve.vllm_backend import start_vllm_process, stop_vllm

    pidfile = tmp_path / "child.pid"
    script = (
        "import os, signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    proc = start_vllm_process([sys.executable, "-c", script], dict(os.environ))
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.1)
    child = int(pidfile.read_text())
    stop_vllm(proc)
    time.sleep(0.5)
    assert _state(child) in ("gone", "Z"), "the child outlived stop_vllm"


def _state(pid: int) -> str:
    """A process's state letter ("Z": dead, not yet reaped by init), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_sigterm_to_serve_stops_vllm(tmp_path):
    """`kill PID` of `serve --backend vllm`: uvicorn re-raises the SIGTERM it caught after its
    shutdown, which used to kill the serve process before its ``finally`` stopped vLLM (found:
    vLLM's engine-core processes orphaned, 3 GB each). A fake vLLM group stands in for vLLM."""
    from loraforge.bench.served import free_port

    port, pidfile = free_port(), tmp_path / "child.pid"
    fake_vllm = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    serve = (
        "import os, sys\n"
        "from fastapi import FastAPI\n"
        "from loraforge.serve.vllm_backend import serve_until_stopped, start_vllm_process, "
        "stop_vllm\n"
        f"proc = start_vllm_process([sys.executable, '-c', {fake_vllm!r}], dict(os.environ))\n"
        "app = FastAPI()\n"
        "app.get('/health')(lambda: {})\n"
        "try:\n"
        f"    serve_until_stopped(app, '127.0.0.1', {port}, 'warning')\n"
        "finally:\n"
        "    stop_vllm(proc)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", serve])
    try:
        from loraforge.bench.served import Client

        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline and server.poll() is None, "did not start"
            time.sleep(0.1)
        while True:
            try:
                if Client(port, timeout=2).call("GET", "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer"
                time.sleep(0.1)
        child = int(pidfile.read_text())
        server.terminate()
        server.wait(timeout=60)
        time.sleep(0.5)
        assert _state(child) in ("gone", "Z"), "vLLM's child outlived `kill` of the serve process"
    finally:
        server.kill()
