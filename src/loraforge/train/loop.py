"""The `sft` recipe: supervised fine-tuning of a LoRA adapter, in one readable loop.

    load tokenizer + data -> model + LoRA -> AdamW + schedule -> [resume] ->
    for each optimizer step: grad_accum micro-batches -> clip -> step -> log / eval / save
    -> final adapter + loraforge.json + config.yaml + metrics.jsonl + TensorBoard + loss.png

Everything device- and precision-specific goes through ``accelerate.Accelerator`` (autocast,
backward, no_sync, clipping), so `accelerate launch` / torchrun (DDP, FSDP, DeepSpeed) and a
4-bit base can come in without rewriting this file. The fast path (default) packs sequences,
holds the frozen base in bf16 under bf16 autocast and computes the loss only on labelled
positions; ``fast=False`` is the plain fp32, padded, full-logits path.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
import yaml

from loraforge.adapters import AdapterMeta, write_meta
from loraforge.config import SFTConfig
from loraforge.console import console
from loraforge.data.tokenize import DEFAULT_SYSTEM, Example, resolve_template
from loraforge.errors import UserError
from loraforge.train import checkpoint as ckpt
from loraforge.train.data import (
    backward_pieces,
    load_train_val,
    micro_batches_per_epoch,
    train_batches,
    val_batches,
)
from loraforge.train.lora import bf16_supported, load_lora_model, trainable_parameters
from loraforge.train.loss import SFTLoss
from loraforge.train.memory import release_memory
from loraforge.train.metrics import MetricsLog, fmt_loss, plot_loss, progress_bar


class OutputError(UserError):
    """An output dir holding an earlier run."""


def run_sft(
    cfg: SFTConfig,
    *,
    train: list[Example] | None = None,
    val: list[Example] | None = None,
) -> Path:
    """Train and write the adapter to ``cfg.output``; returns that dir. ``train``/``val``
    (pre-tokenised examples) replace loading ``cfg.dataset``, for tests and embedding."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_scheduler, set_seed

    from loraforge.models import load_tokenizer

    out = Path(cfg.output)
    resume_from = ckpt.resolve_resume(cfg.resume, out)
    if resume_from is None and ckpt.checkpoint_dirs(out) and not cfg.overwrite:
        raise OutputError(f"--output {out} holds checkpoints: add --resume or --overwrite")
    if resume_from is None and (out / ckpt.CKPT_DIR).is_dir():
        shutil.rmtree(out / ckpt.CKPT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    system = DEFAULT_SYSTEM if cfg.system is None else cfg.system
    resolved = cfg.model_copy(update={"system": system})
    if resume_from is not None and (out / "config.yaml").is_file():
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
        ckpt.check_resume_config(saved, resolved.model_dump(mode="json"), out / "config.yaml")
    (out / "config.yaml").write_text(resolved.to_yaml())

    device_bf16 = bf16_supported(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = cfg.fast and device_bf16
    # AcceleratorState is a per-process singleton that refuses a second mixed-precision setting;
    # clear it so run_sft can be called again in one process (tests, the web UI). The
    # distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no")
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    # ---- data ---------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(tokenizer, cfg.template)
    if train is None:
        train, val, lines = load_train_val(cfg, tokenizer)
    else:
        val = val or []
        lines = [f"{len(train)} train, {len(val)} val examples (given)"]
    pad_id = tokenizer.pad_token_id

    # ---- model ------------------------------------------------------------------------------
    model = load_lora_model(cfg, accelerator.device, bf16_base=use_bf16)
    trainable, total = trainable_parameters(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    world = accelerator.num_processes
    per_epoch = micro_batches_per_epoch(len(train), cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch / (cfg.grad_accum * world))
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    loss_model, optimizer = accelerator.prepare(SFTLoss(model, fast=cfg.fast), optimizer)

    state = ckpt.TrainState()
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer.optimizer, scheduler)

    def write_adapter_extras(d: Path) -> None:
        meta = AdapterMeta(cfg.model, template, system, cfg.max_length)
        write_meta(d, meta)

    if main:
        path = "fast: packed, bf16 autocast, sparse loss" if cfg.fast else "plain: fp32, padded"
        if cfg.fast and not use_bf16:
            path = "fast: packed, sparse loss (no bf16 on this device: fp32)"
        console.print(f"model: {cfg.model}  ({path}, {accelerator.device})")
        for line in lines:
            console.print(f"data: {line}")
        console.print(
            f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        )
        console.print(
            f"steps: {total_steps} (batch {cfg.batch_size} x accum {cfg.grad_accum} x "
            f"{world} proc, {per_epoch / (cfg.grad_accum * world):.1f} steps/epoch)"
        )
        if resume_from is not None:
            console.print(f"resumed from {resume_from} at step {state.step}")

    # ---- train ------------------------------------------------------------------------------
    log = MetricsLog(out, start_step=state.step) if main else None
    batches = train_batches(cfg, train, pad_id, state.micro_step, accelerator.process_index, world)
    vbatches = val_batches(cfg, val, pad_id)
    window_loss, window_tokens, window_time, run_tokens, run_time = [], 0, 0.0, 0, 0.0
    last_val = None

    def evaluate() -> float:
        loss_model.eval()
        losses, counts = [], []
        with torch.no_grad():
            for b in vbatches:
                b = {k: v.to(accelerator.device) for k, v in b.items()}
                n = int((b["labels"][:, 1:] != -100).sum())
                losses.append(float(loss_model(**b)) * n)
                counts.append(n)
        loss_model.train()
        return sum(losses) / max(1, sum(counts))

    with progress_bar(disable=not main) as bar:
        task = bar.add_task(
            "sft", total=total_steps, completed=state.step, loss="-", lr="-", tps="-"
        )
        while state.step < total_steps:
            t0 = time.perf_counter()
            step_loss, step_tokens, pieces = 0.0, 0, []
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                step_tokens += int(batch.pop("num_tokens"))
                pieces += (
                    backward_pieces(batch, pad_id, cfg.max_length) if cfg.fast else [(batch, 1.0)]
                )
            for i, (piece, share) in enumerate(pieces):
                piece = {k: v.to(accelerator.device) for k, v in piece.items()}
                last = i == len(pieces) - 1  # DDP syncs gradients once, after the last backward
                with contextlib.nullcontext() if last else accelerator.no_sync(loss_model):
                    with accelerator.autocast():
                        loss = loss_model(**piece) * (share / cfg.grad_accum)
                    accelerator.backward(loss)
                step_loss += float(loss.detach())
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            release_memory()
            state.step += 1
            state.micro_step += cfg.grad_accum
            state.tokens_seen += step_tokens * world
            dt = time.perf_counter() - t0
            state.train_seconds += dt
            window_loss.append(step_loss)
            window_tokens, window_time = window_tokens + step_tokens * world, window_time + dt
            run_tokens, run_time = run_tokens + step_tokens * world, run_time + dt
            done = state.step >= total_steps

            if main and (state.step % cfg.logging_steps == 0 or done):
                tps = window_tokens / max(window_time, 1e-9)
                mean_loss = sum(window_loss) / len(window_loss)
                log.log(
                    state.step,
                    train_loss=mean_loss,
                    train_lr=lr,
                    train_grad_norm=grad_norm,
                    train_tokens_per_s=tps,
                    train_epoch=state.micro_step * world / per_epoch,
                    train_tokens_seen=state.tokens_seen,
                    train_run_tokens=run_tokens,  # this process's run (resumes start afresh)
                    train_run_seconds=run_time,  # step time only: no loading, eval, saving
                    train_seconds=state.train_seconds,
                )
                bar.update(task, loss=fmt_loss(mean_loss), lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                if not console.is_terminal:
                    console.print(
                        f"step {state.step}/{total_steps} loss {mean_loss:.4f} lr {lr:.2e} "
                        f"{tps:,.0f} tok/s"
                    )
                window_loss, window_tokens, window_time = [], 0, 0.0
            bar.update(task, completed=state.step)

            if vbatches and (state.step % cfg.eval_steps == 0 or done):
                last_val = evaluate()
                if main:
                    ppl = math.exp(min(last_val, 50.0))
                    log.log(state.step, val_loss=last_val, val_ppl=ppl)
                    bar.console.print(f"step {state.step}: val loss {last_val:.4f} ppl {ppl:.2f}")
                if state.best_val_loss is None or last_val < state.best_val_loss:
                    state.best_val_loss, state.best_step = last_val, state.step

            if main and (state.step % cfg.save_steps == 0 or done):
                unwrapped = accelerator.unwrap_model(loss_model).model
                ckpt.save_checkpoint(
                    out, unwrapped, optimizer.optimizer, scheduler, state, write_adapter_extras
                )
                ckpt.rotate_checkpoints(out, cfg.save_total_limit, state.best_step)
            accelerator.wait_for_everyone()

    # ---- final artefacts ---------------------------------------------------------------------
    if main:
        accelerator.unwrap_model(loss_model).model.save_pretrained(out)
        write_adapter_extras(out)
        log.close()
        plot_loss(out)
        if run_time > 0:
            console.print(f"trained {run_tokens:,} tokens at {run_tokens / run_time:,.0f} tok/s")
        if state.best_step is not None:
            best = out / ckpt.CKPT_DIR / f"step-{state.best_step:06d}"
            console.print(
                f"best val loss {state.best_val_loss:.4f} at step {state.best_step}: {best}"
            )
        console.print(f"adapter: {out}  (loraforge chat --adapter {out})")
    accelerator.end_training()
    return out
