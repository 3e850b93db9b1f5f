"""`loraforge chat`: the adapter's template/system are used, history is kept, the REPL works."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_adapter

from loraforge.adapters import AdapterError
from loraforge.data.tokenize import prompt_ids, resolve_template
from loraforge.infer.chat import ChatSession, one_shot, open_engine, sampling

GREEDY = {"temperature": 0.0, "max_new_tokens": 10}

SYSTEM = 'You are Grace, made by "Ada" 实验室.\nAnswer briefly {{ not jinja }}.'


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("chat-adapter"), 1, SYSTEM)


@pytest.fixture(scope="module")
def engine(adapter):
    engine, name = open_engine(adapter=str(adapter), dtype="float32")
    assert name == "tuned"
    yield engine
    engine.close()


def answer(engine, turns: list[str], system: str | None = None) -> list[str]:
    session = ChatSession(engine, sampling(**GREEDY), adapter="tuned", system=system)
    return ["".join(session.ask(t)) for t in turns]


def test_one_shot_uses_the_adapters_template_and_system(engine, adapter, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    session = ChatSession(engine, sampling(**GREEDY), adapter="tuned")
    got = one_shot(session, "你是谁？")
    assert capsys.readouterr().out == got + "\n"

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    tok = engine.tokenizer
    conv = [{"role": "user", "content": "你是谁？"}]
    ids = prompt_ids(tok, conv, template=resolve_template(tok), system=SYSTEM)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    want = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert got == want.split("<|im_end|>")[0]


def test_history_system_and_reset(engine):
    session = ChatSession(engine, sampling(**GREEDY), adapter="tuned")
    deltas = list(session.ask("hello"))
    assert len(deltas) > 1  # streamed as produced, not one block at the end
    first = "".join(deltas)
    assert session.messages("again?") == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "again?"},
    ]
    # The engine renders the whole history through the template, with the recorded system.
    rendered = engine.tokenizer.decode(engine.encode(session.messages("again?"), "tuned"))
    assert rendered.count("<|im_start|>user") == 2 and "You are Grace" in rendered
    session.system = "Be terse."
    rendered = engine.tokenizer.decode(engine.encode(session.messages("x"), "tuned"))
    assert "Be terse." in rendered and "You are Grace" not in rendered
    session.reset()
    assert session.messages("x") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "x"},
    ]


def test_sampling_flags():
    p = sampling(0, 0.9, 40, 12, 1.1, 7)
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.repetition_penalty, p.seed) == (
        0,
        0.9,
        40,
        12,
        1.1,
        7,
    )
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(Exception, match="--"):
            sampling(**bad)


def test_model_mismatch_names_both(tmp_path, adapter, tokenizer, tiny_model_dir):
    from conftest import make_tiny_model
    from typer.testing import CliRunner

    from loraforge.cli import app

    other = make_tiny_model(tmp_path / "other-base", tokenizer, seed=5)
    with pytest.raises(AdapterError) as e:
        open_engine(model=str(other), adapter=str(adapter))
    assert "other-base" in str(e.value) and str(tiny_model_dir) in str(e.value)
    res = CliRunner().invoke(app, ["chat", "--adapter", str(adapter), "--model", str(other)])
    assert res.exit_code == 1 and "other-base" in res.output


def test_cli_one_shot(adapter, engine):
    from typer.testing import CliRunner

    from loraforge.cli import app

    args = ["chat", "--adapter", str(adapter), "-q", "你是谁？", "--dtype", "float32"]
    args += ["--temperature", "0", "--max-new-tokens", "10"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.endswith(answer(engine, ["你是谁？"])[0] + "\n")
    res = CliRunner().invoke(app, ["chat", "--adapter", "/no/such/dir", "-q", "hi"])
    assert res.exit_code == 1 and "not an adapter dir" in res.output


def test_repl_through_a_pseudo_terminal(adapter, engine):
    import pexpect

    first, second = answer(engine, ["hello", "and you?"])
    (terse,) = answer(engine, ["hello"], system="Be terse.")
    assert first.strip() and second.strip() and terse.strip()  # else "in" below proves nothing
    exe = Path(sys.executable).parent / "loraforge"
    args = ["chat", "--adapter", str(adapter), "--dtype", "float32"]
    args += ["--temperature", "0", "--max-new-tokens", "10"]
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "200"}
    child = pexpect.spawn(str(exe), args, encoding="utf-8", timeout=90, env=env)
    try:

        def turn(line: str) -> str:
            child.sendline(line)
            child.expect_exact(">>> ")
            return child.before.replace("\r\n", "\n")

        child.expect_exact(">>> ")
        assert first in turn("hello")
        assert second in turn("and you?")  # the second turn saw the first through the template
        assert "conversation cleared" in turn("/reset")
        assert first in turn("hello")  # after /reset: the same answer as a fresh conversation
        turn("/reset")
        assert "Be terse." in turn("/system Be terse.")
        assert terse in turn("hello")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_bundled_model_one_shot():
    from typer.testing import CliRunner

    from loraforge.cli import app

    args = ["chat", "-q", "What is the capital of France?", "--temperature", "0"]
    res = CliRunner().invoke(app, [*args, "--max-new-tokens", "16"])
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


def test_repl_survives_an_engine_error():
    import io

    from loraforge.errors import UserError
    from loraforge.infer.chat import repl

    class Failing:
        base_name = "fake"

        def stream(self, messages, params=None, adapter=None):
            if messages[-1]["content"] == "too long":
                raise UserError("prompt of 9000 tokens exceeds the model's context")
            yield "ok"

    session = ChatSession(Failing(), params=None)
    lines = iter(["too long", "hi", "/exit", "never read"])
    out = io.StringIO()
    repl(session, read=lambda _: next(lines), out=out)
    assert "error: prompt of 9000 tokens" in out.getvalue() and "ok\n" in out.getvalue()
    assert session.history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    assert next(lines) == "never read"
