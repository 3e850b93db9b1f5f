"""Read dataset specs into raw records, each tagged with where it came from.

A spec is a file (``.json`` list, ``.jsonl``, ``.csv``, ``.parquet``), a directory of them, or a
built-in set (``selfcog``, ``general``), optionally followed by ``#N`` to take N random records.
Every record carries its location ("file.jsonl:12", "file.parquet#record 7") so that each
problem can be reported as one line a user can jump to.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from loraforge.errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BUILTIN_DIR = Path(__file__).parent / "builtin"
# selfcog: the self-cognition set ({{NAME}}/{{AUTHOR}}); general: the bundled model's own answers
# to general questions (`loraforge data distill`), mixed in to keep its everyday behaviour.
BUILTIN = {"selfcog": BUILTIN_DIR / "selfcog.jsonl", "general": BUILTIN_DIR / "general.jsonl"}

T = TypeVar("T")


class DataError(UserError, ValueError):
    """Unusable data: one line naming the file, the line or record, and what is wrong."""


@dataclass
class RawRecord:
    value: object  # the parsed record; None when the line itself could not be parsed
    where: str  # "file.jsonl:12" or "file.parquet#record 7"
    problem: str | None = None  # set when the line is malformed


def parse_spec(spec: str) -> tuple[str, int | None]:
    """Split ``path#N`` into (path, N); a path that really contains '#' is left alone."""
    base, sep, count = spec.rpartition("#")
    if not sep or Path(spec).exists():
        return spec, None
    if not count.isdigit() or int(count) < 1:
        raise DataError(f"dataset '{spec}': the part after '#' must be a positive record count")
    return base, int(count)


def files_of(name: str) -> list[tuple[Path, str]]:
    """(path, display name) of each file behind a spec name (a file, a directory, a built-in)."""
    path = Path(name).expanduser()
    if not path.exists() and name in BUILTIN:
        return [(BUILTIN[name], name)]
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            raise DataError(f"{name}: directory holds no {', '.join(SUFFIXES)} files")
        return [(p, str(Path(name) / p.relative_to(path))) for p in found]
    if not path.exists():
        builtin = ", ".join(BUILTIN)
        raise DataError(f"dataset not found: {name} (not a file, a directory or one of: {builtin})")
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"{name}: unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})"
        )
    return [(path, name)]


def read_records(path: Path, shown: str) -> Iterator[RawRecord]:
    """Yield the records of one file. A file that cannot be read at all raises DataError."""
    try:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, shown)
        elif path.suffix == ".json":
            yield from _read_json(path, shown)
        elif path.suffix == ".csv":
            yield from _read_csv(path, shown)
        else:
            yield from _read_parquet(path, shown)
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"{shown}: cannot read ({e.strerror or e})") from None


def _read_jsonl(path: Path, shown: str) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{shown}:{lineno}"
            try:
                yield RawRecord(json.loads(line), where)
            except json.JSONDecodeError as e:
                yield RawRecord(None, where, f"malformed JSON ({e.msg} at column {e.colno})")
            except RecursionError:  # json's C decoder recurses once per nesting level
                yield RawRecord(None, where, "JSON nested too deeply to be a record")


def _read_json(path: Path, shown: str) -> Iterator[RawRecord]:
    """A JSON list, read element by element so that each record knows its line number.

    A .json file is one document: after a syntax error nothing further can be trusted, so that
    is an error for the whole file (unlike a bad line in a .jsonl file).
    """
    text = path.read_text(encoding="utf-8-sig")
    try:
        try:
            records = list(_scan_list(text))
        except (json.JSONDecodeError, ValueError):
            records = _whole_json(text, shown)
    except RecursionError:
        raise DataError(f"{shown}: JSON nested too deeply to be a list of records") from None
    # Line numbers help only when each record starts on a line of its own (not `json.dump`).
    lines = [line for line, _ in records]
    by_line = None not in lines and len(set(lines)) == len(lines)
    for i, (line, rec) in enumerate(records, 1):
        yield RawRecord(rec, f"{shown}:{line}" if by_line else f"{shown}#record {i}")


def _whole_json(text: str, shown: str) -> list[tuple[int | None, object]]:
    """Parse the file in one go: for its error message, or a document the scanner refused."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{shown}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(doc, list):  # valid after all: fall back to record numbers
        return [(None, rec) for rec in doc]
    if isinstance(doc, dict):  # a single record
        return [(1, doc)]
    raise DataError(f"{shown}: expected a JSON list of records, found a {type(doc).__name__}")


def _scan_list(text: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    pos, line, last = _skip_ws(text, 0), 1, 0
    if text[pos : pos + 1] != "[":
        raise ValueError("not a list")
    pos = _skip_ws(text, pos + 1)
    if text[pos : pos + 1] == "]":
        return
    while True:
        line += text.count("\n", last, pos)
        last = pos
        value, pos = decoder.raw_decode(text, pos)
        yield line, value
        pos = _skip_ws(text, pos)
        sep = text[pos : pos + 1]
        if sep == "]" and not text[pos + 1 :].strip():
            return
        if sep != ",":
            raise ValueError("expected ',' or ']'")
        pos = _skip_ws(text, pos + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# csv's default cell limit (131,072 characters) is below a long answer or document; a cell may
# be as long as the file.
csv.field_size_limit(2**31 - 1)


def _read_csv(path: Path, shown: str) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames:  # reading them now makes line_num count the header
                return
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num  # a quoted cell may span several lines
                # Empty cells are absent fields; extra cells (key None) have no column name.
                rec = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
                yield RawRecord(rec, f"{shown}:{start}")
        except csv.Error as e:  # e.g. a NUL byte: nothing after it can be trusted
            raise DataError(f"{shown}:{reader.line_num}: malformed CSV ({e})") from None


def _read_parquet(path: Path, shown: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{shown}: not a readable parquet file ({e})") from None
    for i, row in enumerate(rows, 1):
        rec = {k: v for k, v in row.items() if v is not None}
        yield RawRecord(rec, f"{shown}#record {i}")


def take(items: list[T], n: int, rng: random.Random) -> list[T]:
    """N random items; above the size the data repeats whole and the rest is drawn at random."""
    if not items:
        return []
    full, rest = divmod(n, len(items))
    return items * full + rng.sample(items, rest)
