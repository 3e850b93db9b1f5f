"""The server under clients that send too much, and after its engine died."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import make_adapter

from loraforge.infer.engine import Engine
from loraforge.serve.app import create_app


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=2, max_queue=4)
    yield eng
    eng.close()


def test_body_over_the_limit_is_413_before_parsing(engine):
    app = create_app(engine, max_body_bytes=1000)
    with TestClient(app) as c:
        big = {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 1}
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert c.post("/v1/chat/completions", json=ok).status_code == 200


def test_wait_pool_holds_every_request_the_engine_can(engine):
    app = create_app(engine)
    server = app.state.server
    assert server.pool._max_workers >= engine.max_queue + engine.max_batch


def test_adapter_count_is_capped(engine, tiny_model_dir, tmp_path):
    for name in ("a", "b"):
        make_adapter(tiny_model_dir, tmp_path / name, seed=len(name))
    app = create_app(engine, adapter_root=tmp_path)
    app.state.server.registry.max_adapters = 1
    with TestClient(app) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
        assert r.status_code == 200
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"})
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200


def test_health_says_so_when_the_engine_died(tiny_model_dir):
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=1)
    app = create_app(eng)
    with TestClient(app) as c:
        assert c.get("/health").json()["status"] == "ok"
        eng.close()
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error"


def test_unload_is_gated_like_load(tiny_model_dir, tmp_path):
    """Without --adapter-root a client may neither load nor unload: the startup adapters stay."""
    make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=1, adapters={"a": tmp_path / "a"})
    try:
        with TestClient(create_app(eng)) as c:
            r = c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
            assert r.status_code == 400 and "--adapter-root" in r.json()["error"]["message"]
            assert "a" in [m["id"] for m in c.get("/v1/models").json()["data"]]
    finally:
        eng.close()
