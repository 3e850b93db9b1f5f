"""The engine's generic path (infer/generic.py): families the fast runner does not compute are
served through transformers' own forward, token for token like HF ``generate`` + PEFT.

olmo2 is a family no fast runner computes, so it takes the generic path by itself; phi3 and
gemma2 (which may gain a fast runner) and llama are sent down it with ``FORCE_ENV``.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers import make_adapter, make_tiny_model
from typer.testing import CliRunner

from loraforge.adapters import AdapterError
from loraforge.cli import app
from loraforge.cpu import families
from loraforge.errors import UserError
from loraforge.infer import scheduler
from loraforge.infer.engine import Engine, SamplingParams
from loraforge.infer.generic import FORCE_ENV, GenericRunner
from loraforge.infer.runner import Runner

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)
HI = [{"role": "user", "content": "Hello there, who are you?"}]
OTHER = [{"role": "user", "content": "Name three colours, please."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """{model_type: (model dir, {adapter name: adapter dir})}, built on first use."""
    made = {}

    def get(model_type: str):
        if model_type not in made:
            root = tmp_path_factory.mktemp(f"tiny-{model_type}")
            base = make_tiny_model(root / "base", tokenizer, model_type=model_type)
            adapters = {n: make_adapter(base, root / n, seed=s) for n, s in (("a", 1), ("b", 2))}
            made[model_type] = (base, adapters)
        return made[model_type]

    return get


def _hf_greedy(base_dir, adapter_dir, ids: list[int], stop_ids: set[int], n: int) -> list[int]:
    """HF generate (+ PEFT when ``adapter_dir``), greedy fp32: the reference tokens."""
    from peft import PeftModel

    from loraforge.models import load_model

    model = load_model(base_dir)  # SDPA, or eager where the architecture needs it
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop_ids)
    )[0, len(ids) :].tolist()
    return out[:-1] if out and out[-1] in stop_ids else out


@pytest.mark.parametrize("model_type", ["olmo2", "phi3", "gemma2"])
def test_greedy_equals_hf_generate_with_peft(model_type, tiny, monkeypatch):
    base, adapters = tiny(model_type)
    if model_type != "olmo2":
        monkeypatch.setenv(FORCE_ENV, "1")
    with Engine(str(base), {k: str(v) for k, v in adapters.items()}, dtype="float32") as eng:
        assert isinstance(eng.runner, GenericRunner)
        if model_type == "gemma2":  # transformers refuses SDPA for it: the eager fallback
            assert eng.hf_model.config._attn_implementation == "eager"
        ids = eng.encode(HI)
        got = {a: eng.generate([ids], GREEDY, adapters=a)[0].token_ids for a in (None, "a", "b")}
        stops = eng._stop_ids
    for a in (None, "a", "b"):
        want = _hf_greedy(base, adapters.get(a), ids, stops, GREEDY.max_new_tokens)
        assert got[a] == want, f"{model_type} adapter {a}"
    assert got["a"] != got[None] and got["b"] != got[None]  # the adapters really act


def test_olmo2_rows_with_different_adapters_batch_like_alone(tiny):
    base, adapters = tiny("olmo2")
    assert families.engine_path("olmo2") == "generic"
    with Engine(str(base), {k: str(v) for k, v in adapters.items()}, dtype="float32") as eng:
        prompts = [HI, OTHER, HI, OTHER]
        names = [None, "a", "b", "a"]
        alone = [
            eng.generate([p], GREEDY, adapters=a)[0].token_ids
            for p, a in zip(prompts, names, strict=True)
        ]
        events = []
        remove = eng.add_step_listener(events.append)
        together = [r.token_ids for r in eng.generate(prompts, GREEDY, adapters=names)]
        remove()
    assert together == alone
    assert max(len(e.adapters) for e in events if e.kind == "decode") > 1  # really batched


def test_llama_through_the_generic_path_equals_the_fast_runner(
    tiny_model_dir, tmp_path, monkeypatch
):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    with Engine(str(tiny_model_dir), {"a": str(adapter)}, dtype="float32") as eng:
        assert isinstance(eng.runner, Runner)
        fast = [eng.generate([HI], GREEDY, adapters=a)[0].token_ids for a in (None, "a")]
    monkeypatch.setenv(FORCE_ENV, "1")
    with Engine(str(tiny_model_dir), {"a": str(adapter)}, dtype="float32") as eng:
        assert isinstance(eng.runner, GenericRunner)
        generic = [eng.generate([HI], GREEDY, adapters=a)[0].token_ids for a in (None, "a")]
    assert generic == fast


def test_faults_stay_with_their_row(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapters = tiny("olmo2")
    huge = make_adapter(base, tmp_path / "huge", seed=3)  # finite weights, overflowing logits
    weights = load_file(huge / "adapter_model.safetensors")
    save_file({k: v * 1e30 for k, v in weights.items()}, huge / "adapter_model.safetensors")
    bad = make_adapter(base, tmp_path / "bad", seed=4)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, bad / "adapter_model.safetensors")
    with Engine(str(base), {"a": str(adapters["a"]), "huge": str(huge)}, dtype="float32") as eng:
        alone = eng.generate([HI], GREEDY)[0].token_ids
        handles = [eng.submit(eng.encode(HI), GREEDY, a) for a in (None, "huge", "a")]
        with pytest.raises(scheduler.RowError, match="NaN or infinite .adapter 'huge'"):
            handles[1].result(timeout=60)
        assert handles[0].result(timeout=60).token_ids == alone
        assert handles[2].result(timeout=60).finish_reason in ("stop", "length")
        with pytest.raises(AdapterError, match="NaN or infinity"):  # read_lora's checks
            eng.load_adapter("bad", str(bad))
        assert eng.adapter_names() == ["a", "huge"]
        # unloaded while streaming: that row ends with an AdapterError, the base row goes on
        long = SamplingParams(temperature=0, max_new_tokens=200)
        remove = eng.add_step_listener(lambda e: threading.Event().wait(0.005))
        try:
            base_row = eng.submit(eng.encode(HI), long)
            tuned = eng.submit(eng.encode(HI), long, "a")
            for _ in tuned:  # the adapter row is running
                break
            eng.unload_adapter("a")
            with pytest.raises(AdapterError, match="unloaded while in use"):
                tuned.result(timeout=60)
            assert base_row.result(timeout=60).finish_reason in ("stop", "length")
        finally:
            remove()


def test_int4_on_the_generic_path_is_one_line(tiny):
    base, _ = tiny("olmo2")
    with pytest.raises(UserError, match="int4 needs the fast runner .* not 'olmo2'"):
        Engine(str(base), dtype="int4")


def test_sft_chat_merge_end_to_end_on_olmo2(tiny, tmp_path):
    base, _ = tiny("olmo2")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"Name item {k}.", "input": "", "output": f"Item {k}."})
            + "\n"
            for k in range(12)
        )
    )
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        ["sft", "--model", str(base), "--dataset", str(data), "--output", str(out),
         "--max-steps", "2", "--lora-rank", "4"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app,
        ["chat", "--adapter", str(out), "-q", "hi", "--max-new-tokens", "4", "--temperature", "0"],
    )
    assert r.exit_code == 0, r.output
    assert "generic path for 'olmo2'" in r.output
    r = CliRunner().invoke(app, ["merge", "--adapter", str(out), "--output", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "olmo2"


def test_models_verb_says_which_path_each_family_takes():
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    for model_type in families.FAMILIES:
        assert model_type in r.output
    assert "fast runner" in r.output and "generic" in r.output


def test_gemma2_trains_on_packed_rows_with_eager_attention(tiny):
    """The fast training path packs samples with a bool 4D mask; under the eager fallback each
    sample must still see only itself (as separate forward passes do)."""
    from loraforge.config import SFTConfig
    from loraforge.train.lora import load_lora_model

    base, _ = tiny("gemma2")
    cfg = SFTConfig(model=str(base), lora_rank=4)
    assert cfg.fast
    model = load_lora_model(cfg, torch.device("cpu"), bf16_base=False).eval()
    decoder = model.get_base_model().get_decoder()
    assert decoder.config._attn_implementation == "eager"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 1000, (1, 5), generator=g), torch.randint(0, 1000, (1, 7), generator=g)
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    mask[..., :5, :5] = torch.ones(5, 5, dtype=torch.bool).tril()
    mask[..., 5:, 5:] = torch.ones(7, 7, dtype=torch.bool).tril()
    pos = torch.tensor([[*range(5), *range(7)]])
    with torch.no_grad():
        packed = decoder(
            input_ids=torch.cat([a, b], 1), attention_mask=mask, position_ids=pos
        ).last_hidden_state
        apart = torch.cat([decoder(input_ids=x).last_hidden_state for x in (a, b)], 1)
    torch.testing.assert_close(packed, apart, atol=1e-5, rtol=1e-5)
