"""`loraforge data distill`: the model's own answers to general questions, as training data.

Mixing a few of the base model's own answers into a small fine-tuning set (self-distillation)
keeps the tuned model close to the base on everything the new data does not cover, without
borrowing another model's style. Answers cut off by ``--max-new-tokens`` are dropped by default:
trained on, they would teach the model to end a turn in mid-sentence.

Generation goes through the Engine with the same default system prompt training uses, so the
answers are the ones the model gives in the setting it will be trained in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError
from loraforge.fsutil import atomic_write_text

GENERAL_QUESTIONS = Path(__file__).parent / "builtin" / "general_questions.jsonl"
FORMATS = ("messages", "alpaca")


@dataclass
class DistillStats:
    questions: int
    written: int
    truncated: int  # answers that hit the token limit (dropped unless keep_truncated)
    empty: int  # empty answers (always dropped)


def to_record(prompt: list[dict], answer: str, fmt: str, tag: object = None) -> dict:
    """One training record in ``fmt`` (alpaca keeps earlier turns in ``history``)."""
    if fmt == "messages":
        rec: dict = {"messages": [*prompt, {"role": "assistant", "content": answer}]}
    else:
        system = [m["content"] for m in prompt if m["role"] == "system"]
        turns = [m for m in prompt if m["role"] != "system"]
        history = [
            [turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)
        ]
        rec = {"instruction": turns[-1]["content"], "input": "", "output": answer}
        if system:
            rec["system"] = system[0]
        if history:
            rec["history"] = history
    if tag is not None:
        rec["tag"] = tag
    return rec


def distill(
    engine,
    output: str | Path,
    params,
    *,
    questions: str | Path | None = None,
    adapter: str | None = None,
    fmt: str = "messages",
    keep_truncated: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    strict: bool = False,
) -> DistillStats:
    """Answer ``questions`` (default: the built-in general set) and write a training file."""

    from loraforge.console import count_progress, say
    from loraforge.data.inputs import read_inputs

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose {' or '.join(FORMATS)}")
    out = Path(output)
    if out.suffix != ".jsonl":
        raise UserError(f"--output {out}: write a .jsonl file")
    records = read_inputs(questions or GENERAL_QUESTIONS, strict, echo=say)
    stats = DistillStats(len(records), 0, 0, 0)
    lines = []
    bar = count_progress(progress)
    with bar:
        task = bar.add_task("distilling", total=len(records))
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            results = engine.generate([m for _, m in chunk], params, adapters=adapter)
            for (rec, prompt), res in zip(chunk, results, strict=True):
                cut = res.finish_reason == "length"
                stats.truncated += cut
                if not res.text.strip():
                    stats.empty += 1
                elif keep_truncated or not cut:
                    record = to_record(prompt, res.text.strip(), fmt, rec.get("tag"))
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            bar.advance(task, len(chunk))
    if not lines:
        raise UserError(
            f"no answer kept: {stats.truncated} hit --max-new-tokens, {stats.empty} were empty"
        )
    atomic_write_text(out, "".join(lines))  # a killed run leaves no half-written training file
    stats.written = len(lines)
    return stats
