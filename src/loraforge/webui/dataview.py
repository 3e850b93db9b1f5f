"""The Studio's Data tab, without the UI: keep uploads under the data dir, the data doctor's
verdict, a token-length summary and a preview with the trained spans marked.

The verdict is `loraforge data doctor`'s own lines (data/doctor.py), so the page, the CLI and a
training run name a bad record the same way (``file:line: what``). The preview tokenises with
the model's tokenizer and template exactly as training does (data/tokenize.py): what is marked
is what the loss covers.
"""

from __future__ import annotations

import html
import shutil
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from loraforge.data.sources import SUFFIXES

PREVIEW_RECORDS = 3
SUMMARY_RECORDS = 2000  # token lengths of at most this many records: a summary, not a pass


@dataclass
class Verdict:
    ok: bool  # usable records and no problem: training may start
    lines: list[str] = field(default_factory=list)  # the doctor's lines

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def save_upload(src: str | Path, data_dir: Path) -> Path:
    """Copy an uploaded file (Gradio's temp path) into ``data_dir`` under its own name."""
    src = Path(src)
    data_dir.mkdir(parents=True, exist_ok=True)
    dst = data_dir / src.name
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return dst


def data_files(data_dir: Path) -> list[str]:
    """Dataset files under ``data_dir`` (recursively), as paths for --dataset."""
    if not data_dir.is_dir():
        return []
    return sorted(str(p) for p in data_dir.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def diagnose(datasets: list[str], name: str = "", author: str = "") -> Verdict:
    """The doctor's verdict on ``datasets``; ok only with usable records and no problem (a
    person fixes the named lines first: training would silently skip them)."""
    from loraforge.data.doctor import doctor
    from loraforge.data.sources import parse_spec

    if not datasets:
        return Verdict(False, ["no dataset chosen: upload a file, pick one or use the selfcog set"])
    lines: list[str] = []
    code = doctor(datasets, echo=lines.append, limit=50)
    selfcog = any(parse_spec(d)[0] == "selfcog" for d in datasets)
    if selfcog and not (name.strip() and author.strip()):
        lines.append("the self-cognition set needs a model name and an author")
        code = 1
    usable = not lines[-1].startswith("0 usable") if lines else False
    return Verdict(code == 0 and usable, lines)


@lru_cache(maxsize=2)
def _tokenizer(model: str):
    from loraforge.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(model))


def lengths_and_preview(
    datasets: list[str],
    model: str,
    *,
    name: str = "",
    author: str = "",
    max_length: int = 1024,
    system: str | None = None,
) -> tuple[str, str]:
    """A Markdown token-length summary and an HTML preview of the first records with their
    trained spans marked (``<mark>``), both as training would see them."""
    from loraforge.data import load_conversations
    from loraforge.data.tokenize import encode_conversation, resolve_system, resolve_template

    tokenizer = _tokenizer(model)
    template = resolve_template(tokenizer, None)
    convs = load_conversations(
        datasets, model_name=name or None, model_author=author or None, seed=0
    )[:SUMMARY_RECORDS]
    examples = [
        encode_conversation(
            tokenizer, c.messages, template=template, system=resolve_system(system), tools=c.tools
        )
        for c in convs
    ]
    lengths = sorted(len(e.input_ids) for e in examples)
    over = sum(n > max_length for n in lengths)
    trained = sum(e.num_labels for e in examples)
    summary = (
        f"**{len(examples)} examples**, tokens per example: min {lengths[0]}, "
        f"median {int(statistics.median(lengths))}, max {lengths[-1]}; "
        f"{over} longer than --max-length {max_length} (cut); "
        f"{trained:,} of {sum(lengths):,} tokens trained ({100 * trained / sum(lengths):.0f}%)"
    )
    shown = [_render(tokenizer, e, c.source) for e, c in zip(examples, convs, strict=True)]
    return summary, "\n".join(shown[:PREVIEW_RECORDS])


def _render(tokenizer, example, source: str) -> str:
    """One example as HTML: runs of untrained (prompt) and trained (answer) tokens."""
    from loraforge.data.tokenize import IGNORE_INDEX

    runs: list[tuple[bool, list[int]]] = []
    for tid, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tid)
        else:
            runs.append((trained, [tid]))
    body = "".join(
        f"<mark class='trained'>{html.escape(tokenizer.decode(ids))}</mark>"
        if trained
        else f"<span class='prompt'>{html.escape(tokenizer.decode(ids))}</span>"
        for trained, ids in runs
    )
    return (
        f"<div class='example'><div class='source'>{html.escape(source)}</div>"
        f"<pre style='white-space: pre-wrap'>{body}</pre></div>"
    )
