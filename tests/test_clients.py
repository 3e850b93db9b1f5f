"""Client conformance: what the official ``openai`` client and LangChain's ``ChatOpenAI`` do
against ``loraforge serve``, one test per behaviour issue 16 names. Every answer is checked
against the engine's own output or the spec's shape, on a tiny random model (one server for the
module). LangChain tests skip when ``langchain-openai`` (dev extra) is absent."""

from __future__ import annotations

import importlib.util
from typing import Literal

import openai
import pytest
from helpers import make_adapter, start_server
from pydantic import BaseModel, ConfigDict, Field

from loraforge.infer.engine import Engine, SamplingParams
from loraforge.serve.app import create_app

HI = [{"role": "user", "content": "Hello there, who are you?"}]
needs_grammar = pytest.mark.skipif(
    importlib.util.find_spec("llguidance") is None, reason="the serve extra's llguidance is missing"
)


class Colour(BaseModel):
    """Bounded fields, so that even the tiny random model ends the object."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["red", "green", "blue"]
    shade: int = Field(ge=0, le=9)


def get_weather(city: Literal["Paris", "Oslo"], unit: Literal["celsius", "fahrenheit"]) -> str:
    """Weather in a city."""
    return f"21 {unit} in {city}"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    grace = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "grace", seed=1)
    eng = Engine(str(tiny_model_dir), {"grace": grace}, dtype="float32", max_batch=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def url(engine):
    base, srv, thread = start_server(create_app(engine, max_tokens_limit=300))
    yield f"{base}/v1"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def chat_openai(url):
    """``ChatOpenAI(**kw)`` pointed at the server, greedy by default."""
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai (dev extra) missing")

    def make(**kw):
        kw = {"model": "grace", "temperature": 0, "max_tokens": 12, **kw}
        return lc.ChatOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300, **kw)

    return make


def greedy(engine, messages=HI, n=12, **kw):
    """The engine's own greedy answer for ``messages`` on the adapter "grace"."""
    sp = SamplingParams(temperature=0, max_new_tokens=n, **kw)
    return engine.generate([messages], sp, adapters=["grace"])[0]


# ---- chat, streaming, usage -------------------------------------------------------------------


def test_openai_chat_and_stream_with_include_usage(client, engine):
    want = greedy(engine)
    r = client.chat.completions.create(model="grace", messages=HI, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(
        model="grace", messages=HI, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage  # the usage-only chunk
    assert all(c.usage is None for c in chunks[:-1])


def test_langchain_invoke_and_stream_with_usage(chat_openai, engine):
    want = greedy(engine)
    msg = chat_openai().invoke("Hello there, who are you?")
    assert msg.content == want.text
    assert msg.usage_metadata["output_tokens"] == len(want.token_ids)
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(chat_openai(stream_usage=True).stream("Hello there, who are you?"))
    assert "".join(c.content for c in chunks) == want.text
    total = sum((c for c in chunks[1:]), chunks[0])
    assert total.usage_metadata == msg.usage_metadata


# ---- stop lists, seed, max_completion_tokens, developer role ----------------------------------


def test_fourteen_stop_words_as_continue_sends_them(client, engine, chat_openai):
    """Continue's autocomplete sends a dozen stop words to /v1/completions."""
    prompt = "def fib(n):"
    full = client.completions.create(model="grace", prompt=prompt, temperature=0, max_tokens=16)
    text = full.choices[0].text
    assert len(text) > 6
    cut = text[4:6]
    stops = ["\n\n", "\ndef", "\nclass", "/src/", "```", *[f"<never{i}>" for i in range(8)], cut]
    assert len(stops) == 14
    r = client.completions.create(
        model="grace", prompt=prompt, temperature=0, max_tokens=16, stop=stops
    )
    assert r.choices[0].text == text[: text.index(cut)] and r.choices[0].finish_reason == "stop"
    answer = greedy(engine).text
    lc_cut = answer[3:5]
    msg = chat_openai().invoke("Hello there, who are you?", stop=[*stops[:-1], lc_cut])
    assert msg.content == answer[: answer.index(lc_cut)]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model="grace", messages=HI, temperature=1.0, seed=seed, max_tokens=12
        )
        return r.choices[0].message.content

    assert sample(5) == sample(5) != sample(6)


def test_max_completion_tokens_caps_the_answer(client, chat_openai):
    r = client.chat.completions.create(
        model="grace", messages=HI, temperature=0, max_completion_tokens=3,
        logit_bias={"42": 100},  # never end-of-turn: the cap is what stops it
    )  # fmt: skip
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # langchain-openai sends its max_tokens as max_completion_tokens
    msg = chat_openai(max_tokens=2, logit_bias={42: 100}).invoke("Hi")
    assert msg.usage_metadata["output_tokens"] == 2
    assert msg.response_metadata["finish_reason"] == "length"


def test_developer_role_is_the_system_turn(client, engine):
    def ask(role: str | None):
        first = [{"role": role, "content": "Be terse."}] if role else []
        r = client.chat.completions.create(
            model=engine.base_name, messages=[*first, *HI], temperature=0, max_tokens=8
        )
        return r.usage.prompt_tokens, r.choices[0].message.content

    assert ask("developer") == ask("system")
    assert ask("developer")[0] != ask(None)[0]


def test_models_list_and_retrieve(client, engine):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == engine.base_name and "grace" in ids
    m = client.models.retrieve("grace")
    assert (m.id, m.object) == ("grace", "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# ---- structured output ------------------------------------------------------------------------


@needs_grammar
def test_openai_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model="grace", messages=HI, response_format=Colour, temperature=0, max_tokens=60
    )
    assert isinstance(r.choices[0].message.parsed, Colour), r.choices[0].message.content


@needs_grammar
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_openai, method):
    llm = chat_openai(max_tokens=60).with_structured_output(Colour, method=method)
    got = llm.invoke("Name a colour.")
    assert isinstance(got, Colour)


