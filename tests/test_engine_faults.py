"""The engine under bad luck: one bad row fails alone, adapters change under running requests,
long prompts do not stall the others, and memory taken for one long request comes back."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import make_adapter

from loraforge.adapters import AdapterError
from loraforge.infer import scheduler
from loraforge.infer.engine import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
HI = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    good = make_adapter(tiny_model_dir, root / "good", seed=1)
    huge = make_adapter(tiny_model_dir, root / "huge", seed=2)
    from safetensors.torch import load_file, save_file

    weights = load_file(huge / "adapter_model.safetensors")  # finite, but logits overflow
    save_file({k: v * 1e30 for k, v in weights.items()}, huge / "adapter_model.safetensors")
    bad_shape = make_adapter(tiny_model_dir, root / "bad_shape", seed=3)
    weights = load_file(bad_shape / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(8, 7)
    save_file(weights, bad_shape / "adapter_model.safetensors")
    nan = make_adapter(tiny_model_dir, root / "nan", seed=4)
    weights = load_file(nan / "adapter_model.safetensors")
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, nan / "adapter_model.safetensors")
    return {"good": good, "huge": huge, "bad_shape": bad_shape, "nan": nan}


@pytest.fixture
def engine(tiny_model_dir, adapters):
    eng = Engine(str(tiny_model_dir), {"good": str(adapters["good"])}, dtype="float32")
    yield eng
    eng.close()


def test_overflowing_row_fails_alone(engine, adapters):
    engine.load_adapter("huge", str(adapters["huge"]))
    alone = engine.generate([HI], GREEDY)[0].token_ids
    handles = [engine.submit(engine.encode(HI, a), GREEDY, a) for a in (None, "huge", "good")]
    with pytest.raises(scheduler.RowError, match="NaN or infinite .adapter 'huge'"):
        handles[1].result(timeout=60)
    assert handles[0].result(timeout=60).token_ids == alone
    assert handles[2].result(timeout=60).finish_reason in ("stop", "length")


def test_sampling_that_raises_fails_alone(engine, monkeypatch):
    real = scheduler.sample

    def flaky(logits, p, *args):
        if p.seed == 666:
            raise RuntimeError("multinomial: invalid distribution")
        return real(logits, p, *args)

    monkeypatch.setattr(scheduler, "sample", flaky)
    bad = SamplingParams(temperature=1.0, seed=666, max_new_tokens=5)
    fine = SamplingParams(temperature=1.0, seed=1, max_new_tokens=5)
    h_bad, h_fine = (engine.submit(engine.encode(HI), p) for p in (bad, fine))
    with pytest.raises(scheduler.RowError, match="sampling failed: multinomial"):
        h_bad.result(timeout=60)
    assert h_fine.result(timeout=60).completion_tokens > 0


def test_unload_while_streaming_ends_only_those_rows(engine):
    long = SamplingParams(temperature=0, max_new_tokens=200)
    slow = threading.Event()
    remove = engine.add_step_listener(lambda e: slow.wait(0.005))
    try:
        base = engine.submit(engine.encode(HI), long)
        tuned = engine.submit(engine.encode(HI, "good"), long, "good")
        for _ in tuned:  # the adapter row is running
            break
        engine.unload_adapter("good")
        with pytest.raises(AdapterError, match="unloaded while in use"):
            tuned.result(timeout=60)
        assert base.result(timeout=60).finish_reason in ("stop", "length")
    finally:
        remove()


def test_bad_adapters_are_refused_and_leave_no_trace(engine, adapters):
    before = engine.adapter_names()
    with pytest.raises(AdapterError, match=r"do not fit a .* projection"):
        engine.load_adapter("x", str(adapters["bad_shape"]))
    with pytest.raises(AdapterError, match="NaN or infinity"):
        engine.load_adapter("y", str(adapters["nan"]))
    assert engine.adapter_names() == before
    engine.load_adapter("x", str(adapters["good"]))  # the name is free; the engine still works
    assert engine.generate([HI], GREEDY, adapters="x")[0].completion_tokens > 0


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine, monkeypatch):
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 64)
    words = " ".join(f"w{i}" for i in range(400))
    long_prompt = [{"role": "user", "content": words}]
    ids = engine.encode(long_prompt)
    assert len(ids) > 4 * 64
    events = []
    remove = engine.add_step_listener(events.append)
    try:
        running = engine.submit(engine.encode(HI), SamplingParams(temperature=0, max_new_tokens=60))
        for _ in running:
            break
        chunked = engine.submit(ids, GREEDY)
        chunked_tokens = chunked.result(timeout=120).token_ids
        running.result(timeout=120)
    finally:
        remove()
    kinds = [e.kind for e in events]
    joined = kinds.index("prefill", 1)  # the long prompt's (the first is the running one's)
    decodes_before = kinds[1:joined].count("decode")
    assert decodes_before >= len(ids) // 64 - 1, kinds[:joined]
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 10_000)
    assert engine.generate([ids], GREEDY)[0].token_ids == chunked_tokens  # same answer whole


def test_kv_cache_shrinks_after_a_long_request(engine):
    start = engine.runner.cap
    words = " ".join(f"w{i}" for i in range(250))  # ~600 tokens: the cache grows past 256
    ids = engine.encode([{"role": "user", "content": words}])
    assert 256 < len(ids) < 2000
    engine.generate([ids], GREEDY)
    engine.generate([HI], GREEDY)
    assert engine.runner.cap == start == 256
