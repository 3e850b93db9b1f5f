"""`loraforge export gguf`: a model for llama.cpp and Ollama, checked against loraforge's engine.

The steps, each done by the code that owns it:
1. merge the adapter (export/merge.py, which checks its own logits) into a temp dir, or take an
   already merged dir (``--model``);
2. stage that dir for llama.cpp's converter: the same files, with tokenizer_config.json naming
   the chat template training used (the training system prompt baked in, as merge does) and
   the template's end-of-turn token as EOS, so llama.cpp and Ollama stop where training did;
3. convert with llama.cpp's own ``convert_hf_to_gguf.py`` to f16, and quantize with llama.cpp's
   own quantizer (``llama_model_quantize``) for q8_0 / q4_k_m;
4. self-check (export/gguf_check.py): load the result through llama.cpp in a subprocess and
   compare with loraforge's engine;
5. optionally write an Ollama Modelfile beside it (export/ollama.py).
``--lora-only`` instead writes the adapter as a GGUF LoRA (``convert_lora_to_gguf.py``) for
``llama-server -m BASE.gguf --lora FILE``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import UserError
from loraforge.export import llamacpp

QUANTS = ("f16", "q8_0", "q4_k_m")


class GGUFExportError(UserError):
    """Bad arguments to `export gguf`, or an output that failed its check."""


@dataclass
class GGUFResult:
    output: Path
    quant: str
    size_bytes: int
    check: object | None = None  # gguf_check.CheckReport
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Source:
    """What is exported: a merged HF dir, with the template/system prompts are rendered with."""

    model_dir: Path
    template: str  # the template as training rendered (system NOT baked in)
    system: str | None
    adapter: Path | None = None


def export_gguf(
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    model: str | Path | None = None,
    quant: str = "f16",
    lora_only: bool = False,
    ollama: bool = False,
    check: bool = True,
    force: bool = False,
    max_ppl_increase: float | None = None,
    echo=print,
) -> GGUFResult:
    """Write ``output`` (a .gguf file) from ``adapter`` (merged first) or an already merged
    ``model`` dir; check it through llama.cpp unless ``check`` is False."""
    output = Path(output)
    _check_args(output, adapter, model, quant, lora_only, ollama, force)
    if lora_only:
        return _export_lora(Path(adapter), output, echo)
    if check or quant != "f16":
        llamacpp.require_runtime()
    llamacpp.converter("convert_hf_to_gguf.py")  # fail before the (slow) merge when not set up
    with tempfile.TemporaryDirectory(prefix="loraforge-gguf-", dir=output.parent) as tmp:
        tmp = Path(tmp)
        source = _source(adapter, model, tmp, echo)
        turns = _ollama_turns(source) if ollama else None  # refuse before converting
        staged = _stage(source, tmp / "staged")
        f16 = tmp / "model-f16.gguf"
        echo("converting with llama.cpp's convert_hf_to_gguf.py ...")
        llamacpp.convert(
            "convert_hf_to_gguf.py",
            [str(staged), "--outtype", "f16", "--outfile", str(f16), "--model-name", output.stem],
            "convert_hf_to_gguf.py",
        )
        final = f16
        if quant != "f16":
            echo(f"quantizing to {quant} with llama.cpp's quantizer ...")
            final = tmp / f"model-{quant}.gguf"
            llamacpp.in_llama_cpp(
                {"op": "quantize", "src": str(f16), "dst": str(final), "quant": quant},
                f"quantizing to {quant}",
            )
        report = None
        if check:
            from loraforge.export.gguf_check import check_gguf

            echo("checking the GGUF through llama.cpp against loraforge's engine ...")
            report = check_gguf(final, source, quant, max_ppl_increase=max_ppl_increase)
        os.replace(final, output)
    result = GGUFResult(output, quant, output.stat().st_size, report)
    if turns is not None:
        from loraforge.export.ollama import write_modelfile

        stops = gguf_stop_tokens(output)
        result.modelfile = write_modelfile(output, turns, source.system, stops)
    return result


def _ollama_turns(source: Source):
    from loraforge.export.ollama import read_turn_format
    from loraforge.models import load_tokenizer

    return read_turn_format(load_tokenizer(source.model_dir), source.template)


def _check_args(output: Path, adapter, model, quant, lora_only, ollama, force) -> None:
    if (adapter is None) == (model is None):
        raise GGUFExportError("give exactly one of --adapter DIR or --model MERGED_DIR")
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if output.suffix != ".gguf":
        raise GGUFExportError(f"--output {output}: name the file *.gguf")
    if output.exists() and not force:
        raise GGUFExportError(f"{output} exists (pass --force to replace it)")
    if lora_only and (adapter is None or quant != "f16" or ollama):
        raise GGUFExportError("--lora-only takes --adapter, and neither --quant nor --ollama")
    output.parent.mkdir(parents=True, exist_ok=True)


def _source(adapter, model, tmp: Path, echo) -> Source:
    """The merged dir and how prompts were rendered in training."""
    from loraforge.adapters import prompt_format, resolve_adapter
    from loraforge.export.merge import merge_adapter
    from loraforge.models import load_tokenizer, resolve_model

    if adapter is not None:
        meta = resolve_adapter(adapter)
        template, system = prompt_format(meta, load_tokenizer(resolve_model(meta.base_model)))
        echo(f"merging {adapter} into its base (export/merge.py, checked) ...")
        r = merge_adapter(adapter, tmp / "merged", dtype="float32")
        return Source(r.output_dir, template, system, Path(adapter))
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(f"--model {model_dir}: not a merged model dir (no config.json)")
    # A dir written by `loraforge merge` has the training system prompt baked into its
    # template already: render with no extra system, exactly like transformers users of it.
    template = load_tokenizer(model_dir).chat_template
    if not template:
        raise GGUFExportError(f"--model {model_dir}: its tokenizer has no chat template")
    return Source(model_dir, template, _merged_system(model_dir))


def _merged_system(model_dir: Path) -> str | None:
    record = model_dir / "loraforge_merge.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8")).get("system")
    return None


def _stage(source: Source, staged: Path) -> Path:
    """A view of the merged dir for the converter: links to its files, and a
    tokenizer_config.json naming the baked chat template and the end-of-turn token as EOS."""
    from loraforge.data.tokenize import stop_token_ids
    from loraforge.export.merge import bake_system
    from loraforge.models import load_tokenizer

    staged.mkdir(parents=True)
    for f in source.model_dir.iterdir():
        if f.is_file() and f.name != "tokenizer_config.json":
            os.symlink(f.resolve(), staged / f.name)
    cfg_path = source.model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    tokenizer = load_tokenizer(source.model_dir)
    baked = source.template
    if source.adapter is not None:  # a merged dir given as --model has it baked already
        baked = bake_system(source.template, source.system)
    end_of_turn = _end_of_turn_token(tokenizer, stop_token_ids(tokenizer, source.template))
    cfg["chat_template"] = baked
    cfg["eos_token"] = end_of_turn
    (staged / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (staged / "chat_template.jinja").unlink(missing_ok=True)  # one template: the one above
    _set_config_eos(staged, tokenizer.convert_tokens_to_ids(end_of_turn))
    return staged


def _end_of_turn_token(tokenizer, stop_ids: list[int]) -> str:
    """The stop token that is not the tokenizer's generic EOS, if any (Llama 3's <|eot_id|>)."""
    others = [t for t in stop_ids if t != tokenizer.eos_token_id]
    return tokenizer.convert_ids_to_tokens((others or stop_ids)[0])


def _set_config_eos(staged: Path, eos_id: int) -> None:
    for name in ("config.json", "generation_config.json"):
        path = staged / name
        if not path.exists():
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["eos_token_id"] = eos_id
        cfg.pop("quantization_config", None)  # a gguf-converted base may still name one
        path.unlink()  # a link to the merged dir's file: write a copy, never through it
        path.write_text(json.dumps(cfg, indent=2))


def gguf_stop_tokens(gguf_path: Path) -> list[str]:
    """The end-of-generation token texts a GGUF declares (EOS and EOT): Ollama's stop list."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    stops = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in reader.fields:
            tid = int(reader.fields[key].contents())
            text = bytes(tokens.parts[tokens.data[tid]]).decode("utf-8")
            if text not in stops:
                stops.append(text)
    return stops


