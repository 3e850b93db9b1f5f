"""The Studio's training settings: presets, the form fields generated from ``SFTConfig``, the
config built from the form, and the equivalent ``loraforge sft ...`` command line.

The advanced fields are generated from SFTConfig's fields (their label is the CLI flag, their
help the field's description), as cli/options.py generates the flags: a new field appears in
the page, the CLI and the YAML at once. No UI imports here.
"""

from __future__ import annotations

import shlex
import types
from typing import Any, Literal, Union, get_args, get_origin

from loraforge.cli.options import flag
from loraforge.config import SFTConfig, load_config

# The hyperparameters a preset sets (and the main form shows); each preset sets all of them.
# "new identity" is the measured default (README: ≈ 90 steps teach the bundled model a name);
# style and domain knowledge change more of the model's answers, so they get a larger rank
# (more capacity) and a lower learning rate over more passes (less forgetting of the rest).
PRESETS: dict[str, dict[str, Any]] = {
    "new identity": {
        "lora_rank": 8,
        "lora_alpha": 32,
        "learning_rate": 2e-4,
        "epochs": 4,
        "batch_size": 4,
    },
    "style": {
        "lora_rank": 16,
        "lora_alpha": 32,
        "learning_rate": 1e-4,
        "epochs": 3,
        "batch_size": 4,
    },
    "domain knowledge": {
        "lora_rank": 32,
        "lora_alpha": 64,
        "learning_rate": 1e-4,
        "epochs": 5,
        "batch_size": 4,
    },
}
MAIN_FIELDS = ("lora_rank", "lora_alpha", "learning_rate", "epochs", "batch_size", "max_steps")
# set elsewhere in the page (model picker, data tab) or by the studio itself (one dir per job)
OWN_FIELDS = ("model", "dataset", "model_name", "model_author", "output", "resume", "overwrite")
ADVANCED_FIELDS = tuple(
    n for n in SFTConfig.model_fields if n not in MAIN_FIELDS and n not in OWN_FIELDS
)


def field_kind(name: str) -> tuple[str, list[str]]:
    """How the page edits a field: ("bool" | "choice" | "int" | "float" | "text", choices).
    An optional field's choices start with "" (= its default, None)."""
    ann = SFTConfig.model_fields[name].annotation
    optional = False
    if get_origin(ann) in (Union, types.UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        optional = len(members) < len(get_args(ann))
        ann = members[0] if len(members) == 1 else ann
    if get_origin(ann) is Literal:
        return "choice", ([""] if optional else []) + [str(a) for a in get_args(ann)]
    if ann is bool:
        return ("choice", ["", "true", "false"]) if optional else ("bool", [])
    if ann is int:
        return "int", []
    if ann is float:
        return "float", []
    return "text", []


def form_value(name: str) -> Any:
    """A field's default as its form control shows it."""
    default = SFTConfig.model_fields[name].get_default(call_default_factory=True)
    kind, _ = field_kind(name)
    if default is None:
        return None if kind in ("int", "float") else ""
    if isinstance(default, list):
        return ", ".join(map(str, default))
    if kind == "choice" and isinstance(default, bool):
        return str(default).lower()
    return default if kind != "text" else str(default)


def _from_form(name: str, raw: Any) -> Any:
    """A form control's value as the config field takes it; "" / None: the field's default."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    kind, _ = field_kind(name)
    if kind == "int":
        return int(raw)
    if kind == "choice" and raw in ("true", "false"):
        return raw == "true"
    return raw.strip() if isinstance(raw, str) else raw


def build_config(values: dict[str, Any]) -> SFTConfig:
    """The SFTConfig the form describes (unset fields take their defaults); a bad value is a
    one-line ConfigError naming the flag."""
    given = {k: _from_form(k, v) for k, v in values.items() if k in SFTConfig.model_fields}
    return load_config(None, **given)


def sft_command(cfg: SFTConfig, *, with_output: bool = True) -> str:
    """``loraforge sft ...`` with a flag for every field that differs from its default: typed in
    a terminal, it trains the same run."""
    parts = ["loraforge", "sft"]
    for name, field in SFTConfig.model_fields.items():
        if name in ("resume", "overwrite") or (name == "output" and not with_output):
            continue
        value = getattr(cfg, name)
        if value == field.get_default(call_default_factory=True):
            continue
        if isinstance(value, bool):
            parts.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, list) and name == "target_modules":
            parts += [flag(name), ",".join(value)]
        elif isinstance(value, list):
            for v in value:
                parts += [flag(name), str(v)]
        elif value is not None:
            parts += [flag(name), str(value)]
    return shlex.join(parts)
