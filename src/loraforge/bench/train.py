"""`loraforge bench train`: loraforge's trainer against the textbook HF Trainer + PEFT baseline.

Both run on the same model, the same tokenised examples, the same LoRA and optimiser settings
and so the same number of real tokens, each in its own subprocess so that its peak RSS is its
own. Reported per side: real (non-pad) tokens/s over the training steps, peak RSS, and the final
loss, measured the same way for both: the fp32 loss of the trained adapter over the whole
training set (assistant tokens). The baseline is what people write first: padding to the
longest in the batch, fp32, the model's own loss over the full (B, T, vocab) logits.

With ``quantization`` (``--quantization nf4``) a third side, ``qlora``, runs loraforge's trainer
with the same settings on the quantized base, and ``qlora_ratios`` set it against the plain
LoRA side measured in the same run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraforge.bench.report import append_row, machine_description
from loraforge.errors import UserError

# The built-in general set: 136 alpaca records, 40 to 400 tokens each (seeded #64 sample).
BENCH_DATA = "general"
SIDES = ("loraforge", "baseline")
QLORA = "qlora"  # loraforge on a bitsandbytes-quantized base: runs when settings.quantization
TABLE_HEADER = [
    "| date | machine | setting | loraforge | HF Trainer + PEFT (baseline) | ratios |",
    "|---|---|---|---|---|---|",
]


class BenchError(UserError):
    """One side of the benchmark failed; the message carries its last error line."""


@dataclass
class TrainBenchSettings:
    model: str = "smollm2-135m"
    dataset: str = BENCH_DATA
    records: int = 64
    batch_size: int = 4
    max_length: int = 512
    lora_rank: int = 8
    lora_alpha: float = 16
    learning_rate: float = 2e-4
    epochs: int = 1
    seed: int = 42
    fast: bool = True  # the loraforge side's fast path (--no-fast measures the plain path)
    gradient_checkpointing: bool = False  # the loraforge side only
    quantization: str | None = None  # nf4 | fp4 | int8: add the qlora side


def _examples(s: TrainBenchSettings, tokenizer):
    from loraforge.data import load_examples

    spec = s.dataset if "#" in s.dataset else f"{s.dataset}#{s.records}"
    examples, _ = load_examples([spec], tokenizer, max_length=s.max_length, seed=s.seed)
    return examples


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _final_loss(model, examples) -> float:
    """Mean fp32 cross-entropy on assistant tokens of ``examples`` (token-weighted), one example
    at a time."""
    import torch

    from loraforge.train.loss import TokenMean, token_ce

    scored = TokenMean()
    model.eval()
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits
            scored.add(*token_ce(logits, torch.tensor([ex.labels])))
    return scored.mean


def _figures(tokens: int, seconds: float, rss: float, model, examples) -> dict:
    """One side's figures; the final loss is measured the same way for both sides."""
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": rss,
        "final_loss": _final_loss(model, examples),
    }


def run_loraforge(s: TrainBenchSettings, workdir: Path, quantization: str | None = None) -> dict:
    from peft import PeftModel

    from loraforge.config import SFTConfig
    from loraforge.models import load_model, load_tokenizer
    from loraforge.train.recipe import run_sft

    tokenizer = load_tokenizer(s.model)
    examples = _examples(s, tokenizer)
    cfg = SFTConfig(
        model=s.model,
        dataset=[s.dataset],
        output=workdir / (QLORA if quantization else "loraforge"),
        quantization=quantization,
        max_length=s.max_length,
        batch_size=s.batch_size,
        lora_rank=s.lora_rank,
        lora_alpha=s.lora_alpha,
        lora_dropout=0.0,
        learning_rate=s.learning_rate,
        epochs=s.epochs,
        seed=s.seed,
        warmup_ratio=0.0,
        fast=s.fast,
        gradient_checkpointing=s.gradient_checkpointing,
        val_split=0.0,
        eval_steps=10**6,
        save_steps=10**6,
        logging_steps=1,
        overwrite=True,
    )
    out = run_sft(cfg, train=examples, val=[])
    rss = _peak_rss_mb()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if "train_tokens_seen" in r]
    tokens, seconds = rows[-1]["train_run_tokens"], rows[-1]["train_run_seconds"]
    model = PeftModel.from_pretrained(load_model(s.model), cfg.output)  # fp32 base, both sides
    return _figures(tokens, seconds, rss, model, examples)


def run_baseline(s: TrainBenchSettings, workdir: Path) -> dict:
    """HF Trainer + PEFT as the tutorials write it: padded batches, fp32, full logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from loraforge.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(s.model)
    examples = _examples(s, tokenizer)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    model = get_peft_model(
        load_model(s.model),
        LoraConfig(
            r=s.lora_rank,
            lora_alpha=s.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),  # fmt: skip
    )
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"),
        per_device_train_batch_size=s.batch_size,
        num_train_epochs=s.epochs,
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    rss = _peak_rss_mb()
    tokens = sum(len(e.input_ids) for e in examples) * s.epochs
    return _figures(tokens, seconds, rss, model, examples)


def _worker(side: str, settings_json: str, workdir: str) -> None:
    s = TrainBenchSettings(**json.loads(settings_json))
    if side == QLORA:
        result = run_loraforge(s, Path(workdir), s.quantization)
    else:
        result = (run_loraforge if side == "loraforge" else run_baseline)(s, Path(workdir))
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def run_side(side: str, s: TrainBenchSettings, workdir: Path) -> dict:
    """Run one side in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "loraforge.bench.train", side, json.dumps(asdict(s)), str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    raise BenchError(
        f"bench train: the {side} run failed (exit code {proc.returncode}): "
        + _last_error_line(proc)
    )


