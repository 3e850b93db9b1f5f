"""``response_format`` and the sampling controls through the server, driven by the openai client:
``chat.completions.parse`` with a pydantic model, json_object, a refused schema, streaming, and
logit_bias / presence / frequency penalties / top_k / min_p / repetition_penalty reaching the
engine."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from helpers import make_adapter, start_server
from pydantic import BaseModel, ConfigDict, Field

pytest.importorskip("llguidance", reason="the serve extra's grammar engine is not installed")

from loraforge.infer.engine import Engine, SamplingParams  # noqa: E402
from loraforge.serve.app import create_app  # noqa: E402

HI = [{"role": "user", "content": "Describe a thing as JSON."}]


class Where(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    x: bool


class Thing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # every field bounded, so that even the tiny random model ends the object
    name: str = Field(max_length=6)
    count: int = Field(ge=0, le=99)
    colour: Literal["red", "green", "blue"]
    tags: list[Literal["a", "b"]] = Field(min_length=1, max_length=3)
    where: Where


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "grace", 1)
    eng = Engine(str(tiny_model_dir), {"grace": str(adapter)}, dtype="float32")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    url, srv, thread = start_server(create_app(engine, max_tokens_limit=300))
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.mark.parametrize("model", ["tiny", "grace"])
def test_openai_parse_gives_the_pydantic_object(client, engine, model):
    model = engine.base_name if model == "tiny" else model
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=model, messages=HI, response_format=Thing, temperature=0, max_tokens=200)
    thing = r.choices[0].message.parsed
    assert isinstance(thing, Thing), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_sampled_json_schema_validates(client):
    schema = Thing.model_json_schema()
    for seed in range(3):
        r = client.chat.completions.create(
            model="grace",
            messages=HI,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "thing", "schema": schema, "strict": True},
            },
        )
        Thing.model_validate_json(r.choices[0].message.content)


def test_streamed_json_schema_joins_to_valid_json(client):
    stream = client.chat.completions.create(
        model="grace",
        messages=HI,
        temperature=0,
        max_tokens=200,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": Thing.model_json_schema()},
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Thing.model_validate_json(text)


def test_json_object_and_logit_bias_compose(client, engine):
    tok = engine.tokenizer
    bias = {str(tok.convert_tokens_to_ids(t)): 100 for t in ("{", "}")}
    r = client.chat.completions.create(
        model="grace",
        messages=HI,
        temperature=0,
        max_tokens=20,
        logit_bias=bias,
        response_format={"type": "json_object"},
    )
    assert json.loads(r.choices[0].message.content) == {}
    assert r.choices[0].finish_reason == "stop"


def test_completions_take_response_format(server):
    body = {
        "prompt": "A thing:",
        "max_tokens": 200,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": [1, 2]}}},
    }
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["text"]) in (1, 2)


@pytest.mark.parametrize(
    "response_format, needle",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, '"not"'),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": 1}}},
            "uniqueItems",
        ),
    ],
)
def test_uncompilable_schema_is_a_400_naming_the_keyword(client, response_format, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="grace", messages=HI, max_tokens=5, response_format=response_format
        )
    err = e.value.body
    assert err["code"] == "invalid_schema" and needle in err["message"]
    assert err["param"] == "response_format.json_schema.schema"


def test_json_schema_without_a_schema_is_a_400(server):
    body = {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {}}}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "response_format" in r.json()["error"]["param"]


def test_logit_bias_outside_the_vocabulary_is_a_400(client, engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="grace", messages=HI, max_tokens=5, logit_bias={str(len(engine.tokenizer)): 5}
        )
    assert e.value.body["param"] == "logit_bias"


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5},
        {"extra_body": {"repetition_penalty": 1.8}},
        {"logit_bias": {"42": 100}},
    ],
    ids=["presence", "frequency", "repetition", "logit_bias"],
)
def test_sampling_controls_reach_the_engine(client, engine, extra):
    """Each setting changes the greedy answer, exactly as the engine computes it directly."""
    kw = dict(extra.get("extra_body", {}), **{k: v for k, v in extra.items() if k != "extra_body"})
    kw["logit_bias"] = {int(k): v for k, v in kw.get("logit_bias", {}).items()}
    direct = engine.generate([HI], SamplingParams(temperature=0, max_new_tokens=32, **kw))
    plain = engine.generate([HI], SamplingParams(temperature=0, max_new_tokens=32))
    assert len(set(plain[0].token_ids)) < 32  # the base model repeats itself: penalties bite
    r = client.chat.completions.create(
        model=engine.base_name, messages=HI, temperature=0, max_tokens=32, **extra
    )
    assert r.choices[0].message.content == direct[0].text != plain[0].text


def test_top_k_and_min_p_reach_the_engine(client):
    """At temperature 1, top_k=1 and min_p=1 leave only the top token: the greedy answer."""
    greedy = client.chat.completions.create(
        model="grace", messages=HI, temperature=0, max_tokens=16
    )
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(
            model="grace", messages=HI, temperature=1.0, max_tokens=16, extra_body=extra
        )
        assert r.choices[0].message.content == greedy.choices[0].message.content
