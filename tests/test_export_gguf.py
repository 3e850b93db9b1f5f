"""`export gguf`: llama.cpp's converters, the metadata they embed, the Ollama Modelfile, and the
self-check through llama.cpp.

Conversion tests need llama.cpp's converters (`loraforge export gguf --setup`); the self-check
tests need the llama-cpp-python it builds. Each skips with that reason when its part is absent;
`make test-gguf` does the setup and runs them all, the bundled-model ones included.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import make_adapter

from loraforge.data.tokenize import prompt_ids, resolve_template, with_system
from loraforge.export import llamacpp
from loraforge.export.gguf import GGUFExportError, export_gguf
from loraforge.export.merge import bake_system
from loraforge.export.ollama import OllamaTemplateError, modelfile_text, read_turn_format

SYSTEM = 'You are Grace, made by "Ada" 实验室.\nAnswer briefly {{ not jinja }}.'
TEMPLATES = Path(__file__).parent / "templates"
CONVERSATIONS = [
    [{"role": "user", "content": "你是谁？"}],
    [
        {"role": "user", "content": 'Say "hi" {{ .Content }} \\n'},
        {"role": "assistant", "content": "hi\n\nthere"},
        {"role": "user", "content": "again"},
    ],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
]
needs_converters = pytest.mark.skipif(
    not (llamacpp.tools_dir() / "convert_hf_to_gguf.py").is_file(),
    reason="llama.cpp's converters are not set up (loraforge export gguf --setup; make test-gguf)",
)
needs_llama_cpp = pytest.mark.skipif(
    not llamacpp.runtime_installed(),
    reason="llama-cpp-python is not installed (loraforge export gguf --setup; make test-gguf)",
)


# ---- a Go text/template renderer for the subset the Modelfile uses ----------------------------
# Written from Go's semantics, not from export/ollama.py: a literal is a Go string (JSON-escaped
# text is a valid one), `slice`/`len`/`eq`/`ne`/`and` as in text/template.

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _modelfile_parts(text: str) -> dict:
    """The values of a Modelfile's instructions, as Ollama's parser reads them: a value is
    taken raw between triple quotes (no escapes), or between plain quotes."""
    out: dict = {"PARAMETER stop": []}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER stop) (""".*?"""|".*?"|\S+)$', text,
                         re.MULTILINE | re.DOTALL):  # fmt: skip
        key, value = m.group(1), m.group(2)
        value = value[3:-3] if value.startswith('"""') else value.strip('"')
        if key == "PARAMETER stop":
            out[key].append(value)
        else:
            out[key] = value
    return out


def _eval(expr: str, env: dict):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        return _eval(expr[1:-1], env)
    args = _split_args(expr)
    if len(args) > 1:
        fn, vals = args[0], [_eval(a, env) for a in args[1:]]
        return {
            "eq": lambda a, b: a == b,
            "ne": lambda a, b: a != b,
            "and": lambda a, b: a and b,
            "len": len,
            "slice": lambda x, i: x[i:],
        }[fn](*vals)
    if expr.startswith('"'):
        return json.loads(expr)
    if expr.isdigit():
        return int(expr)
    if expr.startswith("$."):
        return env["$root"][expr[2:]]
    if expr.startswith("$"):
        return env[expr]
    if expr.startswith("."):  # a message's Go fields Role/Content: our dicts' role/content
        field, obj = expr[1:], env["."]
        return obj[field] if field in obj else obj[field.lower()]
    raise AssertionError(f"not in the subset: {expr}")


def _split_args(expr: str) -> list[str]:
    out, depth, cur, quoted = [], 0, "", False
    for ch in expr:
        if ch == '"' and not cur.endswith("\\"):
            quoted = not quoted
        if not quoted and ch in "()":
            depth += 1 if ch == "(" else -1
        if ch == " " and depth == 0 and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + ([cur] if cur else [])


