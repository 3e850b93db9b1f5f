"""The adapter dir contract between training and everything that uses its result.

An adapter dir is a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
plus ``loraforge.json``: the base model spec and the exact chat template and default system
prompt used at training time, so chat/serve render prompts exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from loraforge.errors import UserError

META_FILE = "loraforge.json"


class AdapterError(UserError):
    """An adapter dir that is missing, incomplete or for another base model."""


@dataclass
class AdapterMeta:
    base_model: str  # the spec given at training time: bundled name, HF dir or .gguf path
    chat_template: str  # the Jinja template used to render training examples
    system: str | None  # default system prompt put in front of conversations that have none
    max_length: int | None = None
    loraforge_version: str = ""


def write_meta(adapter_dir: str | Path, meta: AdapterMeta) -> None:
    from loraforge import __version__

    meta.loraforge_version = meta.loraforge_version or __version__
    (Path(adapter_dir) / META_FILE).write_text(
        json.dumps(asdict(meta), indent=2, ensure_ascii=False)
    )


def read_meta(adapter_dir: str | Path) -> AdapterMeta:
    """Read an adapter dir's metadata; a plain PEFT dir (no loraforge.json) is an error."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise AdapterError(f"{d}: not an adapter dir (no adapter_config.json)")
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise AdapterError(f"{d}: no {META_FILE}; was it trained by loraforge?")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        meta = AdapterMeta(**{k: raw.get(k) for k in AdapterMeta.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise AdapterError(f"{meta_path}: unreadable ({e})") from e
    _check_meta(meta, meta_path)
    return meta


def _check_meta(meta: AdapterMeta, where: Path) -> None:
    """Fields of an adapter dir are data, and only data: a chat template that is not Jinja
    text would otherwise be read as a file path, and a base model that is a .gguf file would
    be converted (and cached under its name) just because someone loaded the adapter."""
    if not isinstance(meta.base_model, str) or not meta.base_model:
        raise AdapterError(f"{where}: base_model must be a model name or dir")
    if Path(meta.base_model).suffix == ".gguf" and not _converted(meta.base_model):
        raise AdapterError(
            f"{where}: base_model {meta.base_model} is a .gguf file not converted yet; "
            f"convert it once by using it as --model (loraforge chat --model FILE -q hi)"
        )
    t = meta.chat_template
    if not isinstance(t, str) or not ("{%" in t or "{{" in t):
        raise AdapterError(f"{where}: chat_template must be the Jinja text used in training")
    if meta.system is not None and not isinstance(meta.system, str):
        raise AdapterError(f"{where}: system must be text or null")
    if meta.max_length is not None and not isinstance(meta.max_length, int):
        raise AdapterError(f"{where}: max_length must be a whole number or null")


def _converted(gguf: str) -> bool:
    from loraforge.models import ModelError, resolve_model

    try:
        resolve_model(gguf, convert=False)
        return True
    except ModelError:
        return False


def same_base(a: str, b: str) -> bool:
    """Whether two model specs name the same base (bundled name, or the same resolved dir)."""
    if a == b:
        return True
    from loraforge.models import ModelError, resolve_model

    try:  # never converts a .gguf: comparing names must not write to the model cache
        return (
            resolve_model(a, convert=False).resolve() == resolve_model(b, convert=False).resolve()
        )
    except ModelError:
        return False


def resolve_adapter(adapter_dir: str | Path, model: str | None = None) -> AdapterMeta:
    """The adapter dir's metadata, after checking that ``model`` (when given: --model, or the
    model an engine runs) is the base it was trained on. Every verb that takes --adapter and
    --model asks here, so the refusal reads the same everywhere."""
    meta = read_meta(adapter_dir)
    if model is not None and not same_base(str(model), meta.base_model):
        raise AdapterError(f"{adapter_dir} was trained on '{meta.base_model}', not on '{model}'")
    return meta


def prompt_format(meta: AdapterMeta | None, tokenizer) -> tuple[str, str | None]:
    """(chat template, default system prompt) to render prompts with: what the adapter recorded
    at training time, or for the bare base model its own template and loraforge's default."""
    from loraforge.data.tokenize import DEFAULT_SYSTEM, resolve_template

    if meta is None:
        return resolve_template(tokenizer), DEFAULT_SYSTEM
    return meta.chat_template or resolve_template(tokenizer), meta.system
