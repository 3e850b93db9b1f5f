"""The `sft` recipe: supervised fine-tuning of a LoRA adapter, in one readable loop.

    load tokenizer + data -> model + LoRA -> AdamW + schedule -> [resume] ->
    for each optimizer step: grad_accum micro-batches -> clip -> step -> log / eval / save
    -> final adapter + loraforge.json + config.yaml + metrics.jsonl + TensorBoard + loss.png

Everything device- and precision-specific goes through ``accelerate.Accelerator`` (autocast,
backward, no_sync, clipping), so `accelerate launch` / torchrun (DDP, FSDP, DeepSpeed) and a
4-bit base can come in without rewriting this file. The fast path (default) packs sequences,
holds the frozen base in bf16 under bf16 autocast and computes the loss only on labelled
positions; ``fast=False`` is the plain fp32, padded, full-logits path.

``SFTRecipe`` holds the run, one method per stage (as torchtune's recipes); ``run`` is the whole
run in order. ``run_sft(cfg)`` is the entry point the CLI, the benchmark and the tests call.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from loraforge.adapters import AdapterMeta, write_meta
from loraforge.config import SFTConfig
from loraforge.console import console
from loraforge.cpu import guard
from loraforge.cpu.memory import release_memory
from loraforge.data.tokenize import Example, resolve_system, resolve_template
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
from loraforge.train.loss import SFTLoss, TokenMean, labelled_tokens
from loraforge.train.metrics import MetricsLog, fmt_loss, plot_loss, progress_bar


class OutputError(UserError):
    """An output dir holding an earlier run."""


@dataclass
class StepFigures:
    """What one optimizer step did."""

    loss: float  # this process: the mean of its micro-batches' token-mean losses
    tokens: int  # real (non-pad) tokens, all processes
    seconds: float
    lr: float  # the learning rate this step used
    grad_norm: float | None  # before clipping; None when clipping is off


@dataclass
class Throughput:
    """Step counters: the logging window (mean loss, tokens/s since the last logged line) and
    this process's run (a resume starts afresh). Step time only: no loading, eval, saving."""

    window_losses: list[float] = field(default_factory=list)
    window_tokens: int = 0
    window_seconds: float = 0.0
    run_tokens: int = 0
    run_seconds: float = 0.0

    def add(self, step: StepFigures) -> None:
        self.window_losses.append(step.loss)
        self.window_tokens += step.tokens
        self.window_seconds += step.seconds
        self.run_tokens += step.tokens
        self.run_seconds += step.seconds

    @property
    def window_loss(self) -> float:
        return sum(self.window_losses) / len(self.window_losses)

    @property
    def window_tokens_per_s(self) -> float:
        return self.window_tokens / max(self.window_seconds, 1e-9)

    def reset_window(self) -> None:
        self.window_losses, self.window_tokens, self.window_seconds = [], 0, 0.0


