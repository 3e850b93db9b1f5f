"""Render conversations with the model's own chat template and build the label mask.

The mask comes from character offsets: every assistant turn's span is the text that rendering
``messages[:i+1]`` adds to rendering ``messages[:i]`` with the generation prompt. That works for
stock templates, which lack ``{% generation %}`` tags. Labels never depend on "token == pad":
with pad == EOS (the bundled model) that would silently drop the end-of-turn token from the loss
and the tuned model would never stop.

The same ``prompt_ids`` is used at chat time, so training and serving render identically. Two
things templates do that the prefix rule alone would trip on are handled here, for both sides:
a template with no usable system role (Gemma 2, Mistral v0.3) gets the system text in front of
the first user turn (``fold_system``), and a template that renders a turn differently once
another user turn follows (Qwen3 drops the reasoning of earlier turns) is read from the full
rendering (``assistant_spans``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraforge.errors import UserError
from loraforge.tools import TOOLS_PROMPT as TOOLS_PROMPT  # noqa: F401 - its old home
from loraforge.tools import render_inputs

IGNORE_INDEX = -100

# Used when a tokenizer has no chat template of its own (or `--template chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The system prompt loraforge puts in front of a conversation that has none, at training and at
# chat time alike. Without it the bundled model's template inserts "You are a helpful AI assistant
# named SmolLM, trained by Hugging Face", which fights any new identity being trained.
DEFAULT_SYSTEM = "You are a helpful AI assistant."


class TemplateError(UserError, ValueError):
    """A chat template that cannot render a conversation as loraforge needs."""


@dataclass
class Example:
    """One tokenised conversation: labels are IGNORE_INDEX outside the assistant turns."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = field(default="", compare=False)

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def resolve_template(tokenizer, template: str | None = None, thinking: bool | None = None) -> str:
    """The Jinja template a user asked for with --template: "chatml", a file, or Jinja text;
    None: the tokenizer's own, else ChatML. Only user input goes through here: a template
    recorded in an adapter dir is text, never a path (see ``template_text``). ``thinking``
    (--thinking) fixes the template's ``enable_thinking`` switch (see ``with_thinking``)."""
    if template and template != "chatml" and not _is_jinja(template):
        from pathlib import Path

        path = Path(template)
        if not path.is_file():
            raise TemplateError(f"--template: {template} is neither 'chatml' nor a file")
        return with_thinking(path.read_text(), thinking)
    return with_thinking(template_text(tokenizer, template), thinking)


def with_thinking(template: str, thinking: bool | None) -> str:
    """``template`` with its ``enable_thinking`` switch (Qwen3) fixed to ``thinking``.

    The setting is written into the template text itself rather than passed at render time:
    the adapter dir records the template, so chat, serve and merge render exactly as training
    did without each of them having to learn about the switch."""
    if thinking is None:
        return template
    if "enable_thinking" not in template:
        raise TemplateError("--thinking: this chat template has no enable_thinking switch")
    return "{%- set enable_thinking = " + ("true" if thinking else "false") + " -%}" + template


def template_text(tokenizer, template: str | None = None) -> str:
    """``template`` as Jinja text: "chatml", Jinja text, or None for the tokenizer's own (else
    ChatML). Anything else is refused rather than read as a path: an adapter's loraforge.json
    naming /proc/self/environ must not put the server's environment into a prompt."""
    if not template:
        return tokenizer.chat_template or CHATML_TEMPLATE
    if template == "chatml":
        return CHATML_TEMPLATE
    if not _is_jinja(template):
        raise TemplateError(f"chat template is not Jinja text: {template[:60]!r}")
    return template


def _is_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def resolve_system(system: str | None) -> str:
    """The system prompt training and chat put in front: ``system``, or DEFAULT_SYSTEM when
    none was given (an empty string means "no system prompt")."""
    return DEFAULT_SYSTEM if system is None else system


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Prepend ``system`` when the conversation has no system message of its own."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


_PROBE = "loraforge system probe"
_system_support: dict[tuple, bool] = {}


