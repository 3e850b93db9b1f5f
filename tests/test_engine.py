"""The generation engine on the tiny model: greedy == HF generate, batching, adapters, streaming."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from loraforge.adapters import AdapterError, AdapterMeta, write_meta
from loraforge.data.tokenize import resolve_template
from loraforge.infer.engine import Engine, EngineBusy, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def make_adapter(
    out: Path,
    base_dir: Path,
    tokenizer,
    seed: int,
    base_spec: str | None = None,
    r: int = 8,
    targets="all-linear",
    **lora_kw,
) -> Path:
    """A random (non-zero) LoRA adapter saved as a loraforge adapter dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **lora_kw
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # make the update large enough to change the tiny model's argmax
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft_model.save_pretrained(out)
    write_meta(
        out, AdapterMeta(str(base_spec or base_dir), resolve_template(tokenizer), "Be brief.")
    )
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": make_adapter(root / "a1", tiny_model_dir, tokenizer, 1),
        "a2": make_adapter(
            root / "a2",
            tiny_model_dir,
            tokenizer,
            2,
            r=4,
            targets=["q_proj", "v_proj", "down_proj"],
        ),
        # rsLoRA scaling and a per-module alpha, as PEFT computes them
        "a3": make_adapter(
            root / "a3",
            tiny_model_dir,
            tokenizer,
            3,
            use_rslora=True,
            alpha_pattern={"up_proj": 64},
        ),
    }


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapters):
    eng = Engine(str(tiny_model_dir), {k: str(v) for k, v in adapters.items()}, dtype="float32")
    yield eng
    eng.close()


def hf_greedy(model_dir, ids, n, adapter_dir=None, eos=2) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos
    )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new


PROMPTS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "你好，请介绍一下你自己。" * 3}],
]


def pick_stop(text: str) -> str:
    """A 2-character stop string from the middle of ``text`` that is not only whitespace."""
    for i in range(len(text) // 2, len(text) - 1):
        if text[i : i + 2].strip() and text.index(text[i : i + 2]) > 0:
            return text[i : i + 2]
    raise AssertionError(f"no stop string candidate in {text!r}")


@pytest.mark.parametrize("adapter", [None, "a1", "a2", "a3"])
def test_greedy_equals_hf_generate(engine, tiny_model_dir, adapters, adapter):
    ids = engine.encode(PROMPTS[0], adapter)
    res = engine.generate([ids], GREEDY, adapter)[0]
    want = hf_greedy(tiny_model_dir, ids, GREEDY.max_new_tokens, adapters.get(adapter))
    assert res.token_ids == want
    assert res.prompt_tokens == len(ids) and res.completion_tokens == len(want)


def test_adapters_change_output(engine):
    ids = engine.encode(PROMPTS[1])
    outs = [engine.generate([ids], GREEDY, a)[0].token_ids for a in (None, "a1", "a2")]
    assert outs[0] != outs[1] and outs[0] != outs[2] and outs[1] != outs[2]


def test_encode_uses_adapter_system(engine):
    text = engine.tokenizer.decode(engine.encode(PROMPTS[0], "a1"))
    assert "Be brief." in text
    assert "Be brief." not in engine.tokenizer.decode(engine.encode(PROMPTS[0]))


def test_mixed_batch_equals_solo(engine):
    jobs = [(p, a) for p in PROMPTS for a in (None, "a1", "a2")]
    ids = [engine.encode(p, a) for p, a in jobs]
    solo = [
        engine.generate([i], GREEDY, a)[0].token_ids for i, (_, a) in zip(ids, jobs, strict=True)
    ]
    batch = engine.generate(ids, GREEDY, [a for _, a in jobs])
    assert [r.token_ids for r in batch] == solo
    # all rows on one adapter takes another code path (batched matmuls of one adapter)
    same = [engine.encode(p, "a1") for p in PROMPTS]
    solo = [engine.generate([i], GREEDY, "a1")[0].token_ids for i in same]
    assert [r.token_ids for r in engine.generate(same, GREEDY, "a1")] == solo


def test_submit_from_16_threads(engine):
    names = [None, "a1", "a2"]
    ids = [engine.encode(PROMPTS[i % 3], names[i % 3]) for i in range(16)]
    solo = {i: engine.generate([ids[i]], GREEDY, names[i % 3])[0].token_ids for i in range(3)}
    got: dict[int, list[int]] = {}

    def run(i):
        h = engine.submit(ids[i], GREEDY, names[i % 3])
        got[i] = h.result(timeout=120).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[i] == solo[i % 3] for i in range(16))


def test_seed_reproduces_sampling(engine):
    ids = engine.encode(PROMPTS[0])
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16, seed=7)
    a = engine.generate([ids], p)[0].token_ids
    others = [engine.encode(x) for x in PROMPTS[1:]]
    rest = [SamplingParams(temperature=1.0, max_new_tokens=16)] * 2
    b = engine.generate([ids, *others], [p, *rest], [None, "a1", "a2"])[0].token_ids
    c = engine.generate([ids], SamplingParams(temperature=1.0, max_new_tokens=16, seed=8))[0]
    assert a == b
    assert c.token_ids != a