def render_go(template: str, messages: list[dict]) -> str:
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        assert not m.group(1) and not m.group(3), "no trim markers are expected"
        tokens += [("text", template[pos : m.start()]), ("action", m.group(2))]
        pos = m.end()
    tokens.append(("text", template[pos:]))

    def run(i: int, env: dict, out: list, emit: bool) -> tuple[int, str]:
        """Execute from token i until an else/end at this level; return (index, keyword)."""
        while i < len(tokens):
            kind, val = tokens[i]
            i += 1
            if kind == "text":
                out.append(val if emit else "")
            elif val == "end" or val.startswith("else"):
                return i - 1, val
            elif val.startswith("range "):
                var_i, _, source = re.match(r"range (\$\w+), (\$\w+) := (.+)", val).groups()
                items = _eval(source, env)
                start = i
                for n, item in enumerate(items if emit else [None]):
                    i, _ = run(start, {**env, var_i: n, ".": item}, out, emit)
                if not items or not emit:
                    i, _ = run(start, env, [], False)
                i += 1
            elif val.startswith("if "):
                taken = emit and bool(_eval(val[3:], env))
                done = taken
                i, kw = run(i, env, out, taken)
                while kw != "end":
                    cond = kw[len("else if ") :] if kw.startswith("else if") else "true"
                    take = emit and not done and (cond == "true" or bool(_eval(cond, env)))
                    done = done or take
                    i, kw = run(i + 1, env, out, take)
                i += 1
            elif ":=" in val:
                name, expr = val.split(":=")
                env[name.strip()] = _eval(expr, env) if emit else None
            else:
                out.append(str(_eval(val, env)) if emit else "")
        return i, ""

    out: list[str] = []
    root = {"Messages": messages}
    run(0, {"$root": root, ".": root}, out, True)  # at the top, dot is the data, as in Go
    return "".join(out)


def ollama_prompt(modelfile: str, conversation: list[dict]) -> str:
    """What Ollama renders for a chat request: SYSTEM first unless the request has a system
    message, then the TEMPLATE over .Messages."""
    parts = _modelfile_parts(modelfile)
    messages = list(conversation)
    if "SYSTEM" in parts and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": parts["SYSTEM"]}, *messages]
    return render_go(parts["TEMPLATE"], messages)


# ---- the Modelfile ------------------------------------------------------------------------------


