"""`loraforge infer`: every input format, fields kept, batched = alone, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_adapter

from loraforge.data.inputs import prompt_messages, read_inputs
from loraforge.data.sources import DataError
from loraforge.infer.batch import run_infer
from loraforge.infer.engine import open_engine
from loraforge.infer.sampling import SamplingOptions

PARAMS = SamplingOptions(temperature=0.0, max_new_tokens=6)
GREEDY = SamplingOptions(temperature=0.0)
U = "user"

SYSTEM = 'You are Grace, made by "Ada" 实验室.\nAnswer briefly {{ not jinja }}.'


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("infer-adapter"), 1, SYSTEM)


@pytest.fixture(scope="module")
def engine(adapter):
    engine, _ = open_engine(adapter=str(adapter), dtype="float32")
    yield engine
    engine.close()


def test_prompt_of_each_format():
    assert prompt_messages({"query": "hi", "id": 3}) == [{"role": U, "content": "hi"}]
    assert prompt_messages({"question": "q?"}) == [{"role": U, "content": "q?"}]
    assert prompt_messages({"prompt": "p"}) == [{"role": U, "content": "p"}]
    alpaca = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "S"}
    assert prompt_messages(alpaca) == [
        {"role": "system", "content": "S"},
        {"role": U, "content": "Translate\nbonjour"},
    ]
    msgs = {"messages": [{"role": U, "content": "a"}]}
    assert prompt_messages(msgs) == [{"role": U, "content": "a"}]
    answered = {
        "messages": [
            {"role": U, "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": U, "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    assert prompt_messages(answered) == answered["messages"][:3]
    share = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    assert prompt_messages(share) == [{"role": U, "content": "x"}]


def test_read_inputs_txt_and_errors(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("What?\n\n你是谁？\n")
    assert [r for r, _ in read_inputs(txt)] == [{"query": "What?"}, {"query": "你是谁？"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok"}\n{"nothing": 1}\n')
    seen = []
    assert [r for r, _ in read_inputs(bad, echo=seen.append)] == [{"query": "ok"}]
    assert len(seen) == 1 and seen[0].startswith(f"skipped {bad}:2: unknown format")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_inputs(bad, strict=True)
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text('{"nothing": 1}\n')
    with pytest.raises(DataError, match="no usable records, first: .*only_bad.jsonl:1"):
        read_inputs(only_bad)
    with pytest.raises(DataError, match="no such file"):
        read_inputs(tmp_path / "missing.jsonl")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


RECORDS = [
    {"id": 1, "query": "Who are you?"},
    {"id": 2, "instruction": "Say hi", "output": "hi"},
    {"id": 3, "messages": [{"role": "user", "content": "你是谁？"}]},
    {"id": 4, "query": "Who are you?"},
    {"id": 5, "conversations": [{"from": "human", "value": "2+2?"}]},
]


class Counting:
    """Wraps the engine to count the prompts actually generated."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, 0

    def generate(self, prompts, params=None, adapters=None):
        self.prompts += len(prompts)
        return self.engine.generate(prompts, params, adapters=adapters)


def test_batched_output_keeps_fields_and_resumes(tmp_path, engine):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out" / "answers.jsonl"
    params = PARAMS.to_params()
    stats = run_infer(engine, src, out, params, adapter="tuned", batch_size=2, progress=False)
    assert (stats.total, stats.skipped, stats.answered) == (5, 0, 5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "response"} for r in rows] == RECORDS
    # Batched answers equal answers generated one by one.
    for rec, row in zip(RECORDS, rows, strict=True):
        (alone,) = engine.generate([prompt_messages(rec)], params, adapters="tuned")
        assert row["response"] == alone.text
    assert rows[0]["response"] == rows[3]["response"]  # the same question, greedy

    # A killed run: two lines lost and a torn one left behind. Only those are redone.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])
    counting = Counting(engine)
    stats = run_infer(counting, src, out, params, adapter="tuned", progress=False)
    assert (stats.skipped, stats.answered, counting.prompts) == (3, 2, 2)
    assert sorted(out.read_text().splitlines()) == sorted(lines)
    counting.prompts = 0
    stats = run_infer(counting, src, out, params, adapter="tuned", progress=False)
    assert (stats.skipped, stats.answered, counting.prompts) == (5, 0, 0)


def test_system_flag_applies_to_records_without_one(tmp_path, engine):
    src = write_jsonl(tmp_path / "in.jsonl", [{"query": "hi"}])
    seen = []

    class Spy(Counting):
        def generate(self, prompts, params=None, adapters=None):
            seen.extend(prompts)
            return super().generate(prompts, params, adapters)

    run_infer(Spy(engine), src, tmp_path / "o.jsonl", PARAMS.to_params(), system="Be terse.")
    assert seen == [[{"role": "system", "content": "Be terse."}, {"role": U, "content": "hi"}]]


def test_cli_infer_txt(tmp_path, adapter, engine):
    from typer.testing import CliRunner

    from loraforge.cli import app

    src = tmp_path / "q.txt"
    src.write_text("hello\n你是谁？\n")
    out = tmp_path / "a.jsonl"
    args = ["infer", "--adapter", str(adapter), "--input", str(src), "--output", str(out)]
    args += ["--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query"] for r in rows] == ["hello", "你是谁？"]
    want = engine.generate([[{"role": U, "content": "hello"}]], PARAMS.to_params(), "tuned")
    assert rows[0]["response"] == want[0].text
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "0 answered, 2 already" in " ".join(res.output.split())


def test_distill_writes_trainable_records(tmp_path, engine):
    from loraforge.data import load_conversations
    from loraforge.data.distill import distill, to_record
    from loraforge.infer.engine import GenerationResult

    qs = write_jsonl(tmp_path / "q.jsonl", [{"query": f"q{i}", "tag": "en"} for i in range(3)])
    canned = [("a0", "stop"), ("cut off mid", "length"), ("  ", "stop")]

    class Canned:
        def generate(self, prompts, params=None, adapters=None):
            return [GenerationResult(t, [], r, 0, 0) for t, r in canned[: len(prompts)]]

    out = tmp_path / "d.jsonl"
    s = distill(Canned(), out, GREEDY.to_params(), questions=qs, progress=False)
    assert (s.questions, s.written, s.truncated, s.empty) == (3, 1, 1, 1)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {
            "messages": [{"role": U, "content": "q0"}, {"role": "assistant", "content": "a0"}],
            "tag": "en",
        }
    ]
    s = distill(
        Canned(),
        out,
        GREEDY.to_params(),
        questions=qs,
        fmt="alpaca",
        keep_truncated=True,
        progress=False,
    )
    assert s.written == 2 and json.loads(out.read_text().splitlines()[1])["output"] == "cut off mid"
    prompt = [{"role": "system", "content": "S"}, {"role": U, "content": "a"}]
    prompt += [{"role": "assistant", "content": "b"}, {"role": U, "content": "c"}]
    assert to_record(prompt, "d", "alpaca") == {
        "instruction": "c",
        "input": "",
        "output": "d",
        "system": "S",
        "history": [["a", "b"]],
    }

    # On the real engine: the file is accepted by the training data loader as it is.
    out = tmp_path / "real.jsonl"
    params = SamplingOptions(temperature=0, max_new_tokens=4).to_params()
    s = distill(engine, out, params, questions=qs, adapter="tuned", keep_truncated=True)
    convs = load_conversations([str(out)], strict=True)
    assert len(convs) == s.written == 3 - s.empty
