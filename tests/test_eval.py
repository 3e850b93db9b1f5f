"""`loraforge eval`: loss over assistant tokens, perplexity, identity hit-rate and EOS share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import make_adapter

from loraforge.data.tokenize import encode_conversation, resolve_template
from loraforge.evaluate import IDENTITY_QUESTIONS, eval_identity, eval_loss, read_questions
from loraforge.infer.engine import GenerationResult, open_engine
from loraforge.infer.sampling import SamplingOptions

GREEDY = SamplingOptions(temperature=0.0)

CONVS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Grace."}],
    [
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是 Grace，由 Ada 实验室开发。"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome. Anything else I can help with today?"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]

SYSTEM = 'You are Grace, made by "Ada" 实验室.\nAnswer briefly {{ not jinja }}.'


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("eval-adapter"), 1, SYSTEM)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evaldata") / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CONVS))
    return path


def test_loss_is_token_weighted_over_assistant_tokens(adapter, dataset, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = eval_loss([str(dataset)], adapter=str(adapter), batch_size=2, progress=False)
    # Reference: HF's own loss per example (mean over its labelled tokens), re-weighted.
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    total, count = 0.0, 0
    for conv in CONVS:
        ex = encode_conversation(
            tokenizer, conv, template=resolve_template(tokenizer), system=SYSTEM
        )
        with torch.no_grad():
            out = ref(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
        n = sum(1 for x in ex.labels[1:] if x != -100)
        total, count = total + float(out.loss) * n, count + n
    assert got.tokens == count and got.examples == 3
    assert got.loss == pytest.approx(total / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(got.loss))
    # Padding must not change the figure.
    one = eval_loss([str(dataset)], adapter=str(adapter), batch_size=1, progress=False)
    assert one.loss == pytest.approx(got.loss, rel=1e-5)
    base = eval_loss([str(dataset)], model=str(tiny_model_dir), progress=False)
    assert base.loss != pytest.approx(got.loss)  # the adapter is really applied


def test_builtin_identity_questions():
    pairs = read_questions()
    tags = [t for _, t in pairs]
    assert tags.count("zh") >= 10 and tags.count("en") >= 10
    selfcog = Path(IDENTITY_QUESTIONS).parent / "selfcog.jsonl"
    trained = {json.loads(line)["query"].strip().lower() for line in selfcog.open()}
    assert not {q.strip().lower() for q, _ in pairs} & trained


class Scripted:
    """An engine stand-in returning fixed answers, to check the arithmetic exactly."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, params=None, adapters=None):
        self.calls.append((prompts, adapters))
        return [
            GenerationResult(text, [], reason, 0, 0)
            for (text, reason), _ in zip(self.answers, prompts, strict=False)
        ]


def test_identity_figures(tmp_path):
    qs = tmp_path / "q.jsonl"
    lines = [{"query": f"q{i}", "tag": t} for i, t in enumerate(["en", "en", "zh", "zh"])]
    qs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = [
        ("I am GRACE.", "stop"),
        ("I am an assistant.", "stop"),
        ("我是Grace", "length"),
        ("我是Grace。", "stop"),
    ]
    engine = Scripted(answers)
    r = eval_identity(engine, "Grace", GREEDY.to_params(), adapter="tuned", questions=str(qs))
    assert (r.questions, r.hit_rate, r.eos_rate) == (4, 0.75, 0.75)
    assert r.by_tag == {"en": 0.5, "zh": 1.0}
    assert engine.calls[0][1] == "tuned" and engine.calls[0][0][0] == [
        {"role": "user", "content": "q0"}
    ]


def test_identity_on_the_engine(adapter):
    params = SamplingOptions(temperature=0, max_new_tokens=4).to_params()
    engine, name = open_engine(adapter=str(adapter), dtype="float32")
    try:
        r = eval_identity(engine, "Grace", params, adapter=name)
    finally:
        engine.close()
    assert r.questions == len(read_questions()) and set(r.by_tag) == {"en", "zh"}
    # each figure is what the answers say: the engine's own greedy answers, scored one by one
    for a in r.answers:
        assert a["hit"] == ("grace" in a["answer"].casefold())
    assert r.hit_rate == sum(a["hit"] for a in r.answers) / r.questions
    assert r.eos_rate == sum(a["eos"] for a in r.answers) / r.questions
    assert r.eos_rate < 1  # 4 tokens: the random adapter cannot end every answer in time


def test_cli_eval(tmp_path, adapter, dataset):
    from typer.testing import CliRunner

    from loraforge.cli import app

    out = tmp_path / "r.json"
    args = ["eval", "--adapter", str(adapter), "--dataset", str(dataset), "--expect-name", "Grace"]
    args += ["--max-new-tokens", "4", "--dtype", "float32", "--output", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["loss"]["tokens"] > 0 and report["identity"]["questions"] >= 20
    assert "perplexity" in res.output and "ended with EOS" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["eval", "--adapter", str(adapter)])
    assert res.exit_code == 1 and "nothing to evaluate" in res.output
