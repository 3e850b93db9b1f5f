"""Self-cognition: fill ``{{NAME}}`` / ``{{AUTHOR}}`` placeholders with the model's identity.

``--model-name`` and ``--model-author`` take one value or a ``zh,en`` pair
(``'喵星人Grace,Grace'``). Which one a record gets comes from its ``tag`` field (``zh``/``en``),
else from the script of its text. A comma followed by a space is part of the value
(``'Acme, Inc.'`` is one name), so only a bare comma separates the pair.
"""

from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}", re.IGNORECASE)
_PAIR = re.compile(r"[,，](?! )")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_LATIN = re.compile(r"[A-Za-z]")


def split_pair(value: str | None) -> dict[str, str] | None:
    """``'喵星人Grace,Grace'`` -> {"zh": "喵星人Grace", "en": "Grace"}; one value serves both."""
    if value is None or not value.strip():
        return None
    parts = [p.strip() for p in _PAIR.split(value)]
    if len(parts) == 2 and all(parts):
        return {"zh": parts[0], "en": parts[1]}
    value = value.strip()
    return {"zh": value, "en": value}


def language(texts: list[str], tag: object = None) -> str:
    """'zh' or 'en': the record's tag when it is one of those, else the script of its text.

    A Chinese character carries about a word, an English word about five letters, so the text
    counts as Chinese when its CJK characters are at least a quarter of its Latin letters.
    """
    if isinstance(tag, str) and tag.strip().lower() in ("zh", "en"):
        return tag.strip().lower()
    text = "".join(texts)
    cjk = len(_CJK.findall(text))
    return "zh" if cjk and cjk * 4 >= len(_LATIN.findall(text)) else "en"


def placeholders(text: str) -> set[str]:
    """The placeholder kinds ('name', 'author') that ``text`` contains."""
    return {m.lower() for m in PLACEHOLDER.findall(text)}


def fill(text: str, values: dict[str, str]) -> str:
    """Replace each placeholder whose kind has a value in ``values`` (keys 'name', 'author')."""

    def sub(m: re.Match) -> str:
        return values.get(m.group(1).lower(), m.group(0))

    return PLACEHOLDER.sub(sub, text)
