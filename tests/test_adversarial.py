"""A real `loraforge serve` process under hostile and careless clients, over 127.0.0.1 only.

One server (``python -m loraforge.cli serve``: the tiny random Llama, adapter "grace", an
``--adapter-root`` full of traps, an API key, ``--max-tokens 64``) serves the whole module; the
finalizer kills it. Its greedy answers are recorded right after it starts, and the last test
checks that, after everything below, it is still alive and gives the same answers.

Every case asserts the exact status and, for errors, OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Every socket, HTTP call and thread join
has a timeout, and every loop is bounded.

The server runs with OMP_NUM_THREADS=1: on the 2 shared cores of this machine a 2-thread OpenMP
team made each decode step of the tiny model ~20x slower whenever another process was busy
(64 tokens: 5.3 s against 0.24 s), which would swamp this file's time budget.

Five cases here first failed because of the engine (loraforge.infer), not the server: the tiny
temperature/penalty extremes, unloading an adapter while its requests stream, and a mis-shaped
adapter; each says so. A case that fails because of the engine gets
``@pytest.mark.xfail(strict=True, reason="engine: ...")`` until the engine is fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from helpers import make_adapter

from loraforge.bench.served import free_port, stop_server
from loraforge.serve.app import MAX_BODY_BYTES

KEY = "adv-key"
CAP = 64  # the server's --max-tokens
CTX = 2048  # the tiny model's max_position_embeddings, the server's context
T = 30.0  # seconds: the most any one HTTP call, socket read or thread join may take
HI = [{"role": "user", "content": "Hello there, who are you?"}]
N = 16  # completion tokens of the reference answers
JSON = {"Content-Type": "application/json"}


# ---- the server -----------------------------------------------------------------------------


@dataclass
class Srv:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    base: str = ""
    ref: dict = field(default_factory=dict)  # (model, max_tokens) -> greedy text


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A dir outside the adapter root (a copy of "late" is put in it as "evil")."""
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory, outside) -> Path:
    """The --adapter-root: "grace" (served from the start), "late" (loaded at runtime), "nan"
    (lora_B all NaN), "shaky" (lora_A of another hidden size), and traps: "linkdir" (a symlink
    to an adapter outside), "linkfile" (its weights file links outside), a symlink loop and a
    dangling symlink."""
    r = tmp_path_factory.mktemp("adapter-root")
    evil = outside / "evil"
    make_adapter(tiny_model_dir, r / "grace", seed=1)
    make_adapter(tiny_model_dir, r / "late", seed=2)
    shutil.copytree(r / "late", evil)

    import torch
    from safetensors.torch import load_file, save_file

    weights = r / "late" / "adapter_model.safetensors"
    for name, change in (
        ("nan", lambda k, t: torch.full_like(t, float("nan")) if "lora_B" in k else t),
        ("shaky", lambda k, t: t[:, : t.shape[1] // 2].contiguous() if "lora_A" in k else t),
    ):
        shutil.copytree(r / "late", r / name)
        tensors = {k: change(k, t) for k, t in load_file(weights).items()}
        save_file(tensors, r / name / "adapter_model.safetensors")
    (r / "linkdir").symlink_to(evil, target_is_directory=True)
    shutil.copytree(r / "late", r / "linkfile")
    (r / "linkfile" / "adapter_model.safetensors").unlink()
    (r / "linkfile" / "adapter_model.safetensors").symlink_to(evil / "adapter_model.safetensors")
    (r / "loop").symlink_to(r / "loop")
    (r / "dangling").symlink_to(r.parent / "no-such-file-anywhere")
    return r


@pytest.fixture(scope="module")
def srv(tiny_model_dir, root, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [
        sys.executable, "-m", "loraforge.cli", "serve",
        "--model", str(tiny_model_dir), "--adapter", f"grace={root / 'grace'}",
        "--adapter-root", str(root), "--api-key", KEY, "--port", str(port),
        "--max-tokens", str(CAP), "--max-batch", "8", "--dtype", "float32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    s = Srv(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                r = httpx.get(f"{s.url}/health", timeout=2)
                if r.status_code == 200:
                    s.base = r.json()["model"]
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "loraforge serve did not come up in 120 s"
            time.sleep(0.2)
        for model, n in ((s.base, N), ("grace", N), (s.base, CAP)):
            s.ref[(model, n)] = answer(chat(s, model, n))
        assert s.ref[(s.base, N)] != s.ref[("grace", N)]  # the adapter really is in use
        yield s
    finally:
        stop_server(proc)


# ---- clients --------------------------------------------------------------------------------


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def post(srv: Srv, path: str, body=None, *, raw: bytes | None = None, headers=None, key=True):
    """POST ``body`` as JSON (``json.dumps``: NaN allowed, lone surrogates escaped) or ``raw``."""
    content = raw if raw is not None else json.dumps(body).encode()
    h = {**JSON, **(auth() if key else {}), **(headers or {})}
    h = {k: v for k, v in h.items() if v is not None}
    return httpx.post(srv.url + path, content=content, headers=h, timeout=T)


def chat(srv: Srv, model: str, n: int = N, **kw) -> httpx.Response:
    body = {"model": model, "messages": HI, "max_tokens": n, "temperature": 0, **kw}
    return post(srv, "/v1/chat/completions", body)


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= CAP
    return choice["message"]["content"]


def models(srv: Srv) -> list[str]:
    r = httpx.get(f"{srv.url}/v1/models", headers=auth(), timeout=T)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def load(srv: Srv, name: str, path: str) -> httpx.Response:
    return post(srv, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def unload(srv: Srv, name: str) -> httpx.Response:
    return post(srv, "/v1/unload_lora_adapter", {"lora_name": name})


def check_error(r, status: int, *, param=None, code=None, type="invalid_request_error", says=""):
    """The exact status and OpenAI's error shape; ``param`` may be refined by pydantic (a union
    member: "messages.0.content.str" for "messages.0.content")."""
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == type, err
    if code is None:  # every error carries a stable code a client can branch on
        assert isinstance(err["code"], str) and err["code"], err
    else:
        assert err["code"] == code, err
    if param is None:
        assert err["param"] is None, err
    else:
        assert err["param"] == param or str(err["param"]).startswith(param + "."), err
    assert says in err["message"], err


class Stream(threading.Thread):
    """One streamed greedy chat completion, read on its own thread. ``first`` is set at the
    first content delta (or when the stream ends); ``vanish`` closes the connection then."""

    def __init__(self, srv: Srv, model: str, n: int = N, vanish: bool = False, **extra):
        super().__init__(daemon=True)
        self.body = {
            "model": model, "messages": HI, "max_tokens": n, "temperature": 0, "stream": True,
            **extra,
        }  # fmt: skip
        self.srv, self.vanish = srv, vanish
        self.first = threading.Event()
        self.status: int | None = None
        self.text = ""
        self.errors: list[dict] = []
        self.finish: str | None = None
        self.done = False  # saw "data: [DONE]"
        self.exc: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=T) as c,
                c.stream(
                    "POST",
                    f"{self.srv.url}/v1/chat/completions",
                    content=json.dumps(self.body),
                    headers={**JSON, **auth()},
                ) as r,
            ):
                self.status = r.status_code
                if r.status_code != 200:
                    r.read()
                    self.errors.append(r.json().get("error"))
                    return
                for line in r.iter_lines():
                    if not line:
                        continue
                    assert line.startswith("data: "), line
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        self.errors.append(event["error"])
                        continue
                    choice = event["choices"][0]
                    self.finish = choice["finish_reason"] or self.finish
                    if choice["delta"].get("content"):
                        self.text += choice["delta"]["content"]
                        self.first.set()
                        if self.vanish:
                            return  # leaving the block drops the connection mid-stream
        except BaseException as e:  # noqa: BLE001 - reported by the test's assertions
            self.exc = e
        finally:
            self.first.set()

    def wait(self) -> Stream:
        self.join(T)
        assert not self.is_alive(), "a stream did not end in time"
        return self

    def assert_whole(self, want: str) -> None:
        assert self.exc is None, repr(self.exc)
        assert self.status == 200 and not self.errors, (self.status, self.errors)
        assert self.done and self.finish in ("stop", "length"), (self.done, self.finish)
        assert self.text == want


def start_all(threads) -> list:
    threads = list(threads)
    for t in threads:
        t.start()
    return threads


def in_flight(streams: list[Stream]) -> None:
    """Wait until each stream has its first delta, so it sits in the engine's running batch."""
    for s in streams:
        assert s.first.wait(T), "a stream never started"
        assert s.text, (s.status, s.errors, s.exc)


def raw_exchange(srv: Srv, parts: list[bytes], delay: float = 0.0) -> httpx.Response:
    """Send ``parts`` over a bare socket (``delay`` s apart) and read one HTTP/1.1 response."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=T) as s:
        for part in parts:
            try:
                s.sendall(part)
            except OSError:  # the server answered (and closed) before taking all of it
                break
            if delay:
                time.sleep(delay)
        return read_response(s)


def read_response(s: socket.socket) -> httpx.Response:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {buf[:200]!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-response"
        body += chunk
    return httpx.Response(int(lines[0].split()[1]), content=body)


def chat_request_bytes(body: dict, extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + data


# ---- auth -----------------------------------------------------------------------------------

AUTH_CASES = [
    ("missing", {}, "", 401),
    ("wrong-key", {"Authorization": "Bearer nope"}, "", 401),
    ("key-upper-cased", {"Authorization": f"Bearer {KEY.upper()}"}, "", 401),
    ("key-prefix", {"Authorization": f"Bearer {KEY[:-1]}"}, "", 401),
    ("key-plus-suffix", {"Authorization": f"Bearer {KEY}x"}, "", 401),
    ("basic-scheme", {"Authorization": f"Basic {KEY}"}, "", 401),
    ("no-scheme", {"Authorization": KEY}, "", 401),
    ("empty-bearer", {"Authorization": "Bearer"}, "", 401),
    ("x-api-key-header", {"X-Api-Key": KEY}, "", 401),
    ("key-in-query", {}, f"?api_key={KEY}", 401),
    ("key-in-query-as-authorization", {}, f"?key={KEY}&authorization=Bearer%20{KEY}", 401),
    # RFC 7235: the auth scheme is case-insensitive (the token is not)
    ("scheme-odd-cased", {"Authorization": f"bEaReR {KEY}"}, "", 200),
    ("scheme-upper-cased", {"Authorization": f"BEARER {KEY}"}, "", 200),
    ("header-name-lower-cased", {"authorization": f"Bearer {KEY}"}, "", 200),
]


@pytest.mark.parametrize("headers, query, status", [c[1:] for c in AUTH_CASES],
                         ids=[c[0] for c in AUTH_CASES])  # fmt: skip
def test_auth(srv, headers, query, status):
    body = {"model": srv.base, "messages": HI, "max_tokens": 2, "temperature": 0}
    r = httpx.post(
        f"{srv.url}/v1/chat/completions{query}",
        content=json.dumps(body),
        headers={**JSON, **headers},
        timeout=T,
    )
    if status == 200:
        answer(r)
    else:
        check_error(r, 401, code="invalid_api_key")


@pytest.mark.parametrize("path, status", [("/health", 200), ("/health/", 401), ("/HEALTH", 401),
                                          ("//health", 401), ("/v1/models", 401)])  # fmt: skip
def test_only_health_is_open(srv, path, status):
    r = httpx.get(srv.url + path, timeout=T)
    if status == 200:
        assert r.status_code == 200 and r.json()["status"] == "ok"
    else:
        check_error(r, 401, code="invalid_api_key")


def test_key_is_checked_before_the_body_size(srv):
    """No key and a body declared over the limit: 401, and the body is never read."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    )
    check_error(raw_exchange(srv, [head.encode()]), 401, code="invalid_api_key")


# ---- schema ---------------------------------------------------------------------------------


def _chat(**kw) -> dict:
    return {"model": "grace", "messages": HI, "max_tokens": 2, "temperature": 0, **kw}


def _msg(**kw) -> dict:
    return _chat(messages=[{"role": "user", "content": "hi", **kw}])


DEEP = 900  # nesting the JSON parser still takes; pydantic and our checks must cope with it
C, P, S = "/v1/chat/completions", "/v1/completions", "/chat"
# (id, path, body: dict -> json.dumps | bytes -> sent as is, headers, status, param, says)
BAD = [
    # wrong types
    ("messages-a-string", C, _chat(messages="hi"), None, 400, "messages", ""),
    ("messages-an-object", C, _chat(messages={"role": "user", "content": "x"}), None, 400,
     "messages", ""),
    ("model-an-int", C, _chat(model=123), None, 400, "model", ""),
    ("max-tokens-a-word", C, _chat(max_tokens="abc"), None, 400, "max_tokens", ""),
    ("max-tokens-fractional", C, _chat(max_tokens=5.5), None, 400, "max_tokens", ""),
    ("temperature-a-word", C, _chat(temperature="hot"), None, 400, "temperature", ""),
    ("stream-a-list", C, _chat(stream=[]), None, 400, "stream", ""),
    ("stream-options-a-string", C, _chat(stream_options="x"), None, 400, "stream_options", ""),
    ("content-an-int", C, _msg(content=5), None, 400, "messages.0.content", ""),
    ("content-part-null", C, _msg(content=[None]), None, 400, "messages.0.content", ""),
    ("content-part-image", C, _msg(content=[{"type": "image_url"}]), None, 400, "messages",
     "not text"),
    # nulls
    ("messages-null", C, _chat(messages=None), None, 400, "messages", ""),
    ("message-null", C, _chat(messages=[None]), None, 400, "messages.0", ""),
    ("role-null", C, _msg(role=None), None, 400, "messages.0.role", ""),
    # huge numbers
    ("max-tokens-1e30", C, _chat(max_tokens=10**30), None, 400, "max_tokens", "limit of 64"),
    ("max-completion-tokens-1e30", C, _chat(max_completion_tokens=10**30), None, 400,
     "max_tokens", "limit of 64"),
    ("seed-2**70", C, _chat(seed=2**70), None, 400, "seed", ""),
    ("max-tokens-1e400-literal", C,
     b'{"model":"grace","messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}', None,
     400, "max_tokens", "finite"),
    ("int-of-5000-digits", C,
     b'{"model":"grace","messages":[{"role":"user","content":"hi"}],"max_tokens":'
     + b"9" * 5000 + b"}", None, 400, None, ""),
    # NaN and Infinity (Python's JSON parser takes them)
    ("temperature-NaN", C, _chat(temperature=float("nan")), None, 400, "temperature", ""),
    ("temperature-Infinity", C, _chat(temperature=float("inf")), None, 400, "temperature", ""),
    ("temperature--Infinity", C, _chat(temperature=float("-inf")), None, 400, "temperature",
     ""),
    ("top-p-NaN", C, _chat(top_p=float("nan")), None, 400, "top_p", ""),
    ("max-tokens-NaN", C, _chat(max_tokens=float("nan")), None, 400, "max_tokens", ""),
    ("repetition-penalty-Infinity", C, _chat(repetition_penalty=float("inf")), None, 400,
     "repetition_penalty", "finite"),
    ("repetition-penalty-NaN", C, _chat(repetition_penalty=float("nan")), None, 400,
     "repetition_penalty", ""),
    # roles and messages
    ("role-wizard", C, _msg(role="wizard"), None, 400, "messages.0.role", "unknown role"),
    ("role-upper-cased", C, _msg(role="USER"), None, 400, "messages.0.role", "unknown role"),
    ("role-empty", C, _msg(role=""), None, 400, "messages.0.role", "unknown role"),
    ("messages-empty", C, _chat(messages=[]), None, 400, "messages", "must not be empty"),
    ("messages-missing", C, {"model": "grace"}, None, 400, "messages", ""),
    ("n-129", C, _chat(n=129), None, 400, "n", ""),
    ("top-logprobs-21", C, _chat(logprobs=True, top_logprobs=21), None, 400, "top_logprobs", ""),
    ("65-stops", C, _chat(stop=[f"s{i}" for i in range(65)]), None, 400, "stop", "at most 64"),
    ("empty-stop", C, _chat(stop=[""]), None, 400, "stop", ""),
    ("completions-logprobs-6", P, {"prompt": "hi", "logprobs": 6, "max_tokens": 2}, None, 400,
     "logprobs", ""),
    ("completions-empty-prompt", P, {"prompt": "", "max_tokens": 2}, None, 400, "prompt", ""),
    ("completions-token-id-out-of-vocab", P, {"prompt": [[1, 10**9]], "max_tokens": 2}, None,
     400, "prompt", "prompt[0][1]"),
    ("simple-chat-empty-message", S, {"message": ""}, None, 400, "message", ""),
    # lone surrogates: valid JSON escapes, invalid Unicode (the tokenizer and UTF-8 refuse them)
    ("surrogate-content", C, _msg(content="\ud800"), None, 400, "messages.0.content",
     "lone surrogate"),
    ("surrogate-low-mid-string", C, _msg(content="a\udfffb"), None, 400,
     "messages.0.content", "lone surrogate"),
    ("surrogate-content-part", C, _msg(content=[{"type": "text", "text": "\udc80"}]), None,
     400, "messages.0.content.0.text", "lone surrogate"),
    ("surrogate-model", C, _chat(model="\ud800"), None, 400, "model", "lone surrogate"),
    ("surrogate-stop", C, _chat(stop="\ud800"), None, 400, "stop", "lone surrogate"),
    ("surrogate-ignored-field", C, _chat(user="\ud800"), None, 400, "user", "lone surrogate"),
    ("surrogate-key", C, {**_chat(), "\ud800": 1}, None, 400, "\\ud800", "lone surrogate"),
    ("surrogate-completions-prompt", P, {"prompt": "\ud800", "max_tokens": 2}, None, 400,
     "prompt", "lone surrogate"),
    ("surrogate-simple-chat", S, {"message": "\ud800"}, None, 400, "message",
     "lone surrogate"),
    ("surrogate-simple-chat-history", S,
     {"message": "hi", "history": [{"role": "user", "content": "\ud800"}]}, None, 400,
     "history.0.content", "lone surrogate"),
    # deep nesting
    ("nested-100000-deep", C, b"[" * 100_000 + b"]" * 100_000, None, 400, None, ""),
    ("nested-content", C,
     b'{"model":"grace","messages":[{"role":"user","content":' + b"[" * DEEP + b"]" * DEEP
     + b"}]}", None, 400, "messages.0.content", ""),
    ("nested-stop", C,
     b'{"model":"grace","messages":[{"role":"user","content":"hi"}],"stop":' + b"[" * DEEP
     + b"]" * DEEP + b"}", None, 400, "stop", ""),
    # not an object
    ("body-a-list", C, [1, 2, 3], None, 400, None, "must be a JSON object"),
    ("body-a-string", C, "hello", None, 400, None, "must be a JSON object"),
    ("body-null", C, None, None, 400, None, "must be a JSON object"),
    ("body-a-number", C, 42, None, 400, None, "must be a JSON object"),
    ("body-true", C, True, None, 400, None, "must be a JSON object"),
    ("body-empty", C, b"", None, 400, None, "body is missing"),
    ("body-not-json", C, b"{not json", None, 400, None, "invalid JSON"),
    ("body-trailing-garbage", C, json.dumps(_chat()).encode() + b" x", None, 400, None,
     "invalid JSON"),
    ("body-latin-1", C, '{"model":"grace","messages":[{"role":"user","content":"é"}]}'
     .encode("latin-1"), None, 400, None, ""),
    # content types
    ("content-type-text-plain", C, _chat(), {"Content-Type": "text/plain"}, 400, None,
     "must be a JSON object"),
    ("content-type-form", C, _chat(), {"Content-Type": "application/x-www-form-urlencoded"},
     400, None, "must be a JSON object"),
    ("content-type-missing", C, _chat(), {"Content-Type": None}, 400, None,
     "must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, headers, status, param, says", [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])  # fmt: skip
def test_bad_request(srv, path, body, headers, status, param, says):
    raw = body if isinstance(body, bytes) else None
    r = post(srv, path, body, raw=raw, headers=headers)
    check_error(r, status, param=param, says=says)


ODD_BUT_VALID = [
    ("content-null", _msg(content=None), None),
    ("content-empty", _msg(content=""), None),
    ("content-no-parts", _msg(content=[]), None),
    ("content-text-part", _msg(content=[{"type": "text", "text": "hi"}]), None),
    ("surrogate-pair", _msg(content="\ud83d\ude00"), None),  # one character: 😀
    ("only-an-assistant-turn", _msg(role="assistant"), None),
    ("developer-role", _msg(role="developer"), None),
    ("unknown-fields-ignored", _chat(user="u", metadata={"k": "v"}),
     None),
    ("deep-ignored-field", b'{"user":' + b"[" * DEEP + b"]" * DEEP + b","
     + json.dumps(_chat()).encode()[1:], None),
    ("json-with-charset", _chat(), {"Content-Type": "application/json; charset=utf-8"}),
    ("14-stops-as-continue-sends", _chat(stop=[f"\n{i}" for i in range(14)]), None),
    ("n-and-stream-null", _chat(n=None, stream=None), None),
    ("top-k-1e30", _chat(top_k=10**30, temperature=1.0, seed=3), None),
    ("seed-min-int64", _chat(seed=-(2**63), temperature=1.0), None),
    ("duplicate-keys-last-wins", b'{"model":"nope","model":"grace","messages":'
     b'[{"role":"user","content":"hi"}],"max_tokens":2}', None),
]  # fmt: skip


@pytest.mark.parametrize("body, headers", [c[1:] for c in ODD_BUT_VALID],
                         ids=[c[0] for c in ODD_BUT_VALID])  # fmt: skip
def test_odd_but_valid_request_is_answered(srv, body, headers):
    raw = body if isinstance(body, bytes) else None
    answer(post(srv, "/v1/chat/completions", body, raw=raw, headers=headers))


def test_unknown_model_path_and_method(srv):
    check_error(
        chat(srv, "no-such-model"), 404, param="model", code="model_not_found",
        type="not_found_error", says="no-such-model",
    )  # fmt: skip
    r = httpx.get(f"{srv.url}/v1/no-such-endpoint", headers=auth(), timeout=T)
    check_error(r, 404, type="not_found_error")
    r = httpx.get(f"{srv.url}/v1/chat/completions", headers=auth(), timeout=T)
    check_error(r, 405)


# ---- sizes ----------------------------------------------------------------------------------


def test_body_over_the_limit_by_content_length_is_413(srv):
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    )
    r = raw_exchange(srv, [head.encode(), b"{" + b" " * 1000])
    check_error(r, 413, code="request_too_large")


def test_chunked_body_over_the_limit_is_413(srv):
    """No Content-Length: the limit counts the chunks as they come (this was a 400)."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}"
        f"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    size = 256 * 1024
    chunk = f"{size:x}\r\n".encode() + b" " * size + b"\r\n"
    parts = [head.encode()] + [chunk] * (MAX_BODY_BYTES // size + 1) + [b"0\r\n\r\n"]
    check_error(raw_exchange(srv, parts), 413, code="request_too_large")


def test_chunked_body_under_the_limit_is_answered(srv):
    data = json.dumps(_chat(model=srv.base, max_tokens=N)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}"
        f"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    parts = [head.encode()] + [
        f"{len(data[i : i + 7]):x}\r\n".encode() + data[i : i + 7] + b"\r\n"
        for i in range(0, len(data), 7)
    ]
    r = raw_exchange(srv, [*parts, b"0\r\n\r\n"])
    assert answer(r) == srv.ref[(srv.base, N)]


def test_max_tokens_over_the_cap_is_400(srv):
    check_error(chat(srv, "grace", CAP + 1), 400, param="max_tokens", says=f"limit of {CAP}")


def test_no_max_tokens_is_capped_by_the_server_limit(srv):
    """Without max_tokens a request got 512 tokens, whatever --max-tokens said (fixed)."""
    body = {"model": srv.base, "messages": HI, "temperature": 0}
    r = post(srv, "/v1/chat/completions", body)
    answer(r)
    assert r.json()["usage"]["completion_tokens"] <= CAP


LONG = "word " * (CTX + 500)


@pytest.mark.parametrize(
    "path, body, says",
    [
        (C, {"model": "grace", "messages": [{"role": "user", "content": LONG}]}, "alone"),
        (C, {"model": "grace", "messages": [{"role": "user", "content": "word " * (CTX - 60)}],
             "max_tokens": CAP}, "you requested"),
        (P, {"prompt": LONG, "max_tokens": 2}, "alone"),
        (S, {"message": LONG}, "alone"),
    ],
    ids=["chat-prompt-alone", "chat-prompt-plus-max-tokens", "completions", "simple-chat"],
)  # fmt: skip
def test_prompt_over_the_context_is_400(srv, path, body, says):
    r = post(srv, path, body)
    # the server names "messages" as the param on every endpoint, /v1/completions' prompt too
    check_error(r, 400, param="messages", code="context_length_exceeded", says=says)
    assert f"maximum context length is {CTX}" in r.json()["error"]["message"]


# ---- sampling extremes ----------------------------------------------------------------------

# Engine bug found here (fixed since): the tiny temperatures and the tiny penalty with sampling
# divided the logits into inf, softmax made NaN and torch.multinomial raised (a 500); and the
# request that failed in Engine._prefill stayed in the running batch, whose next decode step
# then failed (IndexError) every request in flight.
EXTREMES = [
    pytest.param({"temperature": 1e-300}, id="temperature-1e-300"),
    pytest.param({"temperature": 5e-324}, id="temperature-denormal"),
    pytest.param({"top_p": 1e-300, "temperature": 1.0}, id="top-p-1e-300"),
    pytest.param({"repetition_penalty": 1e-300}, id="repetition-penalty-1e-300"),
    pytest.param({"repetition_penalty": 1e-300, "temperature": 0},
                 id="repetition-penalty-1e-300-greedy"),
    pytest.param({"repetition_penalty": 1e300}, id="repetition-penalty-1e300"),
    pytest.param({"top_k": 1, "temperature": 2.0, "top_p": 1e-300}, id="all-narrow"),
]  # fmt: skip


@pytest.mark.parametrize("extreme", EXTREMES)
def test_sampling_extreme_is_200_or_400_and_spares_the_batch(srv, extreme):
    """A 200 or a 400 for the extreme request, never a 500, and a greedy stream on the base
    model in flight meanwhile still gets its whole, unchanged answer."""
    bystander = start_all([Stream(srv, srv.base, CAP)])[0]
    in_flight([bystander])
    body = {"model": "grace", "messages": HI, "max_tokens": 8, "seed": 1, **extreme}
    r = post(srv, "/v1/chat/completions", body)
    bystander.wait().assert_whole(srv.ref[(srv.base, CAP)])
    if r.status_code == 200:
        answer(r)
    else:
        check_error(r, 400, param=next(iter(extreme)))


# ---- concurrency ----------------------------------------------------------------------------


def test_20_parallel_streams_with_clients_vanishing(srv):
    """20 streams at once (base and grace, more than the batch of 8); every other client
    drops its connection after its first delta. The rest get exactly the solo answers."""
    streams = [
        Stream(srv, (srv.base, "grace")[i % 2], N if i % 4 < 2 else CAP, vanish=i % 4 >= 2)
        for i in range(20)
    ]
    for s in start_all(streams):
        s.wait()
    for s in streams:
        if s.vanish:
            assert s.exc is None and s.status == 200 and s.text, (s.exc, s.status, s.errors)
        else:
            s.assert_whole(srv.ref[(s.body["model"], N)])
    assert answer(chat(srv, "grace")) == srv.ref[("grace", N)]
    assert answer(chat(srv, srv.base)) == srv.ref[(srv.base, N)]


def test_non_streamed_clients_giving_up(srv):
    """Clients that time out on a non-streamed request (the server cancels those)."""
    outcomes: list = []

    def impatient(i: int) -> None:
        body = {"model": ("grace", srv.base)[i % 2], "messages": HI, "max_tokens": CAP}
        try:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=auth(),
                           timeout=0.05)  # fmt: skip
            outcomes.append(r.status_code)
        except httpx.TimeoutException:
            outcomes.append("gave up")

    threads = start_all(threading.Thread(target=impatient, args=(i,)) for i in range(8))
    for t in threads:
        t.join(T)
        assert not t.is_alive()
    assert set(outcomes) <= {"gave up", 200} and len(outcomes) == 8, outcomes
    assert answer(chat(srv, srv.base)) == srv.ref[(srv.base, N)]


# ---- load/unload races ----------------------------------------------------------------------


def _churn(srv: Srv, name: str, rounds: int, out: list) -> None:
    for _ in range(rounds):
        for path, body in (
            ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": name}),
            ("/v1/unload_lora_adapter", {"lora_name": name}),
        ):
            r = post(srv, path, body)
            out.append((path, r))


def _check_churn(out: list) -> None:
    for path, r in out:
        if r.status_code == 200:
            assert r.json()["status"] == "ok"
        elif path.endswith("/load_lora_adapter"):
            check_error(r, 400, param="lora_name", says="already been loaded")
        else:
            check_error(r, 404, param="lora_name", code="model_not_found",
                        type="not_found_error", says="cannot be found")  # fmt: skip
    loads = sum(r.status_code == 200 for p, r in out if p.endswith("/load_lora_adapter"))
    unloads = sum(r.status_code == 200 for p, r in out if p.endswith("/unload_lora_adapter"))
    assert loads >= 1 and loads - unloads in (0, 1), (loads, unloads)


def _drop(srv: Srv, *names: str) -> None:
    for name in names:
        if name in models(srv):
            assert unload(srv, name).status_code == 200


def test_load_unload_same_name_from_threads(srv):
    """3 threads load and unload "late" 4 times each while greedy streams on the base model
    and on grace run: each call is a 200, a 400 "already loaded" or a 404 "cannot be found",
    the registry ends consistent, and every stream gets its solo answer."""
    out: list = []
    try:
        churners = [threading.Thread(target=_churn, args=(srv, "late", 4, out)) for _ in range(3)]
        streams = [Stream(srv, (srv.base, "grace")[i % 2], N) for i in range(6)]
        start_all(churners + streams[:3])
        for s in streams[:3]:
            s.wait()
        start_all(streams[3:])
        for t in churners + streams[3:]:
            t.join(T)
            assert not t.is_alive()
        for s in streams:
            s.assert_whole(srv.ref[(s.body["model"], N)])
        assert len(out) == 3 * 4 * 2  # every call answered
        _check_churn(out)
        loaded = sum(
            (1 if p.endswith("/load_lora_adapter") else -1) for p, r in out if r.status_code == 200
        )
        assert ("late" in models(srv)) == (loaded == 1)
    finally:
        _drop(srv, "late")


def test_unload_while_its_requests_stream_spares_the_others(srv):
    """The adapter "late" is unloaded while 2 streams on it and 2 on the base model are
    mid-answer, then loaded and unloaded from 2 threads while more streams on it start. The
    streams on "late" may end early (an in-band error), but each ends with [DONE]; the base
    ones must all get their whole answer.

    Engine bug found here (fixed since): Engine._step passed the unloaded name to
    Runner.lora_rows, whose bank lookup raised ValueError and failed the whole batch, base-model
    requests included."""
    assert load(srv, "late", "late").status_code == 200
    out: list = []
    try:
        base = [Stream(srv, srv.base, CAP) for _ in range(2)]
        late = [Stream(srv, "late", CAP) for _ in range(2)]
        in_flight(start_all(base + late))
        r = unload(srv, "late")
        assert r.status_code == 200, r.text
        churners = [threading.Thread(target=_churn, args=(srv, "late", 3, out)) for _ in range(2)]
        more = [Stream(srv, "late", CAP) for _ in range(3)]
        start_all(churners + more)
        for t in base + late + churners + more:
            t.join(T)
            assert not t.is_alive()
        for s in base:
            s.assert_whole(srv.ref[(srv.base, CAP)])
        for s in late + more:
            assert s.exc is None, repr(s.exc)
            if s.status == 200:
                assert s.done
            else:
                assert s.status == 404, (s.status, s.errors)
        assert len(out) == 2 * 3 * 2  # every call answered
        _check_churn(out)
    finally:
        _drop(srv, "late")


# ---- runtime adapter paths ------------------------------------------------------------------

PATHS = [
    ("dotdot", "e", "..", "lora_path", "must not contain '..'"),
    ("dotdot-escape", "e", "../outside/evil", "lora_path", "must not contain '..'"),
    ("dotdot-inside", "e", "grace/../grace", "lora_path", "must not contain '..'"),
    ("absolute-outside", "e", "{outside}", "lora_path", "outside the adapter root"),
    ("absolute-etc", "e", "/etc", "lora_path", "outside the adapter root"),
    ("home", "e", "~", "lora_path", "outside the adapter root"),
    ("symlinked-dir", "e", "linkdir", "lora_path", "outside the adapter root"),
    ("symlinked-weights", "e", "linkfile", "lora_path", "links outside the adapter root"),
    ("symlink-loop", "e", "loop", "lora_path", "unusable path"),
    ("dangling-symlink", "e", "dangling", "lora_path", ""),
    ("root-itself", "e", ".", "lora_path", ""),
    ("a-file", "e", "grace/adapter_config.json", "lora_path", "no such adapter dir"),
    ("missing", "e", "no-such-dir", "lora_path", "no such adapter dir"),
    ("path-component-300-bytes", "e", "a" * 300, "lora_path", "unusable path"),
    ("path-component-400-bytes-200-chars", "e", "é" * 200, "lora_path", "unusable path"),
    ("path-nul", "e", "gra\x00ce", "lora_path", "unusable path"),
    ("path-surrogate", "e", "\ud800", "lora_path", ""),
    ("path-empty", "e", "", "lora_path", ""),
    ("name-300-bytes", "n" * 300, "late", "lora_name", ""),
    ("name-nul", "la\x00te", "late", "lora_name", ""),
    ("name-dotdot", "../x", "late", "lora_name", ""),
    ("name-slash", "a/b", "late", "lora_name", ""),
    ("name-empty", "", "late", "lora_name", ""),
    ("name-surrogate", "\ud800", "late", "lora_name", ""),
    ("name-already-loaded", "grace", "late", "lora_name", "already been loaded"),
    ("name-of-the-base", "{base}", "late", "lora_name", "already been loaded"),
]  # fmt: skip


@pytest.mark.parametrize("name, path, param, says", [c[1:] for c in PATHS],
                         ids=[c[0] for c in PATHS])  # fmt: skip
def test_load_adapter_path_tricks_are_400(srv, outside, name, path, param, says):
    name = name.replace("{base}", srv.base)
    path = path.replace("{outside}", str(outside / "evil"))
    check_error(load(srv, name, path), 400, param=param, says=says)
    assert models(srv) == [srv.base, "grace"]


def test_load_adapter_missing_fields_and_unknown_unload(srv):
    check_error(post(srv, "/v1/load_lora_adapter", {"lora_name": "x"}), 400, param="lora_path")
    check_error(post(srv, "/v1/load_lora_adapter", {"lora_path": "late"}), 400, param="lora_name")
    for name in ("nope", srv.base):
        check_error(unload(srv, name), 404, param="lora_name", code="model_not_found",
                    type="not_found_error")  # fmt: skip


def test_load_by_absolute_path_inside_the_root(srv, root):
    try:
        r = load(srv, "late-abs", str(root / "late"))
        assert r.status_code == 200, r.text
        assert answer(chat(srv, "late-abs")) not in (srv.ref[(srv.base, N)], srv.ref[("grace", N)])
    finally:
        _drop(srv, "late-abs")


def test_mis_shaped_adapter_is_refused_and_leaves_no_name(srv):
    """lora_A of another hidden size: a 400, the name is not listed, later loads work.

    Engine bug found here (fixed since): read_lora did not check shapes, Runner.set_adapters
    then raised RuntimeError (a 500) after Engine.load_adapter had put the name in its adapters:
    the name stayed listed and every later load failed the same way."""
    try:
        check_error(load(srv, "shaky", "shaky"), 400, param="lora_path")
        assert "shaky" not in models(srv)
        assert load(srv, "late", "late").status_code == 200
    finally:
        _drop(srv, "shaky", "late")


def test_nan_adapter_is_refused(srv):
    """An adapter dir inside the root whose lora_B is all NaN.

    Which behaviour is tested, decided by reading the engine: loading it is REFUSED with a 400
    (param lora_path). loraforge.infer.lora_bank.read_lora checks that every A/B pair has the
    model's shapes and holds finite floats before anything is built from it, and a load that
    fails leaves the bank in use untouched. So the name is never listed nor served, and a
    stream in flight meanwhile, and grace afterwards, keep their answers."""
    bystander = start_all([Stream(srv, srv.base, CAP)])[0]
    in_flight([bystander])
    try:
        check_error(load(srv, "nan", "nan"), 400, param="lora_path", says="NaN")
    finally:
        _drop(srv, "nan")
    bystander.wait().assert_whole(srv.ref[(srv.base, CAP)])
    assert models(srv) == [srv.base, "grace"]
    check_error(chat(srv, "nan"), 404, param="model", code="model_not_found",
                type="not_found_error")  # fmt: skip
    assert answer(chat(srv, "grace")) == srv.ref[("grace", N)]


# ---- slow clients ---------------------------------------------------------------------------


def test_slow_headers_do_not_block_other_clients(srv):
    """20 sockets dribble header lines (slowloris): 4 normal requests meanwhile are answered
    at once; when the 20 finish their headers, each gets its 401 (they sent no key)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=T)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        for i in range(4):
            for s in socks:
                s.sendall(f"X-Slow-{i}: {'z' * 50}\r\n".encode())
            t = time.monotonic()
            assert answer(chat(srv, srv.base)) == srv.ref[(srv.base, N)]
            assert time.monotonic() - t < 10
            time.sleep(0.2)
        for s in socks:
            s.sendall(b"Content-Length: 0\r\n\r\n")
        for s in socks:
            check_error(read_response(s), 401, code="invalid_api_key")
    finally:
        for s in socks:
            s.close()


def test_slow_body_and_a_body_cut_off(srv):
    """One socket sends a request's headers and half its body, then stalls; another sends half
    a body and vanishes. Others are answered meanwhile; the stalled one, once finished, gets
    its answer."""
    data = chat_request_bytes(_chat(model=srv.base, max_tokens=N))
    half = len(data) - 20
    with socket.create_connection(("127.0.0.1", srv.port), timeout=T) as stalled:
        stalled.sendall(data[:half])
        with socket.create_connection(("127.0.0.1", srv.port), timeout=T) as cut:
            cut.sendall(data[:half])
        assert answer(chat(srv, "grace")) == srv.ref[("grace", N)]
        time.sleep(0.3)
        assert answer(chat(srv, srv.base)) == srv.ref[(srv.base, N)]
        stalled.sendall(data[half:])
        assert answer(read_response(stalled)) == srv.ref[(srv.base, N)]


def test_request_sent_a_few_bytes_at_a_time(srv):
    data = chat_request_bytes(_chat(model="grace", max_tokens=N))
    parts = [data[i : i + 16] for i in range(0, len(data), 16)]
    t = time.monotonic()
    r = raw_exchange(srv, parts, delay=0.01)
    assert answer(r) == srv.ref[("grace", N)]
    assert time.monotonic() - t < T


# ---- the end --------------------------------------------------------------------------------


def test_zz_still_alive_with_the_same_answers(srv):
    """Last in the file: after all of the above, the same process answers as at the start."""
    assert srv.proc.poll() is None, srv.log.read_text()[-4000:]
    r = httpx.get(f"{srv.url}/health", timeout=T)
    assert r.status_code == 200 and r.json() == {
        "status": "ok", "model": srv.base, "adapters": ["grace"],
    }  # fmt: skip
    assert models(srv) == [srv.base, "grace"]
    for (model, n), want in srv.ref.items():
        assert answer(chat(srv, model, n)) == want, (model, n)
    assert srv.proc.poll() is None