def test_repetition_penalty_changes_greedy(engine):
    ids = engine.encode(PROMPTS[0])
    plain = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=30))[0]
    pen = engine.generate(
        [ids], SamplingParams(temperature=0, max_new_tokens=30, repetition_penalty=1.5)
    )[0]
    assert len(set(pen.token_ids)) >= len(set(plain.token_ids))


def test_length_vs_stop(engine):
    ids = engine.encode(PROMPTS[2])
    p = SamplingParams(temperature=1.0, max_new_tokens=20, seed=3)
    full = engine.generate([ids], p)[0]
    assert full.finish_reason == "length" and full.completion_tokens == 20
    stop = pick_stop(full.text)
    p = SamplingParams(temperature=1.0, max_new_tokens=20, seed=3, stop=[stop])
    cut = engine.generate([ids], p)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_stream_joins_to_text(engine):
    ids = engine.encode(PROMPTS[2])
    p = SamplingParams(temperature=1.0, max_new_tokens=60, seed=5)
    deltas = list(engine.stream(ids, p, "a1"))
    res = engine.generate([ids], p, "a1")[0]
    assert len(deltas) > 1
    assert "".join(deltas) == res.text
    assert res.text == engine.tokenizer.decode(res.token_ids, skip_special_tokens=True)


def test_text_tracker_never_splits_characters(tokenizer):
    from loraforge.infer.sampling import TextTracker

    text = "你好，世界！这是一个测试。🙂 Ünïcödé and plain words; 日本語も。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # many characters span several tokens
    tracker = TextTracker(tokenizer, [])
    deltas = [tracker.add(i) for i in ids] + [tracker.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    tracker = TextTracker(tokenizer, ["世界", "测试"])
    out = ""
    for i in ids:
        out += tracker.add(i)
        if tracker.stopped:
            break
    assert out + tracker.finish() == "你好，"


def test_stream_with_stop_string(engine):
    ids = engine.encode(PROMPTS[2])
    full = engine.generate([ids], SamplingParams(temperature=1.0, max_new_tokens=20, seed=4))[0]
    stop = pick_stop(full.text)
    p = SamplingParams(temperature=1.0, max_new_tokens=20, seed=4, stop=[stop])
    assert "".join(engine.stream(ids, p)) == full.text[: full.text.index(stop)]


def test_cancel_stops(engine):
    ids = engine.encode(PROMPTS[0])
    h = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=2000))
    it = iter(h)
    next(it)
    h.cancel()
    res = h.result(timeout=60)
    assert res.finish_reason == "cancelled" and res.completion_tokens < 2000


def test_queue_full_raises_busy(tiny_model_dir):
    eng = Engine(str(tiny_model_dir), dtype="float32", max_batch=1, max_queue=1)
    try:
        ids = eng.encode(PROMPTS[0])
        p = SamplingParams(temperature=0, max_new_tokens=500)
        handles = []
        with pytest.raises(EngineBusy):
            for _ in range(5):
                handles.append(eng.submit(ids, p))
        for h in handles:
            h.cancel()
    finally:
        eng.close()


def test_unload_and_unknown_adapter(tiny_model_dir, adapters):
    eng = Engine(str(tiny_model_dir), {"a1": str(adapters["a1"])}, dtype="float32")
    try:
        assert eng.adapter_names() == ["a1"]
        eng.unload_adapter("a1")
        assert eng.adapter_names() == []
        with pytest.raises(AdapterError, match="a1"):
            eng.generate([[1, 2, 3]], GREEDY, "a1")
        assert eng.runner.bank.names == []
    finally:
        eng.close()


def test_adapter_for_another_base(tiny_model_dir, tokenizer, tmp_path, engine):
    other = make_adapter(tmp_path / "other", tiny_model_dir, tokenizer, 3, base_spec="smollm2-135m")
    with pytest.raises(AdapterError, match="smollm2-135m") as e:
        engine.load_adapter("other", str(other))
    assert str(tiny_model_dir) in str(e.value)
    with pytest.raises(AdapterError, match="smollm2-135m"):
        Engine.from_adapter(str(other), model=str(tiny_model_dir))


def test_from_adapter(adapters):
    eng = Engine.from_adapter(str(adapters["a1"]), name="mine", dtype="float32")
    try:
        assert eng.adapter_names() == ["mine"]
        assert eng.system == "Be brief."
        res = eng.generate([PROMPTS[0]], GREEDY, "mine")[0]
        assert res.completion_tokens > 0
    finally:
        eng.close()


def test_prompt_too_long_and_close(tiny_model_dir):
    from loraforge.errors import UserError

    eng = Engine(str(tiny_model_dir), dtype="float32")
    with pytest.raises(UserError, match="context"):
        eng.submit([5] * 4096, GREEDY)
    eng.close()
    with pytest.raises(UserError, match="closed"):
        eng.submit([5, 6], GREEDY)


