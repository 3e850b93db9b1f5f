"""Read question files for the verbs that generate (infer, compare, eval, data distill).

Input: any dataset format loraforge trains on (alpaca, messages, sharegpt, query/response; in
.jsonl/.json/.csv/.parquet), records with just a ``query`` (or ``question`` / ``prompt``), or a
``.txt`` file with one question per line. A record that already holds an answer is asked the
conversation up to its last user turn. The same normaliser as training reads them, so a file
that trains also asks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loraforge.data.formats import RecordProblem, normalise
from loraforge.data.sources import DataError, read_records

PLACEHOLDER = "\x00answer\x00"  # stands for the missing answer while normalising a prompt record
QUESTION_KEYS = ("query", "question", "prompt")


def prompt_messages(record: dict) -> list[dict]:
    """The conversation to answer for one input record (raises RecordProblem if unusable)."""
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


def read_inputs(
    path: str | Path, strict: bool = False, echo: Callable[[str], object] | None = None
) -> list[tuple[dict, list[dict]]]:
    """(record, prompt messages) for each record of ``path``. A bad record is skipped, and
    told to ``echo`` as ``file:line: what`` (the first few, then a count), or with ``strict``
    stops the run; a file without one usable record is always an error."""
    from loraforge.data import DataReport

    report = DataReport()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            where = f"--input {path}: not UTF-8 text (byte {e.start}: {e.reason})"
            raise DataError(where) from None
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
            report.problem(f"{raw.where}: {e}", strict)
    if not out:
        first = f", first: {report.problems[0]}" if report.problems else ""
        raise DataError(f"--input {path}: no usable records{first}")
    report.loaded = len(out)
    if echo is not None:
        for line in report.problem_lines([str(path)]):
            echo(line)
    return out