@pytest.mark.parametrize("system", [SYSTEM, "", None])
def test_modelfile_renders_prompts_as_training(tokenizer, system):
    template = resolve_template(tokenizer)
    text = modelfile_text("m.gguf", read_turn_format(tokenizer, template), system, ["<|im_end|>"])
    parts = _modelfile_parts(text)
    assert parts["FROM"] == "./m.gguf" and parts["PARAMETER stop"] == ["<|im_end|>"]
    assert "\n" not in parts["TEMPLATE"]  # one line: Ollama's parser keeps it byte for byte
    for conv in CONVERSATIONS:
        got = ollama_prompt(text, conv)
        want = tokenizer.apply_chat_template(
            with_system(conv, system), chat_template=template, tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        assert got == want
        ids = tokenizer(got, add_special_tokens=False)["input_ids"]
        assert ids == prompt_ids(tokenizer, conv, template=template, system=system)
    if system is None:  # the template's own default ("... named SmolLM ...") stays in force
        assert "SmolLM" in ollama_prompt(text, CONVERSATIONS[0])


@pytest.mark.parametrize("name", ["llama3.jinja", "llama31.jinja"])
def test_modelfile_other_families(tokenizer, name):
    template = (TEMPLATES / name).read_text()
    text = modelfile_text("m.gguf", read_turn_format(tokenizer, template), SYSTEM, ["<|eot_id|>"])
    for conv in CONVERSATIONS:
        want = tokenizer.apply_chat_template(
            with_system(conv, SYSTEM), chat_template=template, tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        assert ollama_prompt(text, conv) == want


@pytest.mark.parametrize("name", ["gemma2.jinja", "mistral.jinja", "phi3.jinja", "qwen3.jinja"])
def test_modelfile_refuses_what_it_cannot_express(tokenizer, name):
    with pytest.raises(OllamaTemplateError, match="--ollama"):
        read_turn_format(tokenizer, (TEMPLATES / name).read_text())


# ---- arguments and setup ------------------------------------------------------------------------


def test_refusals_are_one_line(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFExportError, match="exactly one of"):
        export_gguf(out)
    with pytest.raises(GGUFExportError, match="--quant q5_0"):
        export_gguf(out, model=str(tmp_path), quant="q5_0")
    with pytest.raises(GGUFExportError, match=r"\*\.gguf"):
        export_gguf(tmp_path / "m.bin", model=str(tmp_path))
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(llamacpp.GGUFToolsMissing, match="loraforge export gguf --setup"):
        export_gguf(out, model=str(tmp_path), check=False)


def test_a_signal_in_llama_cpp_is_reported_as_such(monkeypatch):
    monkeypatch.setattr(llamacpp, "require_runtime", lambda: None)
    monkeypatch.setattr(
        llamacpp.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -4, "", "")
    )
    with pytest.raises(llamacpp.LlamaCppError, match="llama.cpp died with SIGILL while loading"):
        llamacpp.in_llama_cpp({"op": "check"}, "loading it")


# ---- conversion through llama.cpp's converters -----------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), 1, SYSTEM)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, adapter):
    """The tiny adapter exported once (f16, Modelfile), not self-checked: a random model's
    logits are near ties everywhere, so f16 weights part from fp32 ones after a few tokens (seen:
    3/5 answers identical). The self-check's claims are tested on the bundled model below."""
    if not (llamacpp.tools_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converters are not set up (loraforge export gguf --setup)")
    out = tmp_path_factory.mktemp("gguf") / "grace.gguf"
    return export_gguf(out, adapter=adapter, ollama=True, check=False, echo=lambda _: None)


@needs_converters
def test_gguf_embeds_template_system_and_end_of_turn(exported, tokenizer):
    from gguf import GGUFReader

    fields = GGUFReader(exported.output).fields
    template = resolve_template(tokenizer)
    assert fields["tokenizer.chat_template"].contents() == bake_system(template, SYSTEM)
    eos = fields["tokenizer.ggml.eos_token_id"].contents()
    assert eos == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["general.name"].contents() == "grace"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # as training tokenized
    # the GGUF's own template, with no system message, renders what training fed the model
    embedded = fields["tokenizer.chat_template"].contents()
    for conv in CONVERSATIONS[:2]:
        text = tokenizer.apply_chat_template(
            conv, chat_template=embedded, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == prompt_ids(tokenizer, conv, template=template, system=SYSTEM)
    modelfile = exported.modelfile.read_text()
    assert _modelfile_parts(modelfile)["SYSTEM"] == SYSTEM
    assert ollama_prompt(modelfile, CONVERSATIONS[0]) == tokenizer.decode(
        prompt_ids(tokenizer, CONVERSATIONS[0], template=template, system=SYSTEM)
    )


@needs_converters
def test_lora_only_writes_a_gguf_lora_and_its_template(tmp_path, adapter, tokenizer):
    from gguf import GGUFReader

    r = export_gguf(tmp_path / "grace-lora.gguf", adapter=adapter, lora_only=True, echo=print)
    fields = GGUFReader(r.output).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    jinja = (tmp_path / "grace-lora.jinja").read_text()
    assert jinja == bake_system(resolve_template(tokenizer), SYSTEM)
    assert "--lora" in r.notes[0] and "--chat-template-file" in r.notes[0]


# ---- the self-check through llama.cpp ---------------------------------------------------------


@pytest.mark.slow
@needs_converters
@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_bundled_model(tmp_path, bundled_dir, quant):
    r = export_gguf(tmp_path / f"smollm2-{quant}.gguf", model=bundled_dir, quant=quant, echo=print)
    print(r.check.summary())  # make test-gguf shows the figures (README "Ship")
    assert r.check.ppl_increase <= r.check.max_ppl_increase
    assert r.check.eos == "<|im_end|>"
    if quant == "f16":  # measured: 5/5 answers, 100% of tokens (README "Ship")
        assert r.check.identical_answers == r.check.prompts
        assert r.check.match_share == 1.0
