"""`loraforge dpo`: preference pairs in the shipped and TRL shapes, the reference being the base
with the adapter disabled, the margin rising, resume, and `chat` preferring the chosen style."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraforge.config import DPOConfig
from loraforge.data.doctor import check
from loraforge.data.formats import RecordProblem
from loraforge.data.preference import load_preference_examples, normalise_pair
from loraforge.data.tokenize import IGNORE_INDEX
from loraforge.train.checkpoint import CheckpointError
from loraforge.train.dpo import PreferenceLoss, collate_pairs, run_dpo
from loraforge.train.metrics import read_metrics

DATA = Path(__file__).parent / "data"
# 3 records each of LLaMA-Factory's dpo_en/dpo_zh demos (one with a system turn, one with an
# earlier exchange), and TRL's shapes plus LLaMA-Factory's alpaca one
FILES = [DATA / "dpo_en_demo.json", DATA / "dpo_zh_demo.json", DATA / "dpo_trl_shapes.json"]
MARKER = "banana"


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_every_shipped_shape_reads_as_prompt_plus_two_answers():
    shapes = Counter(normalise_pair(r)[0] for f in FILES for r in _records(f))
    assert shapes == {"sharegpt": 6, "prompt": 2, "messages": 1, "alpaca": 1}

    en = [normalise_pair(r)[1] for r in _records(DATA / "dpo_en_demo.json")]
    assert [m["role"] for m in en[1].chosen] == ["system", "user", "assistant"]
    assert [m["role"] for m in en[2].chosen] == ["user", "assistant"] * 3
    raw = _records(DATA / "dpo_en_demo.json")[2]
    assert en[2].chosen[-1]["content"] == raw["chosen"]["value"]
    assert en[2].rejected[-1]["content"] == raw["rejected"]["value"]

    trl = [normalise_pair(r)[1] for r in _records(DATA / "dpo_trl_shapes.json")]
    assert trl[0].chosen == [
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue, on a clear day."},
    ]
    assert trl[1].chosen[0] == {"role": "system", "content": "Answer in one word."}
    assert trl[2].chosen[:-1] == trl[2].rejected[:-1] and len(trl[2].chosen) == 4
    assert trl[3].chosen[-1]["content"] == "7" and trl[3].rejected[-1]["content"] == "8"


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "Q", "chosen": "A"}, "without 'rejected'"),
        ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "answers are the same"),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "rejected": [
                    {"role": "user", "content": "R"},
                    {"role": "assistant", "content": "B"},
                ],
            },
            "differ before their last turn",
        ),
        ({"prompt": "Q", "chosen": "A", "rejected": {"role": "bot", "content": "B"}}, "rejected: "),
    ],
)
def test_bad_pairs_are_one_line_problems(record, message):
    with pytest.raises(RecordProblem, match=message):
        normalise_pair(record)


def test_labels_cover_the_final_answer_only_and_prompts_match(tokenizer):
    examples, report = load_preference_examples([str(f) for f in FILES], tokenizer)
    assert report.loaded == 10 and report.skipped == 0
    answers = {normalise_pair(r)[1].chosen[-1]["content"]: r for f in FILES for r in _records(f)}
    for ex in examples:
        starts = []
        for side in (ex.chosen, ex.rejected):
            labelled = [i for i, x in enumerate(side.labels) if x != IGNORE_INDEX]
            # one run: the final answer and its end-of-turn token
            assert labelled == list(range(labelled[0], labelled[-1] + 1))
            starts.append(labelled[0])
        assert starts[0] == starts[1]
        assert ex.chosen.input_ids[: starts[0]] == ex.rejected.input_ids[: starts[1]]
        assert _chosen(ex, tokenizer) in answers
    raw = _records(DATA / "dpo_en_demo.json")[2]  # an earlier exchange before the prompt
    multi = next(e for e in examples if _chosen(e, tokenizer) == raw["chosen"]["value"])
    earlier = raw["conversations"][1]["value"]
    assert earlier in tokenizer.decode(multi.chosen.input_ids)  # context, not labelled
    assert earlier not in _chosen(multi, tokenizer)


def _chosen(ex, tokenizer) -> str:
    ids = [t for t, x in zip(ex.chosen.input_ids, ex.chosen.labels, strict=True) if x != -100]
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_end|>")
    return text.removesuffix("<|im_end|>")


def test_data_doctor_recognises_pairs():
    results = check([str(f) for f in FILES])
    assert [dict(r.formats) for r in results] == [
        {"preference sharegpt": 3},
        {"preference sharegpt": 3},
        {"preference prompt": 2, "preference messages": 1, "preference alpaca": 1},
    ]
    assert not any(r.problems for r in results)


def test_reference_is_the_base_with_the_adapter_disabled(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from loraforge.train.lora import load_lora_model

    cfg = DPOConfig(model=str(tiny_model_dir), dataset=["x"], lora_dropout=0.0)
    model = load_lora_model(cfg, torch.device("cpu"), bf16_base=False)  # fp32: exact compare
    with torch.no_grad():  # an adapter that changes the model (B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    examples, _ = load_preference_examples([str(FILES[2])], tokenizer)
    loss = PreferenceLoss(model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = [s for ex in examples for s in (ex.chosen, ex.rejected)]
    want = []
    with torch.no_grad():
        for s in samples:  # one sample at a time, full logits: the plain definition
            logp = base(torch.tensor([s.input_ids])).logits[0, :-1].log_softmax(-1)
            labels = torch.tensor(s.labels[1:])
            keep = labels != IGNORE_INDEX
            want.append(logp[keep].gather(1, labels[keep, None]).sum())
    want = torch.stack(want)
    for fast in (True, False):  # packed pieces and the plain padded batch
        [(piece, share)] = collate_pairs(examples, tokenizer.pad_token_id, fast, 10_000)["pieces"]
        assert share == 1.0
        with torch.no_grad():
            ref = loss.reference_logps(**piece)
            policy, counts = loss.sequence_logps(**piece)
        torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-3)
        assert (policy - ref).abs().max() > 0.1  # the adapter is back on after the reference
        assert counts.tolist() == [sum(x != IGNORE_INDEX for x in s.labels[1:]) for s in samples]
    assert model.training  # the reference ran in eval mode and left train mode as it was


def _marker_pairs(path: Path, n: int = 24) -> Path:
    """Chosen answers all end with the marker word, rejected never."""
    with path.open("w") as f:
        for k in range(n):
            pair = {"prompt": f"what is item {k}?", "chosen": f"item {k} {MARKER}",
                    "rejected": f"item {k} is nice"}  # fmt: skip
            f.write(json.dumps(pair) + "\n")
    return path


def _cfg(model: Path, data: Path, out: Path, **kw) -> DPOConfig:
    base = dict(model=str(model), dataset=[str(data)], output=out, val_split=0.0, lora_rank=16,
                logging_steps=1, save_steps=1000, eval_steps=1000, overwrite=True)  # fmt: skip
    return DPOConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> tuple[Path, int]:
    """A DPO run on the marker pairs (and how many base models it loaded)."""
    import loraforge.models

    tmp = tmp_path_factory.mktemp("dpo")
    data = _marker_pairs(tmp / "pairs.jsonl")
    loads = []
    load_model = loraforge.models.load_model

    def counted(*args, **kwargs):
        loads.append(1)
        return load_model(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loraforge.models, "load_model", counted)
        out = run_dpo(_cfg(tiny_model_dir, data, tmp / "out", max_steps=30, learning_rate=1e-2))
    return out, len(loads)


def test_margin_rises_with_one_model_in_memory(trained):
    out, loads = trained
    assert loads == 1  # the reference is the same model with its adapter disabled
    rows = [r for r in read_metrics(out) if "train_rewards_margin" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["train_rewards_margin"] == 0.0  # step 1: B = 0, the policy is the reference
    assert rows[0]["train_loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2
    last = rows[-5:]
    assert min(r["train_rewards_margin"] for r in last) > 0.1
    assert all(r["train_rewards_accuracy"] == 1.0 for r in last)
    assert last[-1]["train_rewards_chosen"] > last[-1]["train_rewards_rejected"]
    assert (out / "tb").is_dir() and (out / "adapter_model.safetensors").is_file()


def test_chat_prefers_the_chosen_style_afterwards(trained, tiny_model_dir):
    from loraforge.infer.chat import ChatSession
    from loraforge.infer.engine import open_engine
    from loraforge.infer.sampling import SamplingOptions

    greedy = SamplingOptions(temperature=0.0, max_new_tokens=8).to_params()

    def answer(**where) -> str:
        engine, name = open_engine(dtype="float32", **where)
        with engine:
            return "".join(ChatSession(engine, greedy, adapter=name).ask("what is item 99?"))

    assert MARKER in answer(adapter=str(trained[0]))
    assert MARKER not in answer(model=str(tiny_model_dir))


def test_simpo_needs_no_reference_and_raises_the_margin(tmp_path, tiny_model_dir, monkeypatch):
    def no_reference(*a, **k):
        raise AssertionError("simpo ran a reference forward")

    monkeypatch.setattr(PreferenceLoss, "reference_logps", no_reference)
    data = _marker_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = _cfg(tiny_model_dir, data, tmp_path / "out", loss="simpo", max_steps=8,
               learning_rate=1e-2)  # fmt: skip
    assert cfg.beta == 2.0
    rows = [r for r in read_metrics(run_dpo(cfg)) if "train_rewards_margin" in r]
    assert rows[-1]["train_rewards_margin"] > rows[0]["train_rewards_margin"] + 0.1


def test_resume_continues_the_same_curve(tmp_path, tiny_model_dir):
    data = _marker_pairs(tmp_path / "pairs.jsonl", n=10)
    cfg = _cfg(tiny_model_dir, data, tmp_path / "a", max_steps=6, save_steps=3, learning_rate=5e-3,
               batch_size=2, val_split=0.2, eval_steps=3)  # fmt: skip
    whole = read_metrics(run_dpo(cfg))
    # the same run, stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    again = cfg.model_copy(update={"output": tmp_path / "b", "resume": True, "overwrite": False})
    with pytest.raises(CheckpointError, match="beta"):
        run_dpo(again.model_copy(update={"beta": 0.5}))
    resumed = read_metrics(run_dpo(again))
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    for want, got in zip(whole, resumed, strict=True):
        for key in ("train_loss", "train_rewards_margin", "val_loss", "val_rewards_accuracy"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, want)


def test_cli_dpo_flags_and_a_missing_dataset():
    from loraforge.cli import app

    res = CliRunner().invoke(app, ["dpo", "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    for name in ("--beta", "--loss", "--simpo-gamma", "--lora-rank", "--resume-from"):
        assert name in res.output
    res = CliRunner().invoke(app, ["dpo"])
    assert res.exit_code != 0 and "pass --dataset" in res.output
