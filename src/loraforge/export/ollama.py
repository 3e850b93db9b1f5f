"""`export gguf --ollama`: a Modelfile beside the GGUF that renders prompts as training did.

Ollama renders prompts with a Go text/template, not the Jinja template training used, so the
Jinja template is translated. Not by parsing Jinja: the template is rendered on probe
conversations and read back as its per-role pieces (what goes before and after a system, user
and assistant message, what comes first in a conversation, and the generation prompt). That
covers the templates that render each message the same way wherever it stands (ChatML, Llama
3, Phi-3, Qwen 2/2.5, ...); the translation is then re-rendered on test conversations and
compared with the Jinja rendering, and a template it cannot express is refused in one line.

Every literal is written as a Go string (``{{ "<|im_start|>user\\n" }}``), so no newline can
be eaten by a ``{{-`` trim and no "{{" in a template's text can be read as an action.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError

_PROBE = {"system": "\x01probe-system\x01", "user": "\x01probe-user\x01"}
_ANSWER = "\x01probe-answer\x01"


class OllamaTemplateError(UserError):
    """A chat template that cannot be written as an Ollama TEMPLATE."""


@dataclass
class TurnFormat:
    """A template read back as pieces: first + (open[role] + content + close[role])* + gen."""

    first: str  # before the first message (a BOS text, or nothing)
    open: dict[str, str]
    close: dict[str, str]
    generation: str  # the generation prompt (e.g. "<|im_start|>assistant\n")
    default_system: str | None  # what the template inserts when there is no system message

    def render(self, messages: list[dict], generation: bool = True) -> str:
        """What the Go TEMPLATE below renders (Python's reading of it, for the check)."""
        body = "".join(
            self.open[m["role"]] + m["content"] + self.close[m["role"]] for m in messages
        )
        if not messages or messages[0]["role"] != "system":
            body = self.default_block + body
        return self.first + body + (self.generation if generation else "")

    @property
    def default_block(self) -> str:
        """The system block the template inserts in a conversation without one ("" if none)."""
        if self.default_system is None:
            return ""
        return self.open["system"] + self.default_system + self.close["system"]


def _render(tokenizer, template: str, messages: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


def read_turn_format(tokenizer, template: str) -> TurnFormat:
    """Read the per-role pieces of ``template`` from renderings of probe conversations."""
    conv = [
        {"role": "system", "content": _PROBE["system"]},
        {"role": "user", "content": _PROBE["user"]},
        {"role": "assistant", "content": _ANSWER},
        {"role": "user", "content": _PROBE["user"]},
    ]
    try:
        steps = [_render(tokenizer, template, conv[:k], False) for k in range(1, len(conv) + 1)]
        with_gen = _render(tokenizer, template, conv, True)
        no_system = _render(tokenizer, template, conv[1:2], False)
    except Exception as e:  # noqa: BLE001 - a template raising on a probe is not expressible
        raise OllamaTemplateError(f"--ollama: the chat template fails on a probe ({e})") from e
    pieces = []
    for prev, cur in zip(["", *steps], steps, strict=False):
        if not cur.startswith(prev):
            raise OllamaTemplateError(
                "--ollama: this chat template re-renders earlier messages; "
                "it cannot be written as an Ollama TEMPLATE"
            )
        pieces.append(cur[len(prev) :])
    opens, closes = {}, {}
    for msg, piece in zip(conv[1:], pieces[1:], strict=True):
        content = msg["content"]
        if piece.count(content) != 1:
            raise OllamaTemplateError(
                f"--ollama: the chat template does not render a {msg['role']} message as-is"
            )
        before, after = piece.split(content)
        if opens.setdefault(msg["role"], before) != before:
            raise OllamaTemplateError("--ollama: the chat template renders user turns unevenly")
        closes.setdefault(msg["role"], after)
    if pieces[0].count(_PROBE["system"]) != 1:
        raise OllamaTemplateError("--ollama: the chat template has no system role of its own")
    first_and_open, closes["system"] = pieces[0].split(_PROBE["system"])
    first, opens["system"], default = _first_and_default(
        no_system, first_and_open, opens["user"], closes["system"]
    )
    fmt = TurnFormat(first, opens, closes, with_gen[len(steps[-1]) :], default)
    for messages in _CHECKS:  # the translation must render exactly like the template
        for gen in (True, False):
            if fmt.render(messages, gen) != _render(tokenizer, template, messages, gen):
                raise OllamaTemplateError(
                    "--ollama: this chat template cannot be written as an Ollama TEMPLATE "
                    "(it renders some message differently by position)"
                )
    return fmt


_CHECKS = [
    [{"role": "user", "content": "u"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2 \n with {{ braces }}"},
    ],
]


def _first_and_default(no_system: str, first_and_open: str, user_open: str, system_close: str):
    """(what opens a conversation, the system open, the default system text or None), from the
    rendering of a conversation without a system message. A template that inserts its own
    system text (SmolLM2: "You are a helpful AI assistant named SmolLM, ...") gets it as the
    default; Ollama then always sees a system message first, so "first" can stay in its open."""
    head = no_system.split(_PROBE["user"])[0]
    if not head.endswith(user_open):
        raise OllamaTemplateError("--ollama: the chat template renders user turns unevenly")
    pre = head[: len(head) - len(user_open)]
    if (
        pre.startswith(first_and_open)
        and pre.endswith(system_close)
        and len(pre) >= len(first_and_open) + len(system_close)
    ):
        return "", first_and_open, pre[len(first_and_open) : len(pre) - len(system_close)]
    if not first_and_open.startswith(pre):
        raise OllamaTemplateError("--ollama: the chat template opens conversations unevenly")
    return pre, first_and_open[len(pre) :], None


def _go(text: str) -> str:
    """``text`` as a Go template action printing it (a JSON string is a valid Go string)."""
    if not text:
        return ""
    # Ollama's Modelfile parser drops runes Go does not call printable: escape them for Go
    literal = "".join(
        c if c.isprintable() else json.dumps(c)[1:-1] for c in json.dumps(text, ensure_ascii=False)
    )
    return "{{ " + literal + " }}"


def go_template(fmt: TurnFormat) -> str:
    """The Ollama TEMPLATE. Ollama puts SYSTEM first in .Messages when a request has no system
    message; without SYSTEM, the template inserts its own default as the Jinja one does."""
    parts = ["{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    if fmt.first:
        parts.append("{{ if eq $i 0 }}" + _go(fmt.first) + "{{ end }}")
    if fmt.default_block:  # Jinja's "no system message: insert the default one"
        parts.append('{{ if and (eq $i 0) (ne .Role "system") }}' + _go(fmt.default_block))
        parts.append("{{ end }}")
    for n, role in enumerate(("system", "user", "assistant")):
        keyword = "if" if n == 0 else "else if"
        parts.append(
            f'{{{{ {keyword} eq .Role "{role}" }}}}'
            + _go(fmt.open[role])
            + "{{ .Content }}"
            + _go(fmt.close[role])
        )
    parts.append("{{ end }}{{ if $last }}" + _go(fmt.generation) + "{{ end }}{{ end }}")
    return "".join(parts)


def modelfile_text(gguf_name: str, fmt: TurnFormat, system: str | None, stops: list[str]) -> str:
    if system is not None:  # what training put in front of a conversation without a system
        fmt = dataclasses.replace(fmt, default_system=system)  # message, "" included
    for text in (system or "", *stops):
        if '"""' in text or not text.replace("\n", "").replace("\t", "").isprintable():
            raise OllamaTemplateError(
                '--ollama: a system prompt or stop text holds """ or a control character, '
                "which a Modelfile cannot carry"
            )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(fmt)}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, fmt: TurnFormat, system: str | None, stops: list[str]) -> Path:
    """Write ``NAME.Modelfile`` beside ``NAME.gguf`` (``ollama create NAME -f NAME.Modelfile``)."""
    from loraforge.fsutil import atomic_write_text

    path = gguf_path.with_suffix(".Modelfile")
    atomic_write_text(path, modelfile_text(gguf_path.name, fmt, system, stops))
    return path
