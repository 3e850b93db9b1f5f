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
from loraforge.infer.chat import ChatSession, one_shot
from loraforge.infer.engine import open_engine
from loraforge.infer.sampling import SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, max_new_tokens=10)

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
    session = ChatSession(engine, GREEDY.to_params(), adapter="tuned", system=system)
    return ["".join(session.ask(t)) for t in turns]


def test_one_shot_uses_the_adapters_template_and_system(engine, adapter, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    session = ChatSession(engine, GREEDY.to_params(), adapter="tuned")
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
    session = ChatSession(engine, GREEDY.to_params(), adapter="tuned")
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


def test_sampling_options():
    p = SamplingOptions(
        temperature=0, top_p=0.9, top_k=40, max_new_tokens=12, repetition_penalty=1.1, seed=7
    ).to_params(stop=["x"])
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.repetition_penalty, p.seed) == (
        0,
        0.9,
        40,
        12,
        1.1,
        7,
    )
    assert p.stop == ["x"]
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"top_p": float("nan")}):
        with pytest.raises(ValueError):
            SamplingOptions(**bad)


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--temperature", "-1"], "error: --temperature -1.0: must be >= 0"),
        (["--top-p", "1.5"], "error: --top-p 1.5: must be <= 1"),
        (["--top-k", "-2"], "error: --top-k -2: must be >= 0"),
        (["--max-new-tokens", "0"], "error: --max-new-tokens 0: must be >= 1"),
        (["--repetition-penalty", "inf"], "error: --repetition-penalty inf: must be a finite"),
    ],
)
def test_bad_sampling_flag_is_one_line(flags, line):
    from typer.testing import CliRunner

    from loraforge.cli import app

    res = CliRunner().invoke(app, ["chat", "-q", "hi", *flags])  # fails before loading a model
    assert res.exit_code == 1 and res.output.startswith(line), res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output


def test_model_mismatch_names_both(tmp_path, adapter, tokenizer, tiny_model_dir):
    from helpers import make_tiny_model
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