def supports_system(tokenizer, template: str) -> bool:
    """Whether ``template`` renders a system message where the prefix rule can use it: present
    in the conversation and in the generation prompt, the latter a prefix of the former. Gemma 2
    raises on one; Mistral v0.3 puts it into the LAST user turn only, so it is absent once an
    answer follows. Found by rendering a probe once per template."""
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _system_support:
        sys_user = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "u"}]
        try:
            full = _apply(tokenizer, template, [*sys_user, {"role": "assistant", "content": "a"}])
            head = _apply(tokenizer, template, sys_user, gen_prompt=True)
            _system_support[key] = _PROBE in full and full.startswith(head)
        except Exception:  # noqa: BLE001 - jinja raise_exception, or a template bug: no system
            _system_support[key] = False
    return _system_support[key]


def fold_system(tokenizer, template: str, messages: list[dict]) -> list[dict]:
    """For a template without a usable system role, the system text goes in front of the first
    user turn, separated by a blank line (as Gemma 3's own template does). The one place this
    happens, for training and serving alike."""
    if not messages or messages[0]["role"] != "system" or supports_system(tokenizer, template):
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    for i, msg in enumerate(rest):
        if msg["role"] == "user":
            text = f"{system}\n\n{msg['content']}" if system else msg["content"]
            rest[i] = {**msg, "content": text}
            return rest
    return messages  # no user turn to carry it: the template gets it as it is


_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_think(messages: list[dict]) -> list[dict]:
    """Assistant turns without their ``<think>...</think>`` blocks (--think strip)."""
    return [
        {**m, "content": _THINK_BLOCK.sub("", m["content"])}
        if m["role"] == "assistant" and isinstance(m.get("content"), str)
        else m
        for m in messages
    ]


def _render(tokenizer, template: str, messages: list[dict], gen_prompt: bool, tools=None) -> str:
    # tools and tool turns as the template's family writes them (loraforge/tools.py)
    messages, kwargs = render_inputs(template, messages, tools)
    messages = fold_system(tokenizer, template, messages)
    return _apply(tokenizer, template, messages, gen_prompt, **kwargs)


def _apply(tokenizer, template: str, messages: list[dict], gen_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=gen_prompt,
        **kwargs,
    )


def _epilogue(tokenizer, template: str) -> str:
    """What the template appends after the last message when there is no generation prompt
    (Phi-3: EOS), found by comparing the two renderings of one user turn. "" for most."""
    msgs = [{"role": "user", "content": "u"}]
    plain = _apply(tokenizer, template, msgs)
    return plain[_shared_prefix(tokenizer, plain, _apply(tokenizer, template, msgs, True)) :]


def _shared_prefix(tokenizer, text: str, other: str) -> int:
    """Length of the common prefix of ``text`` and ``other``, moved back to the start of the
    token of ``text`` it ends in: "<|end|>\n<|endoftext|>" and "<|end|>\n<|assistant|>" share
    "<|end|>\n<|" by characters, but differ from the token "<|endoftext|>" on."""
    n = 0
    while n < min(len(text), len(other)) and text[n] == other[n]:
        n += 1
    if n == len(text):
        return n
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return next((a for a, b in offsets["offset_mapping"] if a <= n < b), n)


def _end_of_turn(tokenizer, template: str, epilogue: str) -> str:
    """The text the template puts after an assistant answer (e.g. "<|im_end|>", "</s>")."""
    answer = "loraforge answer probe"
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": answer}]
    text = _apply(tokenizer, template, msgs)
    tail = text[text.rfind(answer) + len(answer) :]
    if epilogue and tail.endswith(epilogue):
        tail = tail[: -len(epilogue)]
    return tail.strip()


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            if template is None or tok in template or tid == tokenizer.eos_token_id:
                ids.add(tid)
    return sorted(ids)


