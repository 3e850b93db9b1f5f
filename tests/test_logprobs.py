"""Logprobs, echo, n > 1 and token-id prompts: the engine's numbers against HF's log-softmax in
fp32 (fast runner and generic path), the prompt prefilled once for n choices, and the server's
OpenAI shapes (chat and completions, streamed and not) and 400s."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from loraforge.infer.engine import Engine
from loraforge.infer.generic import FORCE_ENV
from loraforge.infer.logprobs import for_tokenizer
from loraforge.infer.request import merged
from loraforge.infer.sampling import SamplingParams
from loraforge.serve.app import create_app

LONG = "The quick brown fox jumps over the lazy dog, and then it naps. " * 14  # > 128 tokens


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of HF's fp32 logits: row t scores token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


@pytest.fixture(scope="module", params=["fast", "generic"])
def engine(request, tiny_model_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv(FORCE_ENV, "1" if request.param == "generic" else "0")
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=4)
    mp.undo()
    yield eng
    eng.close()


def test_prompt_and_completion_logprobs_equal_hf_log_softmax(engine, hf, tokenizer):
    ids = tokenizer(LONG)["input_ids"]
    assert len(ids) > 128  # echo prefills in chunks of 128: the chunk seam is scored too
    sp = SamplingParams(max_new_tokens=6, temperature=0.9, repetition_penalty=1.3, seed=3,
                        logprobs=3, prompt_logprobs=2)  # fmt: skip
    r = engine.generate([ids], sp)[0]
    scored = ids + r.token_ids
    ref = hf_logprobs(hf, scored)
    # the prompt: the first token has no logprob, token t is scored by row t - 1
    assert [e.token for e in r.prompt_logprobs] == ids and r.prompt_logprobs[0].logprob is None
    got = torch.tensor([e.logprob for e in r.prompt_logprobs[1:]])
    want = ref[: len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the completion: the raw model's logprobs, not the penalised, tempered scores it sampled
    assert [e.token for e in r.logprobs[: len(r.token_ids)]] == r.token_ids
    for t, e in enumerate(r.logprobs[: len(r.token_ids)]):
        row = ref[len(ids) - 1 + t]
        assert abs(e.logprob - row[e.token].item()) < 1e-4
        top = row.topk(3)
        assert [i for i, _ in e.top] == top.indices.tolist()
        assert max(lp for _, lp in e.top) >= e.logprob


def test_n_choices_prefill_once_and_choice_i_uses_seed_plus_i(engine, tokenizer):
    ids = tokenizer("Once upon a time")["input_ids"]
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    before = engine.stats.prefills
    handles = engine.submit_n(ids, sp, None, 6)  # more choices than the 4 slots
    results = [h.result() for h in handles]
    assert engine.stats.prefills - before == 1
    assert len({tuple(r.token_ids) for r in results}) > 1
    for i in (0, 3, 5):
        alone = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11 + i)
        assert engine.generate([ids], alone)[0].token_ids == results[i].token_ids


def test_merged_choices_carry_their_index_and_logprobs(engine, tokenizer):
    import queue

    ids = tokenizer("Hello")["input_ids"]
    sp = SamplingParams(max_new_tokens=5, temperature=1.0, seed=2, logprobs=0)
    handles = engine.submit_n(ids, sp, None, 3, out=queue.Queue(), index=6)
    texts, scored, done = {}, {}, []
    for h, text, new, finished in merged(handles):
        texts[h.index] = texts.get(h.index, "") + text
        scored.setdefault(h.index, []).extend(new or [])
        done += [h.index] if finished else []
    assert sorted(done) == [6, 7, 8]
    for h in handles:
        r = h.result()
        assert texts[h.index] == r.text and scored[h.index] == r.logprobs


def test_token_bytes_are_exact_for_split_characters(tokenizer):
    text = for_tokenizer(tokenizer)
    ids = tokenizer("Héllo 世界")["input_ids"]
    assert b"".join(text.bytes(t) for t in ids) == "Héllo 世界".encode()
    assert text.text(tokenizer.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"


# ---- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=4)
    with TestClient(create_app(eng)) as c:
        yield c
    eng.close()


HI = [{"role": "user", "content": "Hello there, who are you?"}]


def events(r) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: {")]  # fmt: skip


def test_chat_logprobs_shape_streamed_equal_to_whole(client):
    body = {"messages": HI, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] + (
        choice["finish_reason"] == "stop"
    )
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        assert e["logprob"] == e["top_logprobs"][0]["logprob"]  # greedy: the likeliest
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [c for ev in events(streamed) for c in ev["choices"]]
    pieces = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    assert pieces == content
    assert "".join(c["delta"].get("content", "") for c in chunks) == choice["message"]["content"]


def test_chat_n_choices_with_seed_and_usage_counts_the_prompt_once(client):
    body = {"messages": HI, "max_tokens": 6, "temperature": 1.0, "seed": 4}
    one = client.post("/v1/chat/completions", json=body).json()
    many = client.post("/v1/chat/completions", json={**body, "n": 3}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert many["choices"][0]["message"] == one["choices"][0]["message"]
    assert len({c["message"]["content"] for c in many["choices"]}) > 1
    assert many["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    streamed = client.post(
        "/v1/chat/completions",
        json={**body, "n": 3, "stream": True, "stream_options": {"include_usage": True}},
    )
    evs = events(streamed)
    text = {i: "" for i in range(3)}
    for ev in evs:
        for c in ev["choices"]:
            text[c["index"]] += c["delta"].get("content", "")
    assert [text[i] for i in range(3)] == [c["message"]["content"] for c in many["choices"]]
    assert evs[-1]["usage"] == many["usage"]


def test_completions_echo_logprobs_token_id_prompts_and_n(client, tokenizer):
    prompts = [
        tokenizer("The capital of France")["input_ids"],
        tokenizer("Two plus two")["input_ids"],
    ]
    body = {"prompt": prompts, "max_tokens": 3, "temperature": 1.0, "seed": 9, "n": 2,
            "echo": True, "logprobs": 1}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for c in out["choices"]:
        ids = prompts[c["index"] // 2]
        lp = c["logprobs"]
        assert c["text"].startswith(tokenizer.decode(ids))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) >= len(ids) + 1 and lp["text_offset"][0] == 0
        for tok, val, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:],
                                 strict=True):  # fmt: skip
            assert top[tok] == val and max(top.values()) >= val
    assert (
        out["choices"][0]["logprobs"]["token_logprobs"][: len(prompts[0])]
        == (out["choices"][1]["logprobs"]["token_logprobs"][: len(prompts[0])])
    )
    assert out["usage"]["prompt_tokens"] == len(prompts[0]) + len(prompts[1])
    # a string prompt gives the same prompt logprobs as its token ids
    text = client.post("/v1/completions", json={**body, "prompt": "The capital of France", "n": 1})
    head = len(prompts[0])
    assert (
        text.json()["choices"][0]["logprobs"]["token_logprobs"][:head]
        == (out["choices"][0]["logprobs"]["token_logprobs"][:head])
    )
    # streamed: the same choices, interleaved with their index; the echo comes first
    streamed = client.post("/v1/completions", json={**body, "stream": True})
    got: dict = {}
    for ev in events(streamed):
        for c in ev["choices"]:
            g = got.setdefault(c["index"], {"text": "", "tokens": []})
            g["text"] += c["text"]
            g["tokens"] += (c["logprobs"] or {}).get("tokens", [])
    for c in out["choices"]:
        assert got[c["index"]] == {"text": c["text"], "tokens": c["logprobs"]["tokens"]}


@pytest.mark.parametrize(
    "path, body, param, code",
    [
        ("/v1/completions", {"prompt": [[1, 2], [3, 99999]]}, "prompt", "invalid_token_id"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", "invalid_value"),
        ("/v1/completions", {"prompt": ["a"] * 3, "n": 100}, "n", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "n": 129}, "n", "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21},
         "top_logprobs", "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs",
         "invalid_value"),
    ],
)  # fmt: skip
def test_out_of_range_values_are_400_with_param_and_code(client, path, body, param, code):
    r = client.post(path, json={"max_tokens": 2, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["code"] == code, err
    if code == "invalid_token_id":
        assert "prompt[1][1]" in err["message"] and "99999" in err["message"]
