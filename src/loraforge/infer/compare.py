"""`loraforge compare`: the base model and one or more adapters answering the same questions.

All columns use the same sampling params and the same seed, and are generated in one batched
engine call. The base column renders prompts with the first adapter's template and system prompt,
so the only difference between columns is the adapter weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import UserError

BASE = "base"


def column_names(adapter_dirs: list[str]) -> list[str]:
    """One unique, readable column name per adapter dir (its folder name, numbered on clashes)."""
    names: list[str] = []
    for d in adapter_dirs:
        stem = Path(d).resolve().name or "adapter"
        name, i = stem, 2
        while name in names or name == BASE:
            name, i = f"{stem}-{i}", i + 1
        names.append(name)
    return names


def questions_from(
    queries: list[str], input_path: str | None, strict: bool = False
) -> list[list[dict]]:
    """Prompt conversations from ``-q`` values and/or an input file (any `infer` format)."""
    from loraforge.console import say
    from loraforge.data.inputs import read_inputs

    convs = [[{"role": "user", "content": q}] for q in queries]
    if input_path:
        convs += [m for _, m in read_inputs(input_path, strict, echo=say)]
    if not convs:
        raise UserError("nothing to compare: pass -q QUESTION (repeatable) or --input FILE")
    return convs


def run_compare(
    adapter_dirs: list[str],
    conversations: list[list[dict]],
    params,
    *,
    model: str | None = None,
    dtype: str | None = None,
    engine=None,
) -> tuple[list[str], list[dict]]:
    """(columns, rows): a row per question, ``{"question", "base", <adapter>...}``."""
    from loraforge.infer.engine import Engine

    if not adapter_dirs:
        raise UserError("compare needs at least one --adapter")
    names = column_names(adapter_dirs)
    own = engine is None
    if own:
        engine = Engine.from_adapter(adapter_dirs[0], model=model, name=names[0], dtype=dtype)
    try:
        for name, d in zip(names[1:], adapter_dirs[1:], strict=True):
            engine.load_adapter(name, d)
        # The base column uses the first adapter's template/system: encode the prompts here.
        columns = [BASE, *names]
        prompts, adapters = [], []
        for conv in conversations:
            for col in columns:
                prompts.append(engine.encode(conv, names[0] if col == BASE else col))
                adapters.append(None if col == BASE else col)
        results = engine.generate(prompts, params, adapters=adapters)
    finally:
        if own:
            engine.close()
    rows = []
    for i, conv in enumerate(conversations):
        row = {"question": conv[-1]["content"]}
        for j, col in enumerate(columns):
            row[col] = results[i * len(columns) + j].text
        rows.append(row)
    return columns, rows


def print_table(columns: list[str], rows: list[dict], console=None) -> None:
    from rich.table import Table

    from loraforge.console import console as default_console

    table = Table(show_lines=True)
    for name in ("question", *columns):
        # fold, never ellipsize: rich under-measures CJK text and would cut answers short
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(row["question"], *(row[c] for c in columns))
    (console or default_console).print(table)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>").strip()


def write_output(columns: list[str], rows: list[dict], output: str | Path) -> None:
    """``.jsonl``: one object per question; ``.md``: a Markdown table."""
    out = Path(output)
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif out.suffix == ".md":
        head = ["question", *columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join(_md_cell(r[c]) for c in head) + " |")
        text = "\n".join(lines) + "\n"
    else:
        raise UserError(f"--output {out}: use a .jsonl or .md file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
