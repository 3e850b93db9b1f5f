"""What common OpenAI clients send beyond the basics: many stop words (Continue), nullable
fields, ``models.retrieve``, browser origins (CORS), and a stable ``code`` on every error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import make_adapter, start_server

from loraforge.infer.engine import Engine
from loraforge.serve.app import create_app

HI = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    grace = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("a") / "grace", seed=1)
    eng = Engine(str(tiny_model_dir), {"grace": grace}, dtype="float32", max_batch=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, api_key="k")) as c:
        c.headers["Authorization"] = "Bearer k"
        yield c


def chat(client, **kw):
    body = {"model": "grace", "messages": HI, "max_tokens": 12, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def test_fourteen_stop_words_are_taken_and_applied(client):
    full = chat(client).json()["choices"][0]["message"]["content"]
    assert len(full) > 4
    cut_at = full[3:5]  # a stop word taken from inside the greedy answer, among 13 others
    stops = [f"<never{i}>" for i in range(13)] + [cut_at]
    r = chat(client, stop=stops)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == full[: full.index(cut_at)]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_more_than_64_stop_words_is_400_naming_stop(client):
    r = chat(client, stop=[f"s{i}" for i in range(65)])
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "stop" and err["code"] == "invalid_value"
    assert "at most 64" in err["message"]


def test_null_n_and_stream_mean_the_defaults(client):
    r = chat(client, n=None, stream=None, stream_options=None)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert (
        r.json()["choices"][0]["message"]["content"]
        == chat(client).json()["choices"][0]["message"]["content"]
    )


def test_models_retrieve(client, engine):
    base = client.get(f"/v1/models/{engine.base_name}")
    assert base.status_code == 200 and base.json()["id"] == engine.base_name
    assert base.json()["parent"] is None
    grace = client.get("/v1/models/grace").json()
    assert grace["id"] == "grace" and grace["parent"] == engine.base_name
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["grace"] == grace
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_models_retrieve_through_the_openai_client(engine):
    """``client.models.retrieve`` (openai SDK) against a real HTTP server."""
    openai = pytest.importorskip("openai")
    url, srv, thread = start_server(create_app(engine))
    try:
        model = openai.OpenAI(base_url=f"{url}/v1", api_key="x").models.retrieve("grace")
        assert model.id == "grace" and model.object == "model"
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x").models.retrieve("nope")
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_cors_is_off_by_default(client):
    r = client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_cors_origin_allows_that_origin_only_and_preflight_needs_no_key(engine):
    app = create_app(engine, api_key="k", cors_origins=["http://app.example"])
    with TestClient(app) as c:
        pre = {"Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
        ok = c.options("/v1/chat/completions", headers={"Origin": "http://app.example", **pre})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        other = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"
        # the key is still required for the request itself, and the answer carries the header
        r = c.get("/v1/models", headers={"Origin": "http://app.example"})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "http://app.example"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"messages": HI, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 2}, "messages", "missing_parameter"),
        ({"messages": HI, "max_tokens": 10**6}, "max_tokens", "max_tokens_over_limit"),
        ({"messages": HI, "n": 0}, "n", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
         "invalid_content"),
    ],
)  # fmt: skip
def test_every_400_has_param_and_a_stable_code(client, body, param, code):
    r = client.post("/v1/chat/completions", json={"model": "grace", **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["code"] == code, err


def test_unusable_json_has_a_code(client):
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
