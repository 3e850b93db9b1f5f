"""The official chat templates of the families people fine-tune: labels and train/serve agreement.

Each template (tests/templates/; Gemma 3's from the package, which the bundled gemma3-270m uses)
renders with the bundled SmolLM2 tokenizer, given the family's special tokens as single added
tokens and the family's BOS/EOS. The vocabulary is not the point: the span logic is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraforge.data.templates import GEMMA3_TEMPLATE
from loraforge.data.tokenize import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    prompt_ids,
    resolve_template,
    supports_system,
)

TEMPLATES = Path(__file__).parent / "templates"
SYSTEM = "You are Grace, made by MiaoTech."


@dataclass
class Family:
    template: str
    special: list[str]
    eos: str
    bos: str | None = None
    # the labelled runs of CONV: each answer with its end-of-turn text (and what follows)
    runs: tuple[str, ...] = ()
    system_role: bool = True


def _read(name: str) -> str:
    return (TEMPLATES / name).read_text()


FAMILIES = {
    # thinking on (the template's default): the last answer carries the empty <think> block the
    # template renders for it; the earlier one is history, which Qwen3 renders without it.
    "qwen3": Family(
        _read("qwen3.jinja"),
        ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        eos="<|im_end|>",
        runs=("Paris.<|im_end|>", "<think>\n\n</think>\n\nRome.<|im_end|>"),
    ),
    "llama3": Family(
        _read("llama3.jinja"),
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
        runs=("Paris.<|eot_id|>", "Rome.<|eot_id|>"),
    ),
    # Phi-3 ends a conversation rendered without a generation prompt with EOS: the last turn's.
    "phi3": Family(
        _read("phi3.jinja"),
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        eos="<|endoftext|>",
        bos="<s>",
        runs=("Paris.<|end|>", "Rome.<|end|>\n<|endoftext|>"),
    ),
    "mistral": Family(
        _read("mistral.jinja"),
        ["<s>", "</s>", "[INST]", "[/INST]"],
        eos="</s>",
        bos="<s>",
        runs=(" Paris.</s>", " Rome.</s>"),
        system_role=False,  # v0.3 puts it into the LAST user turn only
    ),
    # EOS (<eos>) is not Gemma's end-of-turn token: taught after it, as for any such template.
    "gemma3": Family(
        GEMMA3_TEMPLATE,
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        eos="<eos>",
        bos="<bos>",
        runs=("Paris.<end_of_turn>", "Rome.<end_of_turn>", "<eos>"),
    ),
    "gemma2": Family(
        _read("gemma2.jinja"),
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        eos="<eos>",
        bos="<bos>",
        runs=("Paris.<end_of_turn>", "Rome.<end_of_turn>", "<eos>"),
        system_role=False,  # raises on a system message
    ),
}

CONV = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def family_tokenizer(bundled_dir):
    made = {}

    def make(name: str):
        if name not in made:
            fam = FAMILIES[name]
            tok = AutoTokenizer.from_pretrained(bundled_dir)
            extra = {"additional_special_tokens": fam.special, "eos_token": fam.eos}
            tok.add_special_tokens({**extra, **({"bos_token": fam.bos} if fam.bos else {})})
            made[name] = tok
        return made[name]

    return make


def _runs(tok, ex) -> list[str]:
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    runs += [cur] if cur else []
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_are_exactly_the_answers_with_their_end_of_turn(name, family_tokenizer):
    """Labelled tokens of a two-turn conversation with a system prompt are the two answers and
    their end-of-turn text (plus EOS where it differs from it), nothing of the user or system
    text. Before: Qwen3 (history rendered differently), Phi-3 (EOS epilogue), Mistral v0.3 and
    Gemma 2 (system role) all raised."""
    fam, tok = FAMILIES[name], family_tokenizer(name)
    ex = encode_conversation(tok, CONV, template=fam.template, system=SYSTEM)
    assert _runs(tok, ex) == list(fam.runs)
    text = tok.decode(ex.input_ids)
    assert text.count(SYSTEM) == 1  # the system text is in the input exactly once


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generation_prompt_is_the_training_prefix(name, family_tokenizer):
    """Train/serve agreement: the prompt chat/serve render for the last answer is a token prefix
    of the training rendering, and the labels start right where that prompt ends."""
    fam, tok = FAMILIES[name], family_tokenizer(name)
    for conv in (CONV[:2], CONV):
        ex = encode_conversation(tok, conv, template=fam.template, system=SYSTEM)
        prompt = prompt_ids(tok, conv[:-1], template=fam.template, system=SYSTEM)
        assert ex.input_ids[: len(prompt)] == prompt
        assert ex.labels[len(prompt)] != IGNORE_INDEX
        assert all(x == IGNORE_INDEX for x in ex.labels[len(prompt) - 1 : len(prompt)])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_system_role_detected_by_probe(name, family_tokenizer):
    fam = FAMILIES[name]
    assert supports_system(family_tokenizer(name), fam.template) is fam.system_role


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_folded_system_is_in_the_first_user_turn(name, family_tokenizer):
    """No system role: the system text leads the FIRST user turn, in training and in the
    serving prompt alike (Mistral v0.3 itself would put it into the last one, or drop it)."""
    fam, tok = FAMILIES[name], family_tokenizer(name)
    text = tok.decode(prompt_ids(tok, CONV[:3], template=fam.template, system=SYSTEM))
    first_user = text.index(CONV[0]["content"])
    assert text.index(SYSTEM + "\n\n" + CONV[0]["content"]) < first_user
    assert text.count(SYSTEM) == 1


def test_qwen3_thinking_off_is_baked_into_the_template(family_tokenizer):
    """--no-thinking: the template carries enable_thinking=false, so the serving prompt ends with
    the empty <think> block and only the answer is labelled; training agrees with it."""
    tok = family_tokenizer("qwen3")
    template = resolve_template(tok, FAMILIES["qwen3"].template, thinking=False)
    ex = encode_conversation(tok, CONV, template=template, system=SYSTEM)
    assert _runs(tok, ex) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    prompt = prompt_ids(tok, CONV[:3], template=template, system=SYSTEM)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ex.input_ids[: len(prompt)] == prompt


def test_thinking_needs_a_template_with_the_switch(tokenizer):
    with pytest.raises(TemplateError, match="no enable_thinking switch"):
        resolve_template(tokenizer, None, thinking=False)


REASONED = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4."},
]


def test_think_blocks_kept_or_stripped(family_tokenizer):
    """--think keep trains the reasoning (Qwen3 puts it in its <think> block); strip trains the
    answer only, with the empty block Qwen3 renders for the last turn."""
    fam, tok = FAMILIES["qwen3"], family_tokenizer("qwen3")
    kept = encode_conversation(tok, REASONED, template=fam.template, system=None)
    assert _runs(tok, kept) == ["<think>\nTwo and two.\n</think>\n\n4.<|im_end|>"]
    stripped = encode_conversation(tok, REASONED, template=fam.template, system=None, think="strip")
    assert _runs(tok, stripped) == ["<think>\n\n</think>\n\n4.<|im_end|>"]


def test_think_strip_with_a_plain_template(tokenizer):
    ex = encode_conversation(tokenizer, REASONED, system=None, think="strip")
    assert _runs(tokenizer, ex) == ["4.<|im_end|>"]