def _last_error_line(proc: subprocess.CompletedProcess) -> str:
    """The subprocess's last non-empty line (a traceback ends with the exception), stderr
    first."""
    for text in (proc.stderr, proc.stdout):
        lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
        if lines:
            return lines[-1]
    return "no output"


def bench_train(
    s: TrainBenchSettings, sides: tuple[str, ...] | None = None, progress=print
) -> dict:
    """Run the sides one after the other and return their figures and ratios (default sides:
    loraforge, then qlora when ``s.quantization``, then baseline)."""
    if sides is None:
        sides = ("loraforge", QLORA, "baseline") if s.quantization else SIDES
    results: dict = {"settings": asdict(s), "machine": machine_description()}
    with tempfile.TemporaryDirectory(prefix="lf-bench-train-") as tmp:
        for side in sides:
            progress(f"training: {side} ...")
            results[side] = run_side(side, s, Path(tmp))
    if set(SIDES) <= set(results):
        results["ratios"] = _ratios(results["loraforge"], results["baseline"])
    if {"loraforge", QLORA} <= set(results):
        results["qlora_ratios"] = _ratios(results[QLORA], results["loraforge"])
    return results


def _ratios(side: dict, reference: dict) -> dict:
    return {
        "tokens_per_s": side["tokens_per_s"] / reference["tokens_per_s"],
        "peak_rss": side["peak_rss_mb"] / reference["peak_rss_mb"],
        "final_loss_rel_diff": abs(side["final_loss"] - reference["final_loss"])
        / max(reference["final_loss"], 1e-9),
    }


def markdown_row(r: dict) -> str:
    ours, base, ratio = r["loraforge"], r["baseline"], r["ratios"]
    s = r["settings"]
    return (
        f"| {r['machine']} | {s['model']}, {s['records']} rec, batch {s['batch_size']}, "
        f"len {s['max_length']}, r={s['lora_rank']}{_variant(s)} | "
        f"{ours['tokens_per_s']:.0f} tok/s, "
        f"{ours['peak_rss_mb']:.0f} MB, loss {ours['final_loss']:.4f} | "
        f"{base['tokens_per_s']:.0f} tok/s, {base['peak_rss_mb']:.0f} MB, "
        f"loss {base['final_loss']:.4f} | {ratio['tokens_per_s']:.2f}x speed, "
        f"{ratio['peak_rss']:.2f}x RSS, loss diff {100 * ratio['final_loss_rel_diff']:.2f}%"
        f"{_qlora_note(r)} |"
    )


def _qlora_note(r: dict) -> str:
    """The qlora side and its ratios to plain LoRA (same run), for the Markdown row."""
    if "qlora_ratios" not in r:
        return ""
    q, ratio = r[QLORA], r["qlora_ratios"]
    return (
        f"; {r['settings']['quantization']} QLoRA: {q['tokens_per_s']:.0f} tok/s, "
        f"{q['peak_rss_mb']:.0f} MB, loss {q['final_loss']:.4f} = "
        f"{ratio['tokens_per_s']:.2f}x speed, {ratio['peak_rss']:.2f}x RSS of LoRA"
    )


def _variant(s: dict) -> str:
    """The loraforge side's non-default settings, for the Markdown row."""
    parts = ([] if s.get("fast", True) else ["--no-fast"]) + (
        ["--gradient-checkpointing"] if s.get("gradient_checkpointing") else []
    )
    return "".join(f", {p}" for p in parts)


def print_result(r: dict) -> None:
    from rich.table import Table

    from loraforge.console import console

    sides = [x for x in ("loraforge", QLORA, "baseline") if x in r]
    names = [f"qlora ({r['settings']['quantization']})" if x == QLORA else x for x in sides]
    # ratio columns: loraforge / baseline, and qlora / loraforge (the same run)
    ratio_cols = [(h, r[k]) for h, k in (("ratio", "ratios"), ("qlora/lora", "qlora_ratios"))
                  if k in r]  # fmt: skip
    table = Table("figure", *names, *(h for h, _ in ratio_cols), title=r["machine"])
    rows = [
        ("real tokens/s", "tokens_per_s", "{:.0f}", "tokens_per_s", "{:.2f}x"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}", "peak_rss", "{:.2f}x"),
        ("final loss", "final_loss", "{:.4f}", "final_loss_rel_diff", "{:.2%} diff"),
        ("tokens trained", "tokens", "{:,}", None, ""),
    ]
    for label, key, fmt, ratio_key, rfmt in rows:
        cells = [fmt.format(r[side][key]) for side in sides]
        cells += [rfmt.format(ratios[ratio_key]) if ratio_key else "" for _, ratios in ratio_cols]
        table.add_row(label, *cells)
    console.print(table)


def record(r: dict, json_path: Path | None, md_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(r, indent=2))
    if md_path is not None and "ratios" in r:
        append_row(md_path, "train", TABLE_HEADER, markdown_row(r))


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