def _export_lora(adapter: Path, output: Path, echo) -> GGUFResult:
    """The adapter as a GGUF LoRA for ``llama-server -m BASE.gguf --lora FILE``."""
    from loraforge.adapters import resolve_adapter
    from loraforge.export.merge import bake_system
    from loraforge.models import resolve_model

    meta = resolve_adapter(adapter)
    base = resolve_model(meta.base_model)
    echo("converting with llama.cpp's convert_lora_to_gguf.py ...")
    with tempfile.TemporaryDirectory(prefix="loraforge-gguf-", dir=output.parent) as tmp:
        out = Path(tmp) / output.name
        llamacpp.convert(
            "convert_lora_to_gguf.py",
            [str(adapter), "--base", str(base), "--outtype", "f16", "--outfile", str(out)],
            "convert_lora_to_gguf.py",
        )
        shutil.move(out, output)
    # A GGUF LoRA carries no chat template: the one training used (system prompt baked in)
    # goes beside it, for llama-server's --chat-template-file.
    template = output.with_suffix(".jinja")
    template.write_text(bake_system(meta.chat_template, meta.system), encoding="utf-8")
    note = (
        f"llama-server -m BASE.gguf --lora {output} --jinja --chat-template-file {template} "
        f"(BASE.gguf: `loraforge export gguf --model {base} --output BASE.gguf`)"
    )
    return GGUFResult(output, "f16", output.stat().st_size, notes=[note])
