"""Render conversations with the model's own chat template and build the label mask.

The mask comes from character offsets: every assistant turn's span is the text that rendering
``messages[:i+1]`` adds to rendering ``messages[:i]`` with the generation prompt. That works for
stock templates, which lack ``{% generation %}`` tags. Labels never depend on "token == pad":
with pad == EOS (the bundled model) that would silently drop the end-of-turn token from the loss
and the tuned model would never stop.

The same ``prompt_ids`` is used at chat time, so training and serving render identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from loraforge.errors import UserError

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


def resolve_template(tokenizer, template: str | None = None) -> str:
    """The Jinja template a user asked for with --template: "chatml", a file, or Jinja text;
    None: the tokenizer's own, else ChatML. Only user input goes through here: a template
    recorded in an adapter dir is text, never a path (see ``template_text``)."""
    if template and template != "chatml" and not _is_jinja(template):
        from pathlib import Path

        path = Path(template)
        if not path.is_file():
            raise TemplateError(f"--template: {template} is neither 'chatml' nor a file")
        return path.read_text()
    return template_text(tokenizer, template)


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


# For templates that know nothing of tools (SmolLM2's, ChatML): the tool list goes into the
# system prompt, in the call format the sharegpt function_call turns use, so that a model
# trained on tool calls sees the definitions it is calling. Chat time renders the same way.
TOOLS_PROMPT = (
    "You can call the tools below. To call one, answer with a JSON object "
    '{"name": <tool name>, "arguments": <arguments object>}.\n'
)


def _tools_in_system(messages: list[dict], tools) -> list[dict]:
    listing = (
        tools
        if isinstance(tools, str)
        else "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    )
    text = TOOLS_PROMPT + listing
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _render(tokenizer, template: str, messages: list[dict], gen_prompt: bool, tools=None) -> str:
    kwargs = {}
    if tools and "tools" in template:
        kwargs["tools"] = tools
    elif tools:
        messages = _tools_in_system(messages, tools)
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=gen_prompt,
        **kwargs,
    )


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
    """Render ``messages`` and return (text, [(start, end) char span of each assistant turn])."""
    text = _render(tokenizer, template, messages, False, tools)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        upto = _render(tokenizer, template, messages[: i + 1], False, tools)
        if i:
            before = _render(tokenizer, template, messages[:i], True, tools)
        else:  # an opening assistant turn: whatever the template put before it is not its text
            before = upto[: max(upto.rfind(msg["content"]), 0)]
        if not text.startswith(upto) or not upto.startswith(before):
            raise TemplateError(
                "chat template does not render conversations prefix by prefix; "
                "pass --template chatml or a template file"
            )
        end = len(upto.rstrip())  # the newline after the end-of-turn token is not generated
        spans.append((len(before), end))
    return text, spans


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    template: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    tools=None,
) -> Example:
    """Tokenise a conversation; labels cover each assistant turn, its end-of-turn token and EOS."""
    template = template_text(tokenizer, template)
    messages = with_system(messages, system)
    text, spans = assistant_spans(tokenizer, template, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[t] = input_ids[t]
    eos = tokenizer.eos_token_id
    if eos is not None and spans and eos not in _last_labelled_run(labels):
        # Templates like Llama-3 end a turn with <|eot_id|> while EOS differs: teach both.
        input_ids.append(eos)
        labels.append(eos)
    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], True
    return Example(input_ids=input_ids, labels=labels, truncated=truncated)


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
    text = _render(tokenizer, template, with_system(messages, system), True, tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
