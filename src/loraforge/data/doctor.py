"""`loraforge data doctor`: check dataset files before a training run needs them.

For each file: how many records of each format, one line per problem ("file:line: what is
wrong", the same lines training would report), and a summary. No model or tokenizer is loaded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loraforge.data.formats import RecordProblem, normalise
from loraforge.data.preference import is_preference, normalise_pair
from loraforge.data.selfcog import placeholders
from loraforge.data.sources import DataError, files_of, parse_spec, read_records


@dataclass
class FileCheck:
    name: str
    formats: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    bad_records: int = 0
    with_placeholders: int = 0

    @property
    def records(self) -> int:
        return sum(self.formats.values()) + self.bad_records


def check_file(path, shown: str) -> FileCheck:
    result = FileCheck(shown)
    try:
        for raw in read_records(path, shown):
            try:
                if raw.problem:
                    raise RecordProblem(raw.problem)
                if is_preference(raw.value):  # chosen/rejected: `dpo` data (data/preference.py)
                    shape, pair = normalise_pair(raw.value)
                    fmt, messages = f"preference {shape}", pair.chosen + pair.rejected[-1:]
                else:
                    fmt, messages, _ = normalise(raw.value)
            except RecordProblem as e:
                result.problems.append(f"{raw.where}: {e}")
                result.bad_records += 1
                continue
            result.formats[fmt] += 1
            if any(placeholders(m["content"]) for m in messages):
                result.with_placeholders += 1
    except DataError as e:  # the whole file is unreadable (malformed .json, not UTF-8, ...)
        result.problems.append(str(e))
    return result


def check(paths: list[str]) -> list[FileCheck]:
    """Check every file behind ``paths`` (files, directories, built-in names; ``#N`` ignored)."""
    results = []
    for spec in paths:
        try:
            files = files_of(parse_spec(spec)[0])
        except DataError as e:
            results.append(FileCheck(spec, problems=[str(e)]))
            continue
        results += [check_file(path, shown) for path, shown in files]
    return results


def doctor(paths: list[str], echo=print, limit: int | None = 20) -> int:
    """Print the findings for ``paths``; return the exit code (1 when any problem was found).

    At most ``limit`` problem lines per file (None: all): a file of the wrong kind would
    otherwise bury every other finding under a thousand identical lines.
    """
    results = check(paths)
    for r in results:
        counts = ", ".join(f"{fmt} {n}" for fmt, n in r.formats.most_common())
        echo(f"{r.name}: {r.records} records ({counts or 'no usable records'})")
        if any(fmt.startswith("preference") for fmt in r.formats):
            echo("  chosen/rejected pairs: train them with loraforge dpo")
        if r.with_placeholders:
            echo(
                f"  {r.with_placeholders} records have {{{{NAME}}}}/{{{{AUTHOR}}}} placeholders: "
                "train with --model-name and --model-author"
            )
        shown = r.problems if limit is None else r.problems[:limit]
        for line in shown:
            echo(f"  {line}")
        if len(shown) < len(r.problems):
            echo(
                f"  ... {len(r.problems) - len(shown)} more problems in {r.name} (--all lists them)"
            )
    good = sum(sum(r.formats.values()) for r in results)
    bad = sum(len(r.problems) for r in results)
    files = "file" if len(results) == 1 else "files"
    echo(f"{good} usable records in {len(results)} {files}, {bad} problems")
    return 1 if bad else 0
