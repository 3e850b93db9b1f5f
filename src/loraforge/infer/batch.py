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

from loraforge.data.inputs import read_inputs
from loraforge.errors import UserError
from loraforge.fsutil import atomic_write_text


@dataclass
class InferStats:
    total: int
    skipped: int  # already answered in the output file
    answered: int
    stopped_by_length: int


def _key(record: dict) -> str:
    return json.dumps(
        {k: v for k, v in record.items() if k != "response"},
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )


def _answered(output: Path) -> Counter:
    """Keys of the records already in ``output``. Lines a killed run left cut (even mid-way
    through a UTF-8 character) are dropped, and the file is rewritten without them atomically,
    so a second kill during the rewrite cannot lose the answers already there."""
    if not output.is_file():
        return Counter()
    raw = output.read_bytes()
    good, torn = [], 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or "response" not in rec:
                raise ValueError
            good.append(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            torn += 1
    if torn or (raw and not raw.endswith(b"\n")):
        atomic_write_text(output, "".join(g + "\n" for g in good))
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
    strict: bool = False,
) -> InferStats:
    """Answer the records of ``input_path`` not yet in ``output_path``, appending as it goes."""

    from loraforge.console import count_progress
    from loraforge.data.tokenize import with_system

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    output = Path(output_path)
    if output.resolve() == Path(input_path).resolve():
        raise UserError(f"--output {output} is the input file")
    from loraforge.console import say

    records = read_inputs(input_path, strict, echo=say)
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