def assistant_spans(
    tokenizer, template: str, messages: list[dict], tools=None
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, [(start, end) char span of each assistant turn]).

    A turn's span is what rendering ``messages[:i+1]`` adds to the generation prompt of
    ``messages[:i]``, through its end-of-turn text. Two template habits are allowed for: an
    epilogue after the last message (Phi-3's EOS), which belongs to the last turn only; and a
    turn rendered differently once another user turn follows (Qwen3 drops an earlier turn's
    <think> block), whose span then runs from its generation prompt to its end-of-turn text in
    the full rendering: what the model sees in history is what it is trained on there."""
    text = _render(tokenizer, template, messages, False, tools)
    epilogue = _epilogue(tokenizer, template)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        upto = _render(tokenizer, template, messages[: i + 1], False, tools)
        if i:
            before = _render(tokenizer, template, messages[:i], True, tools)
        else:  # an opening assistant turn: whatever the template put before it is not its text
            before = upto[: max(upto.rfind(msg["content"]), 0)]
        if epilogue and not text.startswith(upto) and upto.endswith(epilogue):
            upto = upto[: -len(epilogue)]
        if text.startswith(upto) and upto.startswith(before):
            # the newline after the end-of-turn token is not generated
            spans.append((len(before), len(upto.rstrip())))
        else:
            history = _render(tokenizer, template, messages[:i], False, tools) if i else ""
            spans.append(_span_in_history(tokenizer, template, text, before, history, epilogue))
    return text, spans


def _span_in_history(
    tokenizer, template: str, text: str, before: str, history: str, epilogue: str
) -> tuple[int, int]:
    """A turn as the full rendering shows it: from where its generation prompt and the text
    part (Qwen3 with thinking off: history has no empty <think> block) to its end-of-turn text.
    The start never reaches back into the earlier messages."""
    start = _shared_prefix(tokenizer, text, before)
    eot = _end_of_turn(tokenizer, template, epilogue)
    at = text.find(eot, start) if eot and start >= len(history) else -1
    if at < 0:
        raise TemplateError(
            "chat template does not render conversations prefix by prefix; "
            "pass --template chatml or a template file"
        )
    return start, at + len(eot)


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    template: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    tools=None,
    think: str = "keep",
) -> Example:
    """Tokenise a conversation; labels cover each assistant turn, its end-of-turn token and EOS.
    ``think="strip"`` drops the answers' <think>...</think> blocks first."""
    template = template_text(tokenizer, template)
    messages = with_system(messages, system)
    if think == "strip":
        messages = strip_think(messages)
    text, spans = assistant_spans(tokenizer, template, messages, tools)
    input_ids, labels = [], []
    for tid, start, end in _tokenize_cut(tokenizer, text, [s for s, _ in spans]):
        input_ids.append(tid)
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(tid if inside else IGNORE_INDEX)
    eos = tokenizer.eos_token_id
    if eos is not None and spans and eos not in _last_labelled_run(labels):
        # Templates like Llama-3 end a turn with <|eot_id|> while EOS differs: teach both.
        input_ids.append(eos)
        labels.append(eos)
    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], True
    return Example(input_ids=input_ids, labels=labels, truncated=truncated)


def _tokenize_cut(tokenizer, text: str, cuts: list[int]) -> list[tuple[int, int, int]]:
    """(token id, start, end) of ``text`` tokenised in pieces cut where each answer starts, as
    chat tokenises a prompt that ends there. Tokenised whole, a BPE may merge across that point
    (SmolLM2's makes "\n\n" one token but "\n\nRome" three: Llama-3's header ends in "\n\n"),
    and the model would be trained on prompts it is never served."""
    bounds = [0, *cuts, len(text)]
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            out.append((tid, a + start, a + end))
    return out


def _last_labelled_run(labels: list[int]) -> list[int]:
    run: list[int] = []
    for x in reversed(labels):
        if x == IGNORE_INDEX:
            if run:
                break
            continue
        run.append(x)
    return run


def prompt_ids(
    tokenizer,
    messages: list[dict],
    *,
    template: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    tools=None,
) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn (chat/serve/infer)."""
    template = template_text(tokenizer, template)
    messages = with_system(messages, system)
    text = _render(tokenizer, template, messages, True, tools)
    cuts = []
    if any(m["role"] == "assistant" for m in messages):  # history cut as training cuts it
        try:
            history, spans = assistant_spans(tokenizer, template, messages, tools)
            cuts = [s for s, _ in spans if text[:s] == history[:s]]
        except TemplateError:  # a template training refuses can still be chatted with
            pass
    return [tid for tid, _, _ in _tokenize_cut(tokenizer, text, cuts)]
