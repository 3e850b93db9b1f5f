"""`loraforge serve` end to end: a real uvicorn server on 127.0.0.1, the official openai client.

One engine on the tiny model with two adapters ("grace", "shop") serves every test; the server
runs in a thread of this process so the model is loaded once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from helpers import make_adapter, start_server

from loraforge.bench.served import free_port
from loraforge.infer.engine import Engine, EngineBusy
from loraforge.serve.app import create_app

KEY = "test-key"
CTX = 512  # a small context so "prompt longer than the context" is cheap to hit
HI = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory) -> Path:
    """The --adapter-root: grace and shop (served from the start) and late (loaded at runtime)."""
    r = tmp_path_factory.mktemp("runs")
    for i, name in enumerate(("grace", "shop", "late"), start=1):
        make_adapter(tiny_model_dir, r / name, seed=i)
    return r


@pytest.fixture(scope="module")
def engine(tiny_model_dir, root):
    adapters = {"grace": str(root / "grace"), "shop": str(root / "shop")}
    eng = Engine(str(tiny_model_dir), adapters, dtype="float32", max_batch=8)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine, root):
    app = create_app(
        engine,
        api_key=KEY,
        adapter_root=root,
        default_model="grace",
        max_tokens_limit=300,
        max_context=CTX,
    )
    url, srv, thread = start_server(app)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def ask(client, model: str, content: str = "Hello there, who are you?", n: int = 10) -> str:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=n,
    )
    return r.choices[0].message.content


def test_models_lists_base_and_adapters(client, engine):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == engine.base_name
    assert {"grace", "shop"} <= set(ids)


def test_chat_matches_engine_and_reports_usage(client, engine):
    r = client.chat.completions.create(model="grace", messages=HI, temperature=0, max_tokens=8)
    ids = engine.encode(HI, "grace")
    from loraforge.infer.engine import SamplingParams

    want = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=8), "grace")[0]
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.model == "grace"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == len(ids) + want.completion_tokens


def test_adapters_differ_and_base_name_means_no_adapter(client, engine):
    answers = {m: ask(client, m) for m in (engine.base_name, "grace", "shop")}
    assert len(set(answers.values())) == 3, answers


def test_streaming_chat_joins_to_the_same_text(client):
    whole = ask(client, "shop", n=12)
    stream = client.chat.completions.create(
        model="shop",
        messages=HI,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stream_ends_with_done(server):
    body = {"model": "grace", "messages": HI, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    assert all(x.startswith("data: ") for x in lines)


def test_completions(client, engine):
    r = client.completions.create(
        model="grace", prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.prompt_tokens == len(engine.tokenizer("Once upon a time")["input_ids"])
    parts = client.completions.create(
        model="grace", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in parts if c.choices) == r.choices[0].text


def test_seed_reproduces_a_sample(client):
    def sample() -> str:
        r = client.chat.completions.create(
            model="grace", messages=HI, temperature=1.0, top_p=0.9, seed=7, max_tokens=10
        )
        return r.choices[0].message.content

    assert sample() == sample()


def test_unknown_model_is_404_in_openai_format(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "nope")
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]


def test_api_key(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{server}/chat", json={"message": "hi"}).status_code == 401
    health = httpx.get(f"{server}/health")  # the one endpoint open without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, param",
    [
        ("{not json", None),
        ({"model": "grace"}, "messages"),
        ({"model": "grace", "messages": []}, "messages"),
        ({"model": "grace", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "grace", "messages": HI, "max_tokens": 301}, "max_tokens"),
        ({"model": "grace", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "grace", "messages": HI, "temperature": -1}, "temperature"),
        ({"model": "grace", "messages": HI, "n": 0}, "n"),
        ({"model": "grace", "messages": HI, "seed": 2**70}, "seed"),
        ({"model": "grace", "messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"model": "grace", "messages": HI, "max_tokens": 300, "stop": ["a"] * 65}, "stop"),
        ([1, 2, 3], None),
    ],
)
def test_bad_input_is_400_in_openai_format(server, body, param):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    headers = {**auth(), "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["code"]
    if param is not None:
        assert err["param"] == param


def test_prompt_plus_max_tokens_over_context_is_400(server):
    body = {"model": "grace", "messages": [{"role": "user", "content": "word " * 400}]}
    r = httpx.post(
        f"{server}/v1/chat/completions", json={**body, "max_tokens": 300}, headers=auth()
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {CTX}" in r.json()["error"]["message"]


def test_simple_chat_endpoint(server, client):
    r = httpx.post(
        f"{server}/chat",
        json={"message": "Hello there, who are you?", "max_tokens": 10, "temperature": 0},
        headers=auth(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "grace"  # the server's default model
    assert r.json()["response"] == ask(client, "grace")
    hist = {
        "message": "And then?",
        "history": [["hi", "hello"], {"role": "user", "content": "x"}],
        "max_tokens": 4,
        "model": "shop",
    }
    r = httpx.post(f"{server}/chat", json=hist, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "shop"


def test_load_and_unload_adapter(server, client, root, tiny_model_dir, tmp_path, monkeypatch):
    url = f"{server}/v1"

    def load(name: str, path: str) -> httpx.Response:
        return httpx.post(
            f"{url}/load_lora_adapter",
            json={"lora_name": name, "lora_path": path},
            headers=auth(),
            timeout=60,
        )

    assert load("late", "late").status_code == 200  # relative to the root
    assert "late" in [m.id for m in client.models.list().data]
    assert ask(client, "late") not in (ask(client, "grace"), ask(client, "shop"))
    assert load("late", "late").status_code == 400  # already loaded
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"}, headers=auth())
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask(client, "late")
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"}, headers=auth())
    assert r.status_code == 404

    outside = make_adapter(tiny_model_dir, tmp_path / "outside", seed=5)
    (root / "link").symlink_to(outside)
    for path in (str(outside), "../outside", f"{root}/../{outside.name}", "link"):
        r = load("evil", path)
        assert r.status_code == 400, path
        assert r.json()["error"]["param"] == "lora_path"
    assert "no such adapter dir" in load("ghost", "no-such-dir").json()["error"]["message"]
    monkeypatch.chdir(root.parent)  # a path relative to the working dir, inside the root
    assert load("late2", f"{root.name}/late").status_code == 200

    other = make_adapter(tiny_model_dir, root / "other-base", seed=6)
    meta = json.loads((other / "loraforge.json").read_text())
    (other / "loraforge.json").write_text(json.dumps({**meta, "base_model": "smollm2-135m"}))
    r = load("other", "other-base")
    assert r.status_code == 400 and "smollm2-135m" in r.json()["error"]["message"]
    assert "evil" not in [m.id for m in client.models.list().data]


def test_16_parallel_requests_equal_solo_answers(client, engine):
    models = [engine.base_name, "grace", "shop"]
    prompts = ["Hi!", "What is 2+2?", "Tell me a story.", "Who made you?", "Name a colour."]
    jobs = [(models[i % 3], prompts[i % 5]) for i in range(18)]
    solo = {job: ask(client, *job, n=24) for job in set(jobs)}  # one at a time
    batches = []  # the adapters of each decode step's rows (the engine's step listener)
    remove = engine.add_step_listener(
        lambda e: batches.append(e.adapters) if e.kind == "decode" else None
    )
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: ask(client, *job, n=24), jobs))
    finally:
        remove()
    assert together == [solo[job] for job in jobs]
    assert max(len(set(b)) for b in batches) >= 2, "no step decoded two adapters together"


def test_busy_engine_is_503(server, engine, monkeypatch):
    def busy(*a, **k):
        raise EngineBusy("the engine is busy")

    monkeypatch.setattr(engine, "submit", busy)
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": "grace", "messages": HI},
        headers=auth(),
    )
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_client_disconnect_cancels_generation(server, engine, monkeypatch):
    handles = []
    submit = engine.submit

    def spy(*a, **k):
        handles.append(submit(*a, **k))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", spy)
    body = {"model": "grace", "messages": HI, "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # leaving the block closes the connection after 3 events
    res = handles[0].result(timeout=60)
    assert res.finish_reason == "cancelled" and res.completion_tokens < 300


def test_client_disconnect_cancels_non_streaming_request(server, engine, monkeypatch):
    handles = []
    submit = engine.submit

    def spy(*a, **k):
        handles.append(submit(*a, **k))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", spy)
    # the tiny model would finish before the client gives up: a listener that takes 20 ms runs
    # on the engine's thread after every step, so it slows decoding down to ~50 tokens/s
    remove = engine.add_step_listener(lambda e: time.sleep(0.02))
    body = {"model": "grace", "messages": HI, "max_tokens": 300, "temperature": 0}
    try:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=0.3)
        res = handles[0].result(timeout=60)
    finally:
        remove()
    assert res.finish_reason == "cancelled" and res.completion_tokens < 300


def test_cli_serve_subprocess(tiny_model_dir, root):
    """The real command: `loraforge serve` boots, answers, and serves the adapter it was given."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "loraforge.cli", "serve",
        "--model", str(tiny_model_dir), "--adapter", f"grace={root / 'grace'}",
        "--port", str(port), "--adapter-root", str(root), "--dtype", "float32",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data][1:] == ["grace"]
        assert ask(client, "grace", n=4) is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_bad_adapter_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", "serve", "--adapter", f"x={tmp_path}"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 1
    assert "adapter_config.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bundled_model_through_the_api():
    """The bundled SmolLM2 behind the real server answers a factual question (greedy)."""
    eng = Engine("smollm2-135m")
    url, srv, thread = start_server(create_app(eng))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=20,
        )
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        eng.close()
