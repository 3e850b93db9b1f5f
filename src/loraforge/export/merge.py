"""`loraforge merge`: fold a LoRA adapter into a standalone Hugging Face model dir.

The output is what plain ``transformers.AutoModelForCausalLM.from_pretrained`` expects and
nothing else: safetensors weights, the tokenizer, the chat template the adapter was trained with
and a generation config whose EOS is the end-of-turn token. No peft, no loraforge at load time.

The training-time default system prompt is baked into the saved chat template: when a
conversation has no system message, the template inserts the one used at training time (instead
of, for SmolLM2, "You are a helpful AI assistant named SmolLM ..."), so users of the merged dir
render exactly the prompts the adapter was trained on.

The command checks its own output on a few conversations, against the base model plus the
unmerged adapter in fp32: the merge itself in fp32 (before any rounding, so a dropped or garbled
adapter cannot hide), then the saved dir reloaded from disk, whose max |logit diff| is printed
and must stay within a tolerance that fits the dtype (see the notes on FP32_TOLERANCE below).

An adapter trained on a quantized base (``sft --quantization nf4``, QLoRA) merges the same way:
the base is always loaded here in full precision from its safetensors, never through
bitsandbytes, so the update is folded into fp32 weights (folding it into 4-bit weights would
round most of it away) and the output is a plain model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.adapters import prompt_format, resolve_adapter
from loraforge.errors import UserError
from loraforge.fsutil import atomic_dir

DTYPES = ("float32", "bfloat16", "float16")

# Max |logit difference| accepted between the merged model and fp32 base + adapter. In fp32
# they differ only by summation order (smollm2-135m: ~3e-4). A half type rounds every weight,
# which over 30 layers moves logits a lot (smollm2-135m: ~1.6 in bf16, ~0.16 in fp16), so for
# it the tolerance is that rounding, measured on the merged weights cast in memory, plus
# HALF_SLACK for the save/reload round trip (which should change nothing). The merge itself is
# checked in fp32 before casting, where a dropped or garbled adapter cannot hide in rounding.
FP32_TOLERANCE = 5e-3
HALF_SLACK = 5e-2

VERIFY_CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "你是谁？"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Write one sentence about it."},
    ],
]


class MergeError(UserError):
    """The merge could not be written or its output does not match base + adapter."""


@dataclass
class MergeResult:
    output_dir: Path
    dtype: str
    max_abs_diff: float  # saved model vs fp32 base + adapter: the figure users care about
    tolerance: float
    eos_token_ids: list[int]
    fp32_merge_diff: float = 0.0  # merged in memory (fp32) vs base + adapter
    round_trip_diff: float = 0.0  # reloaded vs the merged weights before saving


def bake_system(template: str, system: str | None) -> str:
    """Return ``template`` made to insert ``system`` when a conversation has no system message.

    A Jinja preamble rebinds ``messages``, so it works for any template (no string surgery on
    the template's own default system text). ``system=None`` keeps the template unchanged: the
    adapter was then trained with the template's own default.
    """
    if system is None:
        return template
    # A JSON string is a valid Jinja string literal (same escapes), whatever the text holds.
    literal = json.dumps(system, ensure_ascii=True)
    preamble = (
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}"
        "{%- endif -%}\n"
    )
    return preamble + template


def _logits(model, conversations_ids: list[list[int]]):
    import torch

    out = []
    with torch.no_grad():
        for ids in conversations_ids:
            x = torch.tensor([ids], device=model.device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "float32",
    model: str | None = None,
    force: bool = False,
    tolerance: float | None = None,
) -> MergeResult:
    """Merge ``adapter_dir`` into its base model, save to ``output_dir`` and verify the result:
    check the arguments, merge in fp32 and check that, cast, write to a temp dir, reload and
    check what was written, then move it into place."""
    from loraforge.data.tokenize import encode_conversation
    from loraforge.models import load_tokenizer, resolve_model

    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    meta = resolve_adapter(adapter_dir, model)
    if output_dir.resolve() == adapter_dir.resolve():
        raise MergeError(f"--output {output_dir} is the adapter dir itself")
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise MergeError(f"{output_dir} exists and is not empty (pass --force to replace it)")

    base_dir = resolve_model(meta.base_model)
    tokenizer = load_tokenizer(base_dir)
    template, _ = prompt_format(meta, tokenizer)
    ids = [
        encode_conversation(tokenizer, conv, template=template, system=meta.system).input_ids
        for conv in VERIFY_CONVERSATIONS
    ]
    merged, reference, merge_diff = _merge_fp32(base_dir, adapter_dir, ids, tolerance)
    expected, tol = _cast(merged, dtype, ids, reference, tolerance)
    eos = _set_eos(merged, tokenizer, template)
    merged.config._name_or_path = output_dir.name
    with atomic_dir(output_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.chat_template = bake_system(template, meta.system)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
        del merged
        diff, round_trip = _verify_saved(tmp, dtype, ids, reference, expected, tol, output_dir)
        record = {
            "adapter": str(adapter_dir.resolve()),
            "base_model": meta.base_model,
            "dtype": dtype,
            "system": meta.system,
            "max_abs_logit_diff": diff,
            "tolerance": tol,
            "fp32_merge_diff": merge_diff,
            "round_trip_diff": round_trip,
        }
        (tmp / "loraforge_merge.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return MergeResult(output_dir, dtype, diff, tol, eos, merge_diff, round_trip)


def _merge_fp32(base_dir: Path, adapter_dir: Path, ids: list, tolerance: float | None):
    """(merged model, base + adapter logits, their max |diff|), merged in fp32: merging in half
    precision would round twice. Fails before anything is written if the merge is off."""
    from peft import PeftModel

    from loraforge.models import load_model

    peft_model = PeftModel.from_pretrained(load_model(base_dir, dtype="float32"), adapter_dir)
    peft_model.eval()
    reference = _logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    fp32_tol = FP32_TOLERANCE if tolerance is None else tolerance
    merge_diff = _max_diff(reference, _logits(merged, ids))
    if not merge_diff <= fp32_tol:  # also catches NaN
        raise MergeError(
            f"merged model differs from base + adapter already in fp32: max |logit diff| "
            f"{merge_diff:.4g} > {fp32_tol:g}; nothing written"
        )
    return merged, reference, merge_diff


def _cast(merged, dtype: str, ids: list, reference: list, tolerance: float | None):
    """Cast the merged weights to ``dtype``; return (the logits the saved model must
    reproduce, the tolerance against ``reference``)."""
    import torch

    if dtype == "float32":
        return _logits(merged, ids), FP32_TOLERANCE if tolerance is None else tolerance
    # Parameters only: `model.to(dtype)` would also round buffers such as the rotary inv_freq,
    # which from_pretrained keeps in fp32 (that alone moves bf16 logits by ~0.5).
    for param in merged.parameters():
        param.data = param.data.to(getattr(torch, dtype))
    merged.config.dtype = getattr(torch, dtype)
    expected = _logits(merged, ids)
    rounding = _max_diff(reference, expected)
    return expected, rounding + HALF_SLACK if tolerance is None else tolerance


def _set_eos(merged, tokenizer, template: str) -> list[int]:
    """The generation config's EOS becomes the template's end-of-turn token(s)."""
    from loraforge.data.tokenize import stop_token_ids

    eos = stop_token_ids(tokenizer, template)
    gen = merged.generation_config
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    merged.config.eos_token_id = gen.eos_token_id
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    return eos


def _drop_quantization_config(cfg_path: Path) -> None:
    """A gguf-converted base may still name a quantization; the merged weights are plain."""
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _verify_saved(tmp: Path, dtype: str, ids, reference, expected, tol: float, output_dir: Path):
    """Reload what was written, the way a user will, and compare: (max |diff| vs base +
    adapter, max |diff| vs the merged weights before saving)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    saved = _logits(reloaded.eval(), ids)
    del reloaded
    diff = _max_diff(reference, saved)
    round_trip = _max_diff(expected, saved)
    slack = HALF_SLACK if dtype != "float32" else tol
    if not (diff <= tol and round_trip <= slack):
        raise MergeError(
            f"merged model ({dtype}) differs from base + adapter: max |logit diff| "
            f"{diff:.4g} (tolerance {tol:.4g}); save/reload changed logits by "
            f"{round_trip:.4g} (tolerance {slack:g}); nothing written to {output_dir}"
        )
    return diff, round_trip
