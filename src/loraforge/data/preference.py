"""Preference pairs for `dpo`: a prompt with a chosen and a rejected answer, read from the shapes
the common recipes ship, and tokenised the way `sft` tokenises a conversation.

Shapes recognised per record (a file may mix them):

- sharegpt (LLaMA-Factory's dpo_en/dpo_zh demos): ``conversations`` ending with the user's turn,
  ``chosen``/``rejected`` one ``{from, value}`` turn each (or text); optional system, tools.
- alpaca (LLaMA-Factory): ``instruction``/``input`` with ``chosen``/``rejected`` text.
- prompt (TRL, explicit prompt): ``prompt`` as text or a messages list, ``chosen``/``rejected``
  as text, one message or a messages list.
- messages (TRL, implicit prompt): ``chosen``/``rejected`` are whole conversations (messages
  lists) that share every turn but the last.

Each side becomes the supervised record it would be (prompt + that answer) and goes through
formats.normalise, so roles, content parts, system and tools read exactly as in `sft`. The two
sides must differ in their last (assistant) turn only. Rendering is data/tokenize.py's, with the
model's own template; the labels are then cut to the final answer (and its end-of-turn/EOS):
the prompt's earlier assistant turns are context, not the answer being compared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loraforge.data import DataReport
from loraforge.data.formats import RecordProblem, _turns, normalise
from loraforge.data.sources import DataError, files_of, parse_spec, read_records, take
from loraforge.data.tokenize import (
    DEFAULT_SYSTEM,
    IGNORE_INDEX,
    Example,
    encode_conversation,
    resolve_template,
)

SIDES = ("chosen", "rejected")


def is_preference(record: object) -> bool:
    """A record with a ``chosen`` or ``rejected`` field: a preference pair, not an SFT record."""
    return isinstance(record, dict) and any(k in record for k in SIDES)


@dataclass
class PreferencePair:
    """Two conversations that share every turn but the last (the answers compared)."""

    chosen: list[dict]
    rejected: list[dict]
    tools: list | None = None
    source: str = ""


@dataclass
class PreferenceExample:
    """A tokenised pair: labels only on each side's final answer; the prompts' ids are equal."""

    chosen: Example
    rejected: Example
    source: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def normalise_pair(record: object) -> tuple[str, PreferencePair]:
    """(shape name, pair) of one record, or raise RecordProblem."""
    if not isinstance(record, dict):
        raise RecordProblem("record is not an object with chosen/rejected fields")
    missing = [k for k in SIDES if record.get(k) in (None, "", [])]
    if missing:
        raise RecordProblem(f"preference pair without '{missing[0]}'")
    shape, sides = _side_records(record)
    normalised = []
    for name, side in zip(SIDES, sides, strict=True):
        try:
            normalised.append(normalise(side))
        except RecordProblem as e:
            raise RecordProblem(f"{name}: {e}") from None
    (_, chosen, tools), (_, rejected, _) = normalised
    if chosen[:-1] != rejected[:-1]:
        raise RecordProblem("chosen and rejected differ before their last turn")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordProblem("the last turn of chosen and rejected must be the assistant's")
    if chosen[-1] == rejected[-1]:
        raise RecordProblem("chosen and rejected answers are the same")
    return shape, PreferencePair(chosen, rejected, tools)


def _side_records(record: dict) -> tuple[str, list[dict]]:
    """The supervised record each side would be, in a format formats.normalise reads."""
    keep = {k: record[k] for k in ("system", "tools") if k in record}
    if "conversations" in record:
        turns = _turns(record["conversations"], "conversations")
        return "sharegpt", [
            {**keep, "conversations": turns + _sharegpt_answer(record[k], k)} for k in SIDES
        ]
    if "instruction" in record:
        base = {k: record[k] for k in ("instruction", "input", "system", "history") if k in record}
        return "alpaca", [{**base, "output": record[k]} for k in SIDES]
    prompt = record.get("prompt", record.get("messages"))
    if prompt is not None:
        head = _messages(prompt, "prompt", default_role="user")
        if isinstance(record.get("system"), str) and record["system"].strip():
            head = [{"role": "system", "content": record["system"]}, *head]
        sides = [{"messages": head + _messages(record[k], k, "assistant")} for k in SIDES]
        return "prompt", sides
    sides = [{"messages": _messages(record[k], k, default_role=None)} for k in SIDES]
    return "messages", sides


def _sharegpt_answer(value: object, key: str) -> list:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    return [{"from": "gpt", "value": value}]


def _messages(value: object, key: str, default_role: str | None) -> list:
    """A field as a messages list: text (with ``default_role``), one message, or a list (also as
    JSON text, as CSV files carry it)."""
    if isinstance(value, str) and default_role:
        try:
            return _turns(value, key)
        except RecordProblem:  # not a JSON list: the text itself
            return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        return [value]
    return _turns(value, key)


def load_pairs(
    datasets: list[str], *, seed: int = 42, strict: bool = False, report: DataReport | None = None
) -> list[PreferencePair]:
    """Read and normalise the pairs of ``datasets`` (``path#N`` samples N); shuffled with seed."""
    report = report if report is not None else DataReport()
    if not datasets:
        raise DataError("no dataset given: pass --dataset PATH with chosen/rejected pairs")
    rng = random.Random(seed)
    out: list[PreferencePair] = []
    for spec in datasets:
        name, count = parse_spec(spec)
        pairs: list[PreferencePair] = []
        for path, shown in files_of(name):
            pairs += _read_file(path, shown, strict, report)
        out += take(pairs, count, rng) if count else pairs
    rng.shuffle(out)
    report.loaded = len(out)
    return out


def _read_file(path, shown: str, strict: bool, report: DataReport) -> list[PreferencePair]:
    pairs, first, bad = [], None, 0
    for raw in read_records(path, shown):
        try:
            if raw.problem:
                raise RecordProblem(raw.problem)
            _, pair = normalise_pair(raw.value)
        except RecordProblem as e:
            line = f"{raw.where}: {e}"
            report.problem(line, strict)
            first, bad = first or line, bad + 1
            continue
        pair.source = raw.where
        pairs.append(pair)
    if not pairs:
        detail = f": {bad} problems, first: {first}" if bad else ""
        raise DataError(f"no preference pairs (chosen/rejected) in {shown}{detail}")
    return pairs


def final_answer_only(example: Example, max_length: int | None = None) -> Example:
    """``example`` with labels on its last labelled run only (the final answer, its end-of-turn
    token and EOS), then cut to ``max_length`` tokens."""
    labels = list(example.labels)
    end = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels[: max(start, 0)] = [IGNORE_INDEX] * max(start, 0)
    ids, truncated = example.input_ids, False
    if max_length is not None and len(ids) > max_length:
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return Example(input_ids=list(ids), labels=labels, truncated=truncated)


def encode_pair(
    tokenizer,
    pair: PreferencePair,
    *,
    template: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    think: str = "keep",
) -> PreferenceExample:
    """Both sides rendered with the chat template (tokenize.encode_conversation); the answers cut
    at ``max_length`` as `sft` cuts an example."""
    sides = [
        final_answer_only(
            encode_conversation(
                tokenizer, msgs, template=template, system=system, tools=pair.tools, think=think
            ),
            max_length,
        )
        for msgs in (pair.chosen, pair.rejected)
    ]
    return PreferenceExample(sides[0], sides[1], pair.source)


def load_preference_examples(
    datasets: list[str],
    tokenizer,
    *,
    template: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    seed: int = 42,
    strict: bool = False,
    think: str = "keep",
) -> tuple[list[PreferenceExample], DataReport]:
    """Tokenised pairs of ``datasets``. A pair whose prompt leaves no answer token within
    ``max_length`` on either side is dropped; bad records are skipped (or stop, ``strict``)."""
    import jinja2

    report = DataReport()
    pairs = load_pairs(datasets, seed=seed, strict=strict, report=report)
    template = resolve_template(tokenizer, template)
    examples = []
    for pair in pairs:
        try:
            ex = encode_pair(
                tokenizer,
                pair,
                template=template,
                system=system,
                max_length=max_length,
                think=think,
            )
        except jinja2.TemplateError as e:
            report.problem(f"{pair.source}: the chat template refused it ({e})", strict)
            continue
        if ex.chosen.num_labels == 0 or ex.rejected.num_labels == 0:
            report.dropped += 1
            continue
        report.truncated += ex.chosen.truncated or ex.rejected.truncated
        examples.append(ex)
    report.loaded = len(examples)
    if not examples:
        raise DataError(
            f"no pairs left: {len(pairs)} pairs, {report.dropped} dropped with no answer token "
            f"within --max-length {max_length}, {report.skipped} skipped"
        )
    return examples, report
