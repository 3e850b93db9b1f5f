"""`loraforge infer`: answer every record of a file, batched, into a JSONL file; resumable.

Input: any dataset format loraforge trains on (alpaca, messages, sharegpt, query/response; in
.jsonl/.json/.csv/.parquet), records with just a ``query`` (or ``question`` / ``prompt``), or a
``.txt`` file with one question per line. A record that already holds an answer is asked the
conversation up to its last assistant turn. Each output line is the input record with
``response`` added (a ``response`` field of the input is replaced).

Resuming: records whose input fields already appear in the output file are skipped, so a run
that was stopped picks up where it left off. A torn last line (a killed run) is dropped first.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.sources import DataError, read_records
from loraforge.errors import UserError

PLACEHOLDER = "\x00answer\x00"  # stands for the missing answer while normalising a prompt record
QUESTION_KEYS = ("query", "question", "prompt")


@dataclass
class InferStats:
    total: int
    skipped: int  # already answered in the output file
    answered: int
    stopped_by_length: int


def prompt_messages(record: dict) -> list[dict]:
    """The conversation to answer for one input record (raises RecordProblem if unusable)."""
    from loraforge.data.formats import RecordProblem, normalise

    if not isinstance(record, dict):
        raise RecordProblem("record is not an object with named fields")
    rec = dict(record)
    known = ("messages", "conversations", "instruction", "input", "query")
    if not any(k in rec for k in known):
        for key in QUESTION_KEYS[1:]:
            if isinstance(rec.get(key), str):
                rec["query"] = rec[key]
                break
    # The formats all demand an answer; lend one so the same normaliser as training is used.
    if "messages" in rec and isinstance(rec["messages"], list):
        rec["messages"] = [*rec["messages"], {"role": "assistant", "content": PLACEHOLDER}]
    elif "conversations" in rec and isinstance(rec["conversations"], list):
        rec["conversations"] = [*rec["conversations"], {"from": "gpt", "value": PLACEHOLDER}]
    elif "instruction" in rec or "input" in rec:
        rec["output"] = PLACEHOLDER
    elif "query" in rec:
        rec["response"] = PLACEHOLDER
    _, messages, _ = normalise(rec)
    # Ask the conversation up to its last user turn (the given answer, if any, is dropped).
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise RecordProblem("no user turn to answer")
    return messages[: last_user + 1]


def read_inputs(path: str | Path) -> list[tuple[dict, list[dict]]]:
    """(record, prompt messages) for each record of ``path``; a bad record is an error naming
    its line (a batch run should not silently leave questions out)."""
    from loraforge.data.formats import RecordProblem

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [
            ({"query": q.strip()}, [{"role": "user", "content": q.strip()}])
            for q in lines
            if q.strip()
        ]
    if path.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise DataError(f"--input {path}: use .jsonl, .json, .csv, .parquet or .txt")
    out = []
    for raw in read_records(path, str(path)):
        try:
            if raw.problem:
                raise RecordProblem(raw.problem)
            out.append((raw.value, prompt_messages(raw.value)))
        except RecordProblem as e:
            raise DataError(f"{raw.where}: {e}") from None
    if not out:
        raise DataError(f"--input {path}: no records")
    return out


def _key(record: dict) -> str:
    return json.dumps(
        {k: v for k, v in record.items() if k != "response"},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )


def _answered(output: Path) -> Counter:
    """Keys of the records already in ``output``; rewrites the file without a torn line."""
    if not output.is_file():
        return Counter()
    good, torn = [], 0
    for line in output.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "response" not in rec:
                raise ValueError
            good.append(line)
        except ValueError:
            torn += 1
    if torn:
        output.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return Counter(_key(json.loads(g)) for g in good)


def run_infer(
    engine,
    input_path: str | Path,
    output_path: str | Path,
    params,
    *,
    adapter: str | None = None,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> InferStats:
    """Answer the records of ``input_path`` not yet in ``output_path``, appending as it goes."""

    from loraforge.console import count_progress
    from loraforge.data.tokenize import with_system

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    output = Path(output_path)
    if output.resolve() == Path(input_path).resolve():
        raise UserError(f"--output {output} is the input file")
    records = read_inputs(input_path)
    done = _answered(output)
    todo = []
    for rec, messages in records:
        k = _key(rec)
        if done[k] > 0:  # a Counter: duplicate questions are each answered once
            done[k] -= 1
        else:
            todo.append((rec, with_system(messages, system)))
    stats = InferStats(len(records), len(records) - len(todo), 0, 0)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = count_progress(progress)
    with bar, output.open("a", encoding="utf-8") as f:
        task = bar.add_task("answering", total=len(todo))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            results = engine.generate([m for _, m in chunk], params, adapters=adapter)
            for (rec, _), res in zip(chunk, results, strict=True):
                line = json.dumps({**rec, "response": res.text}, ensure_ascii=False, default=str)
                f.write(line + "\n")
                stats.stopped_by_length += res.finish_reason == "length"
            f.flush()  # a killed run loses at most the batch in flight
            stats.answered += len(chunk)
            bar.advance(task, len(chunk))
    return stats