@pytest.mark.slow
def test_bundled_model_bf16_equals_hf_generate(tmp_path):
    """The real model in the default dtype (bf16, oneDNN-packed weights on CPU) matches HF and
    PEFT, batched (one adapter for all rows) or not."""
    from peft import PeftModel

    from loraforge.bench.generate import make_random_adapters
    from loraforge.models import load_model, resolve_model

    adapter = make_random_adapters(resolve_model("smollm2-135m"), "smollm2-135m", 1, tmp_path)[0]
    eng = Engine("smollm2-135m", {"r": str(adapter)}, dtype="bfloat16")
    try:
        qs = ["What is the capital of France?", "Give me two tips to sleep better."]
        ids = [eng.encode([{"role": "user", "content": q}]) for q in qs]
        p = SamplingParams(temperature=0, max_new_tokens=24)
        batch = eng.generate(ids, p)
        assert "Paris" in batch[0].text
        hf = load_model("smollm2-135m", dtype="bfloat16")
        for i, res in zip(ids, batch, strict=True):
            out = hf.generate(torch.tensor([i]), do_sample=False, max_new_tokens=24)
            want = out[0, len(i) :].tolist()
            want = want[: want.index(2)] if 2 in want else want
            assert res.token_ids == want
        tuned = eng.generate(ids, p, "r")
        peft_model = PeftModel.from_pretrained(hf, str(adapter)).eval()
        for i, res in zip(ids, tuned, strict=True):
            out = peft_model.generate(torch.tensor([i]), do_sample=False, max_new_tokens=24)
            want = out[0, len(i) :].tolist()
            want = want[: want.index(2)] if 2 in want else want
            assert res.token_ids == want
    finally:
        eng.close()


def test_base_model_comes_from_the_first_adapter(tiny_model_dir, adapters):
    """serve/webui with --adapter and no --model: the base the adapter was trained on."""
    eng = Engine(None, {"a1": str(adapters["a1"])}, dtype="float32")
    try:
        assert Path(eng.model_spec).resolve() == Path(tiny_model_dir).resolve()
        assert eng.adapter_names() == ["a1"]
    finally:
        eng.close()


def test_all_torch_work_runs_on_the_worker_thread(engine, adapters):
    """Loading and adapter changes run on the engine's thread, not the caller's: a second
    OpenMP team (on the caller's thread) halves decode speed on a small CPU."""
    worker = engine.run_on_worker(threading.current_thread)
    assert worker is not threading.current_thread() and worker.name == "loraforge-engine"
    seen = []
    original = engine.runner.set_adapters
    engine.runner.set_adapters = lambda a: (seen.append(threading.current_thread()), original(a))
    try:
        engine.unload_adapter("a2")
        engine.load_adapter("a2", str(adapters["a2"]))
    finally:
        engine.runner.set_adapters = original
    assert seen == [worker, worker]
    with pytest.raises(ZeroDivisionError):  # errors reach the caller
        engine.run_on_worker(lambda: 1 / 0)
    assert engine.generate([[1, 2, 3]], GREEDY)[0].completion_tokens > 0  # still serving


def test_load_error_in_worker_reaches_the_caller(tiny_model_dir, monkeypatch):
    import loraforge.infer.engine as engine_mod
    from loraforge.models import ModelError

    def broken(*a, **kw):
        raise ModelError("cannot build this model")

    monkeypatch.setattr(engine_mod, "Runner", broken)
    before = threading.active_count()
    with pytest.raises(ModelError, match="cannot build"):
        Engine(str(tiny_model_dir), dtype="float32")
    assert threading.active_count() == before  # the worker stopped


def test_int4_weights_match_their_dequantized_matmul():
    from loraforge.infer.int4 import Int4

    torch.manual_seed(0)
    w = torch.randn(96, 128)
    packed = Int4.pack(w)
    # the same quantisation, dequantised by hand: groups of 32, 16 levels from min to max
    g = w.reshape(96, 4, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    deq = (((g - lo) / scale).round() * scale + lo).reshape(96, 128)
    x = torch.randn(3, 128).bfloat16()
    got = Int4.mm(x, packed).float()
    want = x.float() @ deq.t()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got - x.float() @ w.t()).abs().max() > 0  # it is 4-bit, not the original


def test_int4_engine_batched_equals_solo(tiny_model_dir, adapters):
    eng = Engine(str(tiny_model_dir), {"a1": str(adapters["a1"])}, dtype="int4")
    try:
        assert eng.runner.int4 and eng.dtype == torch.bfloat16
        prompts = [eng.encode(p) for p in PROMPTS]
        names = [None, "a1", "a1"]
        solo = [
            eng.generate([p], GREEDY, [a])[0].token_ids for p, a in zip(prompts, names, strict=True)
        ]
        together = [r.token_ids for r in eng.generate(prompts, GREEDY, names)]
        assert together == solo and all(solo)
    finally:
        eng.close()