# ---- sampling controls, logprobs, n -----------------------------------------------------------


def test_logit_bias_and_penalties_are_applied(client, engine, chat_openai):
    plain = greedy(engine, n=16)
    assert len(set(plain.token_ids)) < 16  # the random model repeats itself: penalties bite
    for kw in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"logit_bias": {42: 100}}):
        want = greedy(engine, n=16, **kw).text
        assert want != plain.text
        r = client.chat.completions.create(
            model="grace", messages=HI, temperature=0, max_tokens=16, **kw
        )
        assert r.choices[0].message.content == want, kw
        assert chat_openai(max_tokens=16, **kw).invoke(HI[0]["content"]).content == want, kw


def test_logprobs_and_top_logprobs(client, chat_openai):
    r = client.chat.completions.create(
        model="grace", messages=HI, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(r.choices[0].message.content)
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token  # greedy picks the top token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
    msg = chat_openai(max_tokens=6, logprobs=True, top_logprobs=2).invoke(HI[0]["content"])
    lc = msg.response_metadata["logprobs"]["content"]
    assert [e["token"] for e in lc] == [e.token for e in entries]
    assert [e["logprob"] for e in lc] == pytest.approx([e.logprob for e in entries])
    assert all(len(e["top_logprobs"]) == 2 for e in lc)


def test_n_choices(client, chat_openai):
    r = client.chat.completions.create(
        model="grace", messages=HI, temperature=1.0, seed=7, n=2, max_tokens=8
    )
    assert [c.index for c in r.choices] == [0, 1]
    for i, choice in enumerate(r.choices):  # choice i samples with seed + i
        alone = client.chat.completions.create(
            model="grace", messages=HI, temperature=1.0, seed=7 + i, max_tokens=8
        )
        assert choice.message.content == alone.choices[0].message.content
    from langchain_core.messages import HumanMessage

    llm = chat_openai(n=2, temperature=1.0, seed=7, max_tokens=8)
    (gens,) = llm.generate([[HumanMessage(HI[0]["content"])]]).generations
    assert [g.text for g in gens] == [c.message.content for c in r.choices]


def test_completions_echo_logprobs_on_token_id_prompts(client, engine):
    """lm-evaluation-harness's local-completions scoring request."""
    tok = engine.tokenizer
    prompts = [tok("The capital of France is")["input_ids"], tok("Two plus two")["input_ids"]]
    r = client.completions.create(
        model="grace", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    assert len(r.choices) == 2
    for ids, choice in zip(prompts, r.choices, strict=True):
        lp = choice.logprobs
        assert choice.text.startswith(tok.decode(ids))
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
        assert all(x <= 0 for x in lp.token_logprobs[1:])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


# ---- tools ------------------------------------------------------------------------------------


@needs_grammar
@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_langchain_bind_tools_with_tool_choice(chat_openai, tool_choice):
    llm = chat_openai(max_tokens=60).bind_tools([get_weather], tool_choice=tool_choice)
    msg = llm.invoke("Weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    assert call["args"]["city"] in ("Paris", "Oslo")
    assert get_weather.__name__ == call["name"] and get_weather(**call["args"])


# ---- errors -----------------------------------------------------------------------------------


def test_errors_are_bad_request_with_code_and_param(client, chat_openai):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="grace", messages=HI, max_tokens=4, stop=[f"s{i}" for i in range(65)]
        )
    assert (e.value.code, e.value.param, e.value.status_code) == ("invalid_value", "stop", 400)
    with pytest.raises(openai.BadRequestError) as e:  # LangChain lets the openai error through
        chat_openai(logprobs=True, top_logprobs=21).invoke("Hi")
    assert (e.value.code, e.value.param) == ("invalid_value", "top_logprobs")
