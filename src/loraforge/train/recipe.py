"""The `sft` recipe: supervised fine-tuning of a LoRA adapter, in one readable loop.

    load tokenizer + data -> model + LoRA -> AdamW + schedule -> [resume] ->
    for each optimizer step: grad_accum micro-batches -> clip -> step -> log / eval / save
    -> final adapter + loraforge.json + config.yaml + metrics.jsonl + TensorBoard + loss.png

Everything device- and precision-specific goes through ``accelerate.Accelerator`` (autocast,
backward, no_sync, clipping), so `accelerate launch` / torchrun / ``--nproc`` (DDP; FSDP and
DeepSpeed configs in examples/accelerate) and a 4-bit base (``--quantization``) use this file
as it is; train/distributed.py holds what only several processes need. The fast path (default)
packs sequences, holds the frozen base in bf16 under bf16 autocast and computes the loss only on
labelled positions; ``fast=False`` is the plain fp32, padded, full-logits path.

``SFTRecipe`` holds the run, one method per stage (as torchtune's recipes); ``run`` is the whole
run in order. ``run_sft(cfg)`` is the entry point the CLI, the benchmark and the tests call.
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
from loraforge.cpu.memory import release_memory
from loraforge.data.tokenize import Example, resolve_system, resolve_template
from loraforge.errors import UserError
from loraforge.fsutil import share_as_umask
from loraforge.train import checkpoint as ckpt
from loraforge.train import distributed as ddp
from loraforge.train.data import (
    backward_pieces,
    load_train_val,
    micro_batches_per_epoch,
    train_batches,
    val_batches,
)
from loraforge.train.lora import load_lora_model, mixed_precision, trainable_parameters
from loraforge.train.loss import SFTLoss, labelled_tokens
from loraforge.train.metrics import (
    MetricsLog,
    StepFigures,
    Throughput,
    fmt_loss,
    plot_loss,
    progress_bar,
)


class OutputError(UserError):
    """An output dir holding an earlier run."""


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


class SFTRecipe:
    """One `sft` run: call ``run()``, or the stages in its order (tests drive single stages).
    train/dpo.py's DPORecipe overrides the data and loss hooks (make_loss, batch_stream,
    split_batch, window_extras) and evaluation."""

    verb = "sft"  # the progress bar's name

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
        """Check the output dir against --resume / --overwrite; write the resolved config.yaml.
        Every process checks (each raises the same error), then rank 0 alone writes."""
        cfg, out, acc = self.cfg, self.out, self.accelerator
        self.resume_from = ddp.rank0_value(acc, ckpt.resolve_resume(cfg.resume, out))
        if self.resume_from is None and ckpt.checkpoint_dirs(out) and not cfg.overwrite:
            raise OutputError(f"--output {out} holds checkpoints: add --resume or --overwrite")
        resolved = cfg.model_copy(update={"system": self.system})
        if self.resume_from is not None and (out / "config.yaml").is_file():
            saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
            ckpt.check_resume_config(saved, resolved.model_dump(mode="json"), out / "config.yaml")
        acc.wait_for_everyone()  # all have read the dir before rank 0 changes it
        if self.main:
            if self.resume_from is None and (out / ckpt.CKPT_DIR).is_dir():
                shutil.rmtree(out / ckpt.CKPT_DIR)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(resolved.to_yaml())
        acc.wait_for_everyone()

    def setup_accelerator(self) -> None:
        """The Accelerator (bf16 autocast on the fast path where the device has bf16), then the
        seed: everything after this draws from the seeded RNGs in a fixed order."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        from transformers import set_seed

        ddp.check_launch()

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = mixed_precision(device, self.cfg.fast)  # fp16 + GradScaler: GPUs sans bf16
        self.use_bf16 = precision == "bf16"
        ddp.reset_accelerator_state()
        # cpu=True on a machine without CUDA: accelerate only takes the gloo (MULTI_CPU) path
        # when told so; without it, torchrun's LOCAL_RANK/WORLD_SIZE are ignored on a CPU-only
        # torch and every process trains alone ("1 proc", all writing the same output dir).
        # broadcast_buffers=False: DDP would broadcast the (constant) rotary buffers at every
        # forward, and the fast path's ranks run different numbers of forwards per step.
        self.accelerator = Accelerator(
            mixed_precision=precision,
            cpu=device.type == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.state.world = self.world
        set_seed(self.cfg.seed)

    def setup_data(self, train: list[Example] | None = None, val: list[Example] | None = None):
        """Tokenizer, chat template and examples (``cfg.dataset``, unless given), val batches."""
        from loraforge.models import load_tokenizer

        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        self.template = resolve_template(tokenizer, cfg.template, cfg.thinking)
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
        self.loss_model, self.optimizer = self.accelerator.prepare(self.make_loss(), optimizer)

    def make_loss(self) -> torch.nn.Module:
        """The module whose forward(**piece) is a piece's mean loss; it holds the model as
        ``.model`` (save() strips that prefix)."""
        return SFTLoss(self.model, fast=self.cfg.fast)

    def resume(self) -> None:
        """Restore the checkpoint, if any (weights, optimizer, schedule, RNG, position), and
        start this process's share of the batch stream where it left off."""
        rank = self.accelerator.process_index
        if self.resume_from is not None:
            self.state = ckpt.load_checkpoint(
                self.resume_from, self.model, self.optimizer.optimizer, self.scheduler, rank
            )
            if self.state.world != self.world:  # the data position and schedule assume it
                raise ckpt.CheckpointError(
                    f"--resume: {self.resume_from} was trained with {self.state.world} "
                    f"process(es), this run has {self.world}: use the same count or --overwrite"
                )
        self.batches = self.batch_stream(self.state.micro_step, rank)

    def batch_stream(self, start: int, rank: int):
        """This rank's micro-batches from micro-batch ``start`` on (train/data.py)."""
        return train_batches(self.cfg, self.train_set, self.pad_id, start, rank, self.world)

    def setup_logging(self) -> None:
        """Print what is about to run; open metrics.jsonl + TensorBoard (main process only)."""
        if not self.main:
            return
        cfg = self.cfg
        precision = self.accelerator.mixed_precision
        path = f"fast: packed, {precision} autocast, sparse loss" if cfg.fast else "plain: padded"
        if cfg.fast and precision == "no":
            path = "fast: packed, sparse loss (no bf16 on this device: fp32)"
        if cfg.quantization:
            path += f", {cfg.quantization} base"
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
        self.setup_accelerator()
        self.setup_output()
        self.setup_data(train, val)
        self.setup_model()
        self.setup_optim()
        self.resume()
        self.setup_logging()
        cfg, state = self.cfg, self.state
        with progress_bar(disable=not self.main, title=self.verb) as self.bar:
            self.task = self.bar.add_task(
                self.verb, total=self.total_steps, completed=state.step, loss="-", lr="-", tps="-",
                extra="",
            )  # fmt: skip
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
        step_loss, step_tokens, labelled, pieces = 0.0, 0, 0, []
        for _ in range(cfg.grad_accum):
            batch = next(self.batches)
            step_tokens += int(batch.pop("num_tokens"))
            batch_pieces, units = self.split_batch(batch)
            labelled += units
            pieces += batch_pieces
        # DDP averages the ranks' gradients; scaling each rank's loss by world x its share of
        # the global batch's labelled tokens makes that the token mean of the global batch, as
        # one process with a world-times-larger batch computes it (tests/test_ddp.py).
        all_tokens, all_labelled = ddp.sum_across(acc, step_tokens, labelled)
        rank_weight = self.world * labelled / all_labelled
        for i, (piece, share) in enumerate(pieces):
            piece = to_device(piece, acc.device)
            last = i == len(pieces) - 1  # DDP syncs gradients once, after the last backward
            with contextlib.nullcontext() if last else acc.no_sync(self.loss_model):
                with acc.autocast():
                    loss = self.loss_model(**piece) * (share * rank_weight / cfg.grad_accum)
                acc.backward(loss)
            step_loss += float(loss.detach())
        grad_norm = None
        if cfg.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips itself
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        release_memory()
        (step_loss,) = ddp.sum_across(acc, step_loss / self.world)  # the global batch's loss
        state.step += 1
        state.micro_step += cfg.grad_accum
        state.tokens_seen += int(all_tokens)
        dt = time.perf_counter() - t0
        state.train_seconds += dt
        return StepFigures(step_loss, int(all_tokens), dt, lr, grad_norm)

    def split_batch(self, batch: dict) -> tuple[list[tuple[dict, float]], int]:
        """(pieces to run forward + backward on one at a time, each with its share of the
        micro-batch's loss; how many units the loss is the mean over): labelled tokens here."""
        labelled = labelled_tokens(batch["labels"])
        if not self.cfg.fast:
            return [(batch, 1.0)], labelled
        return backward_pieces(batch, self.pad_id, self.cfg.max_length), labelled

    def evaluate(self) -> float:
        """Validation loss: the training loss (no dropout) weighted by labelled tokens; rank r
        scores every world-th batch."""
        acc = self.accelerator
        self.loss_model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b in self.val_batches[acc.process_index :: self.world]:
                b = to_device(b, acc.device)
                n = labelled_tokens(b["labels"])
                total, count = total + float(self.loss_model(**b)) * n, count + n
        self.loss_model.train()
        total, count = ddp.sum_across(acc, total, count)
        return total / count if count else float("nan")

    def log_train(self, step: StepFigures) -> None:
        """The logging window's mean loss and speed: metrics.jsonl, TensorBoard, the bar."""
        if not self.main:
            return
        state, tp = self.state, self.throughput
        tps, mean_loss = tp.window_tokens_per_s, tp.window_loss
        extras, shown = self.window_extras()
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
            **extras,
        )
        self.bar.update(
            self.task, loss=fmt_loss(mean_loss), lr=f"{step.lr:.2e}", tps=f"{tps:,.0f}", extra=shown
        )
        if not console.is_terminal:
            console.print(
                f"step {state.step}/{self.total_steps} loss {mean_loss:.4f} lr {step.lr:.2e} "
                f"{tps:,.0f} tok/s" + (f"  {shown}" if shown else "")
            )
        tp.reset_window()

    def window_extras(self) -> tuple[dict[str, float], str]:
        """More figures of the logging window for metrics.jsonl, and their short form for the
        progress line (dpo's rewards); called on the main process at each logged step."""
        return {}, ""

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
        """A checkpoint of this step (rotated; every rank's RNG state in it); ``final``: the
        adapter in the output dir, the loss plot and the closing lines. Rank 0 writes, the
        others wait for it."""
        rngs = None if final else ddp.gather_to_all(self.accelerator, ckpt.rng_state())
        # Every rank: where parameters are sharded (FSDP, ZeRO-3) this gathers them; under DDP
        # it is rank 0's own (replicated) state dict. "model." is SFTLoss's prefix.
        full = self.accelerator.get_state_dict(self.loss_model)
        weights = {k.removeprefix("model."): v for k, v in full.items()}
        if self.main:
            self._write(final, rngs, weights)
        self.accelerator.wait_for_everyone()

    def _write(self, final: bool, rngs: list[dict] | None, weights: dict) -> None:
        model = self.accelerator.unwrap_model(self.loss_model).model
        if not final:
            opt, state = self.optimizer.optimizer, self.state
            ckpt.save_checkpoint(
                self.out, model, opt, self.scheduler, state, self._meta, rngs, weights
            )
            ckpt.rotate_checkpoints(self.out, self.cfg.save_total_limit, state.best_step)
            return
        model.save_pretrained(self.out, state_dict=weights)
        share_as_umask(self.out / "adapter_model.safetensors")  # safetensors writes 0o600
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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``; to a GPU from pinned memory, so the copy overlaps compute."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def run_sft(
    cfg: SFTConfig, *, train: list[Example] | None = None, val: list[Example] | None = None
) -> Path:
    """Train and write the adapter to ``cfg.output``; returns that dir. ``train``/``val``
    (pre-tokenised examples) replace loading ``cfg.dataset``, for tests and embedding.
    ``cfg.nproc`` > 1 outside a launcher: the run happens in that many new processes."""
    if cfg.nproc > 1 and not ddp.under_launcher():
        if train is not None or val is not None:
            raise ddp.LaunchError("--nproc > 1 reads --dataset: given examples cannot be passed")
        code = ddp.relaunch(cfg)
        if code != 0:
            raise ddp.LaunchError(f"sft --nproc {cfg.nproc}: a process failed (exit code {code})")
        return Path(cfg.output)
    return SFTRecipe(cfg).run(train=train, val=val)
