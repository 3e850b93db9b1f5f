"""The data pipeline: dataset specs -> conversations -> tokenised examples.

``load_conversations`` reads and normalises records (formats.py), fills the self-cognition
placeholders (selfcog.py), samples ``#N`` and mixes several datasets. ``load_examples`` then
renders them with the chat template and builds the label masks (tokenize.py). Bad records are
skipped and reported one line each ("file:line: what is wrong"), or stop the run with
``strict=True``; a file with no usable record at all is always an error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.data.formats import RecordProblem, normalise
from loraforge.data.selfcog import fill, language, placeholders, split_pair
from loraforge.data.sources import (
    DataError,
    RawRecord,
    files_of,
    parse_spec,
    read_records,
    take,
)
from loraforge.data.tokenize import DEFAULT_SYSTEM, Example, encode_conversation, resolve_template

__all__ = [
    "Conversation",
    "DataError",
    "DataReport",
    "Example",
    "load_conversations",
    "load_examples",
]


@dataclass
class Conversation:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant"|"tool", "content": str}]
    tools: list | str | None = None
    source: str = ""  # "path/file.jsonl:12" or "path/file.parquet#record 7"


@dataclass
class DataReport:
    loaded: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, "file:line: what is wrong"

    def summary(self) -> str:
        return (
            f"{self.loaded} examples ({self.skipped} skipped, {self.truncated} truncated, "
            f"{self.dropped} dropped)"
        )

    def problem(self, line: str, strict: bool) -> None:
        """Record one bad record: skip it, or stop at it under strict."""
        if strict:
            raise DataError(line)
        self.problems.append(line)
        self.skipped += 1

    def problem_lines(self, specs: list[str], limit: int = 5) -> list[str]:
        """The skipped records as the user reads them: the first ``limit`` lines as
        ``file:line: what``, then how many more and the command that lists them all."""
        lines = [f"skipped {p}" for p in self.problems[:limit]]
        more = len(self.problems) - len(lines)
        if more > 0:
            files = " ".join(parse_spec(s)[0] for s in specs)
            lines.append(
                f"... {more} more skipped; to list them: loraforge data doctor --all {files}"
            )
        return lines


def load_conversations(
    datasets: list[str],
    *,
    seed: int = 42,
    model_name: str | None = None,
    model_author: str | None = None,
    strict: bool = False,
    report: DataReport | None = None,
) -> list[Conversation]:
    """Read, normalise, sample (``path#N``) and mix ``datasets``; shuffled with ``seed``."""
    report = report if report is not None else DataReport()
    if not datasets:
        raise DataError("no dataset given: pass --dataset PATH (or --dataset selfcog)")
    identity = {"name": split_pair(model_name), "author": split_pair(model_author)}
    rng = random.Random(seed)
    out: list[Conversation] = []
    for spec in datasets:
        name, count = parse_spec(spec)
        selfcog = name == "selfcog" and not Path(name).exists()
        if selfcog and None in identity.values():
            raise DataError(
                f"dataset '{spec}' is a self-cognition set: pass --model-name and --model-author"
            )
        convs: list[Conversation] = []
        for path, shown in files_of(name):
            convs += _read_file(path, shown, identity, strict, report)
        out += take(convs, count, rng) if count else convs
    rng.shuffle(out)
    report.loaded = len(out)
    return out


def _read_file(
    path: Path, shown: str, identity: dict, strict: bool, report: DataReport
) -> list[Conversation]:
    convs, first, bad = [], None, 0
    for raw in read_records(path, shown):
        try:
            convs.append(to_conversation(raw, identity))
        except RecordProblem as e:
            line = f"{raw.where}: {e}"
            report.problem(line, strict)
            first, bad = first or line, bad + 1
    if not convs:
        if bad:
            raise DataError(f"no usable records in {shown}: {bad} problems, first: {first}")
        raise DataError(f"{shown}: no records")
    return convs


def to_conversation(raw: RawRecord, identity: dict | None = None) -> Conversation:
    """Normalise one raw record and fill its placeholders; raise RecordProblem if it is bad."""
    if raw.problem:
        raise RecordProblem(raw.problem)
    _, messages, tools = normalise(raw.value)
    if identity is not None:
        messages = _fill_identity(messages, raw, identity)
    return Conversation(messages=messages, tools=tools, source=raw.where)


def _fill_identity(messages: list[dict], raw: RawRecord, identity: dict) -> list[dict]:
    kinds = set().union(*(placeholders(m["content"]) for m in messages))
    if not kinds:
        return messages
    missing = [k for k in ("name", "author") if k in kinds and identity.get(k) is None]
    if missing:
        flags = " and ".join(f"--model-{k}" for k in missing)
        marks = ", ".join("{{" + k.upper() + "}}" for k in missing)
        # A configuration mistake, not a bad record: skipping would silently lose the identity.
        raise DataError(f"{raw.where}: has {marks} placeholders: pass {flags}")
    lang = language([m["content"] for m in messages], raw.value.get("tag"))
    values = {k: identity[k][lang] for k in kinds}
    return [{**m, "content": fill(m["content"], values)} for m in messages]


def load_examples(
    datasets: list[str],
    tokenizer,
    *,
    template: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    seed: int = 42,
    model_name: str | None = None,
    model_author: str | None = None,
    strict: bool = False,
    think: str = "keep",
) -> tuple[list[Example], DataReport]:
    """Conversations rendered with the chat template; labels on the assistant turns only
    (``think="strip"``: without their <think> blocks).

    Examples left with no labelled token after ``max_length`` truncation are dropped.
    """
    import jinja2

    report = DataReport()
    convs = load_conversations(
        datasets,
        seed=seed,
        model_name=model_name,
        model_author=model_author,
        strict=strict,
        report=report,
    )
    template = resolve_template(tokenizer, template)
    examples = []
    for conv in convs:
        try:
            ex = encode_conversation(
                tokenizer,
                conv.messages,
                template=template,
                system=system,
                max_length=max_length,
                tools=conv.tools,
                think=think,
            )
        except jinja2.TemplateError as e:  # e.g. a template that insists on alternating roles
            report.problem(f"{conv.source}: the chat template refused it ({e})", strict)
            continue
        ex.source = conv.source
        if ex.num_labels == 0:
            report.dropped += 1
            continue
        report.truncated += ex.truncated
        examples.append(ex)
    report.loaded = len(examples)
    if not examples:
        raise DataError(
            f"no examples left: {len(convs)} conversations, {report.dropped} dropped with no "
            f"assistant token within --max-length {max_length}, {report.skipped} skipped"
        )
    return examples, report