def lr_schedule(cfg: SFTConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warmup from 0 over ``ceil(warmup_ratio * total_steps)`` steps, then cosine or
    linear decay to 0 at ``total_steps``, or constant."""
    from transformers import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


# No version range: whether the private method is there is the whole question (the probe).
STATE_RESET = guard.Patch(
    "accelerate state reset (AcceleratorState._reset_state)",
    "the state as it is: another sft in this process must keep the same precision",
    {},
)


def _reset_accelerator_state() -> None:
    """Clear ``AcceleratorState``, a per-process singleton that refuses a second mixed-precision
    setting: without this, a second `run_sft` in one process (tests, the web UI) with another
    precision (fast, then --no-fast) fails in ``Accelerator()`` ("AcceleratorState has already
    been initialized"). The distributed part (PartialState) is kept. ``_reset_state`` is private
    accelerate API: if it goes, one warning says so and only such second runs fail."""
    from accelerate.state import AcceleratorState

    if guard.check(STATE_RESET, lambda: AcceleratorState._reset_state):
        AcceleratorState._reset_state()


class SFTRecipe:
    """One `sft` run: call ``run()``, or the stages in its order (tests drive single stages)."""

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.system = resolve_system(cfg.system)
        self.state = ckpt.TrainState()
        self.throughput = Throughput()
        self.resume_from: Path | None = None
        self.metrics: MetricsLog | None = None

    # ---- setup --------------------------------------------------------------------------------
    def setup_output(self) -> None:
        """Check the output dir against --resume / --overwrite; write the resolved config.yaml."""
        cfg, out = self.cfg, self.out
        self.resume_from = ckpt.resolve_resume(cfg.resume, out)
        if self.resume_from is None and ckpt.checkpoint_dirs(out) and not cfg.overwrite:
            raise OutputError(f"--output {out} holds checkpoints: add --resume or --overwrite")
        if self.resume_from is None and (out / ckpt.CKPT_DIR).is_dir():
            shutil.rmtree(out / ckpt.CKPT_DIR)
        out.mkdir(parents=True, exist_ok=True)
        resolved = cfg.model_copy(update={"system": self.system})
        if self.resume_from is not None and (out / "config.yaml").is_file():
            saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
            ckpt.check_resume_config(saved, resolved.model_dump(mode="json"), out / "config.yaml")
        (out / "config.yaml").write_text(resolved.to_yaml())

    def setup_accelerator(self) -> None:
        """The Accelerator (bf16 autocast on the fast path where the device has bf16), then the
        seed: everything after this draws from the seeded RNGs in a fixed order."""
        from accelerate import Accelerator
        from transformers import set_seed

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.use_bf16 = self.cfg.fast and bf16_supported(device)
        _reset_accelerator_state()
        self.accelerator = Accelerator(mixed_precision="bf16" if self.use_bf16 else "no")
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        set_seed(self.cfg.seed)

    def setup_data(self, train: list[Example] | None = None, val: list[Example] | None = None):
        """Tokenizer, chat template and examples (``cfg.dataset``, unless given), val batches."""
        from loraforge.models import load_tokenizer

        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        self.template = resolve_template(tokenizer, cfg.template)
        if train is None:
            train, val, self.data_lines = load_train_val(cfg, tokenizer)
        else:
            val = val or []
            self.data_lines = [f"{len(train)} train, {len(val)} val examples (given)"]
        self.train_set = train
        self.pad_id = tokenizer.pad_token_id
        self.per_epoch = micro_batches_per_epoch(len(train), cfg.batch_size)
        self.val_batches = val_batches(cfg, val, self.pad_id)

    def setup_model(self) -> None:
        """The base model with LoRA on it, in train mode (see train/lora.py)."""
        self.model = load_lora_model(self.cfg, self.accelerator.device, bf16_base=self.use_bf16)
        self.trainable, self.total_params = trainable_parameters(self.model)

    def setup_optim(self) -> None:
        """AdamW over the LoRA weights, the LR schedule, and the loss module prepared for the
        accelerator."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
        )
        micro_batches = cfg.epochs * self.per_epoch  # first: epochs * (x / y) can round past n
        self.total_steps = cfg.max_steps or math.ceil(micro_batches / (cfg.grad_accum * self.world))
        self.scheduler = lr_schedule(cfg, optimizer, self.total_steps)
        self.loss_model, self.optimizer = self.accelerator.prepare(
            SFTLoss(self.model, fast=cfg.fast), optimizer
        )

    def resume(self) -> None:
        """Restore the checkpoint, if any (weights, optimizer, schedule, RNG, position), and
        start this process's share of the batch stream where it left off."""
        if self.resume_from is not None:
            self.state = ckpt.load_checkpoint(
                self.resume_from, self.model, self.optimizer.optimizer, self.scheduler
            )
        rank = self.accelerator.process_index
        self.batches = train_batches(
            self.cfg, self.train_set, self.pad_id, self.state.micro_step, rank, self.world
        )

    def setup_logging(self) -> None:
        """Print what is about to run; open metrics.jsonl + TensorBoard (main process only)."""
        if not self.main:
            return
        cfg = self.cfg
        path = "fast: packed, bf16 autocast, sparse loss" if cfg.fast else "plain: fp32, padded"
        if cfg.fast and not self.use_bf16:
            path = "fast: packed, sparse loss (no bf16 on this device: fp32)"
        console.print(f"model: {cfg.model}  ({path}, {self.accelerator.device})")
        for line in self.data_lines:
            console.print(f"data: {line}", markup=False)
        trainable, total = self.trainable, self.total_params
        console.print(
            f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        )
        console.print(
            f"steps: {self.total_steps} (batch {cfg.batch_size} x accum {cfg.grad_accum} x "
            f"{self.world} proc, {self.per_epoch / (cfg.grad_accum * self.world):.1f} steps/epoch)"
        )
        if self.resume_from is not None:
            console.print(f"resumed from {self.resume_from} at step {self.state.step}")
        self.metrics = MetricsLog(self.out, start_step=self.state.step)

    # ---- the run ------------------------------------------------------------------------------
    def run(self, train: list[Example] | None = None, val: list[Example] | None = None) -> Path:
        """setup -> resume -> loop (train_step, log, evaluate, save) -> final artefacts."""
        self.setup_output()
        self.setup_accelerator()
        self.setup_data(train, val)
        self.setup_model()
        self.setup_optim()
        self.resume()
        self.setup_logging()
        cfg, state = self.cfg, self.state
        with progress_bar(disable=not self.main) as self.bar:
            self.task = self.bar.add_task(
                "sft", total=self.total_steps, completed=state.step, loss="-", lr="-", tps="-"
            )
            while state.step < self.total_steps:
                step = self.train_step()
                self.throughput.add(step)
                if self._due(cfg.logging_steps):
                    self.log_train(step)
                self.bar.update(self.task, completed=state.step)
                if self.val_batches and self._due(cfg.eval_steps):
                    self.record_val(self.evaluate())
                if self._due(cfg.save_steps):
                    self.save()
                self.accelerator.wait_for_everyone()
        self.save(final=True)
        self.cleanup()
        return self.out

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step >= self.total_steps

    def train_step(self) -> StepFigures:
        """One optimizer step: grad_accum micro-batches -> backward piece by piece -> clip ->
        AdamW step -> schedule step."""
        cfg, state, acc = self.cfg, self.state, self.accelerator
        t0 = time.perf_counter()
        step_loss, step_tokens, pieces = 0.0, 0, []
        for _ in range(cfg.grad_accum):
            batch = next(self.batches)
            step_tokens += int(batch.pop("num_tokens"))
            pieces += (
                backward_pieces(batch, self.pad_id, cfg.max_length) if cfg.fast else [(batch, 1.0)]
            )
        for i, (piece, share) in enumerate(pieces):
            piece = {k: v.to(acc.device) for k, v in piece.items()}
            last = i == len(pieces) - 1  # DDP syncs gradients once, after the last backward
            with contextlib.nullcontext() if last else acc.no_sync(self.loss_model):
                with acc.autocast():
                    loss = self.loss_model(**piece) * (share / cfg.grad_accum)
                acc.backward(loss)
            step_loss += float(loss.detach())
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        release_memory()
        state.step += 1
        state.micro_step += cfg.grad_accum
        state.tokens_seen += step_tokens * self.world
        dt = time.perf_counter() - t0
        state.train_seconds += dt
        return StepFigures(step_loss, step_tokens * self.world, dt, lr, grad_norm)

    def evaluate(self) -> float:
        """Validation loss: the training loss (no dropout) weighted by labelled tokens."""
        self.loss_model.eval()
        scored = TokenMean()
        with torch.no_grad():
            for b in self.val_batches:
                b = {k: v.to(self.accelerator.device) for k, v in b.items()}
                scored.add_mean(self.loss_model(**b), labelled_tokens(b["labels"]))
        self.loss_model.train()
        return scored.mean

    def log_train(self, step: StepFigures) -> None:
        """The logging window's mean loss and speed: metrics.jsonl, TensorBoard, the bar."""
        if not self.main:
            return
        state, tp = self.state, self.throughput
        tps, mean_loss = tp.window_tokens_per_s, tp.window_loss
        self.metrics.log(
            state.step,
            train_loss=mean_loss,
            train_lr=step.lr,
            train_grad_norm=step.grad_norm,
            train_tokens_per_s=tps,
            train_epoch=state.micro_step * self.world / self.per_epoch,
            train_tokens_seen=state.tokens_seen,
            train_run_tokens=tp.run_tokens,  # this process's run (resumes start afresh)
            train_run_seconds=tp.run_seconds,  # step time only: no loading, eval, saving
            train_seconds=state.train_seconds,
        )
        self.bar.update(self.task, loss=fmt_loss(mean_loss), lr=f"{step.lr:.2e}", tps=f"{tps:,.0f}")
        if not console.is_terminal:
            console.print(
                f"step {state.step}/{self.total_steps} loss {mean_loss:.4f} lr {step.lr:.2e} "
                f"{tps:,.0f} tok/s"
            )
        tp.reset_window()

    def record_val(self, loss: float) -> None:
        """Log a validation loss and keep track of the best step (its checkpoint is kept)."""
        state = self.state
        if self.main:
            ppl = math.exp(min(loss, 50.0))
            self.metrics.log(state.step, val_loss=loss, val_ppl=ppl)
            self.bar.console.print(f"step {state.step}: val loss {loss:.4f} ppl {ppl:.2f}")
        if state.best_val_loss is None or loss < state.best_val_loss:
            state.best_val_loss, state.best_step = loss, state.step

    def save(self, final: bool = False) -> None:
        """A checkpoint of this step (rotated); ``final``: the adapter in the output dir, the
        loss plot and the closing lines. Main process only."""
        if not self.main:
            return
        model = self.accelerator.unwrap_model(self.loss_model).model
        if not final:
            opt = self.optimizer.optimizer
            ckpt.save_checkpoint(self.out, model, opt, self.scheduler, self.state, self._meta)
            ckpt.rotate_checkpoints(self.out, self.cfg.save_total_limit, self.state.best_step)
            return
        model.save_pretrained(self.out)
        self._meta(self.out)
        plot_loss(self.out)
        tp, state = self.throughput, self.state
        if tp.run_seconds > 0:
            console.print(
                f"trained {tp.run_tokens:,} tokens at {tp.run_tokens / tp.run_seconds:,.0f} tok/s"
            )
        if state.best_step is not None:
            best = self.out / ckpt.CKPT_DIR / f"step-{state.best_step:06d}"
            console.print(
                f"best val loss {state.best_val_loss:.4f} at step {state.best_step}: {best}"
            )
        console.print(f"adapter: {self.out}  (loraforge chat --adapter {self.out})")

    def _meta(self, d: Path) -> None:
        """loraforge.json: base model, template and system prompt the adapter was trained with."""
        write_meta(d, AdapterMeta(self.cfg.model, self.template, self.system, self.cfg.max_length))

    def cleanup(self) -> None:
        """Close metrics.jsonl and TensorBoard; end the accelerator's run (trackers, groups)."""
        if self.metrics is not None:
            self.metrics.close()
        self.accelerator.end_training()


def run_sft(
    cfg: SFTConfig, *, train: list[Example] | None = None, val: list[Example] | None = None
) -> Path:
    """Train and write the adapter to ``cfg.output``; returns that dir. ``train``/``val``
    (pre-tokenised examples) replace loading ``cfg.dataset``, for tests and embedding."""
    return SFTRecipe(cfg).run(train=train, val=val)
