"""The `dpo` recipe: preference tuning of a LoRA adapter on chosen/rejected pairs, as the `sft`
recipe with other data and another loss.

    pairs (data/preference.py) -> [SFTRecipe: model + LoRA, AdamW, checkpoints, resume, metrics,
    adapter output] with: pieces of whole pairs -> policy log-probs (+ the reference's) -> loss

``DPORecipe`` overrides SFTRecipe's data and loss hooks only (setup_data, batch_stream,
split_batch, make_loss, window_extras) and evaluation. Losses (``--loss``):

- dpo (Rafailov et al. 2023, sigmoid): ``-log σ(β[(π_c - ref_c) - (π_r - ref_r)])`` over the
  answers' summed log-probabilities. The reference is the frozen base itself: the same model
  run with the adapter disabled (PEFT's ``disable_adapter()``) under no_grad, in eval mode, on the
  same packed piece just before the policy forward: no second copy of the weights, and at step 0
  (LoRA B = 0) the rewards are exactly 0.
- simpo (Meng et al. 2024): ``-log σ(β(π_c/|c| - π_r/|r|) - γ)``: reference-free, its reward is
  the length-normalised log-probability. Picked over ORPO as the cheap cousin because it is the
  same pairwise sigmoid on the same log-probabilities with the reference forward dropped (no
  extra term); ORPO adds an SFT loss and an odds-ratio term instead.

Rewards (TRL's definitions): dpo ``β(π - ref)`` per answer, simpo ``β π/|answer|``; the margin
is chosen - rejected, the accuracy the share of pairs whose margin is > 0. They go to
metrics.jsonl / TensorBoard as train_rewards_* and val_rewards_*, and to the progress line.

A micro-batch of pairs is cut into pieces of whole pairs (at most ``--max-length`` tokens unless
one pair is longer), each packed into one row [chosen, rejected, chosen, ...] with the sft fast
path's block-diagonal mask, and forward + backward run piece by piece as in `sft`: a pair's loss
needs both its answers, so a piece never splits one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from loraforge.config import DPOConfig
from loraforge.data.collate import pack_batch, pad_batch
from loraforge.data.preference import PreferenceExample, load_preference_examples
from loraforge.data.tokenize import resolve_system, resolve_template
from loraforge.train import checkpoint as ckpt
from loraforge.train import distributed as ddp
from loraforge.train.data import (
    TrainDataError,
    _pad_to_bucket,
    micro_batches_per_epoch,
    split,
    train_batches,
)
from loraforge.train.loss import labelled_tokens, sparse_lm_loss
from loraforge.train.recipe import SFTRecipe, to_device

# Fields of a dpo run that a resume must keep (besides sft's checkpoint.RESUME_FIXED).
DPO_FIXED = ("loss", "beta", "simpo_gamma")


class PreferenceLoss(nn.Module):
    """Wraps the PEFT model; forward(piece) -> the mean pair loss of the piece. The reward sums
    (chosen, rejected, correct pairs, pairs) of train and eval forwards accumulate apart and are
    read with ``take``."""

    def __init__(
        self, model: nn.Module, loss: str = "dpo", beta: float = 0.1, gamma: float = 1.0, chunk=128
    ):
        super().__init__()
        self.model = model
        self.loss, self.beta, self.gamma, self.chunk = loss, beta, gamma, chunk
        self._sums = {mode: torch.zeros(4, dtype=torch.float64) for mode in (True, False)}

    def take(self, training: bool) -> list[float]:
        """The reward sums since the last take, of training (or evaluation) forwards."""
        sums = self._sums[training].tolist()
        self._sums[training] = torch.zeros(4, dtype=torch.float64)
        return sums

    def sequence_logps(self, input_ids, labels, spans, attention_mask=None, position_ids=None):
        """(summed log-probability of each sample's labelled tokens, their counts); sample k is
        ``spans[k] = (row, start, end)`` of the batch."""
        model = self.model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = causal_lm.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        lm_head = causal_lm.get_output_embeddings()
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        logps, counts = [], []
        for r, a, b in spans.tolist():
            # sparse_lm_loss: the fused lm_head + cross-entropy of sft, one sample at a time
            n = labelled_tokens(labels[r : r + 1, a:b])
            mean_ce = sparse_lm_loss(hidden[r : r + 1, a:b], labels[r : r + 1, a:b], lm_head,
                                     self.chunk, softcap)  # fmt: skip
            logps.append(-mean_ce * n)
            counts.append(n)
        return torch.stack(logps), torch.tensor(counts, device=hidden.device)

    def reference_logps(self, **piece) -> torch.Tensor:
        """The same log-probabilities from the base: the adapter disabled, no dropout, no grad."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                return self.sequence_logps(**piece)[0]
        finally:
            model.train(was_training)

    def forward(self, input_ids, labels, spans, attention_mask=None, position_ids=None, **_):
        piece = dict(input_ids=input_ids, labels=labels, spans=spans,
                     attention_mask=attention_mask, position_ids=position_ids)  # fmt: skip
        ref = self.reference_logps(**piece) if self.loss == "dpo" else None
        logps, counts = self.sequence_logps(**piece)
        losses, chosen, rejected = pair_losses(logps, counts, ref, self.loss, self.beta, self.gamma)
        c, r = chosen.detach().double().cpu(), rejected.detach().double().cpu()
        self._sums[self.training] += torch.stack(
            [c.sum(), r.sum(), (c > r).double().sum(), torch.tensor(float(len(c)))]
        )
        return losses.mean()


def pair_losses(
    logps: torch.Tensor,
    counts: torch.Tensor,
    ref: torch.Tensor | None,
    loss: str,
    beta: float,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair; samples alternate chosen, rejected."""
    if loss == "dpo":
        chosen = beta * (logps[0::2] - ref[0::2])
        rejected = beta * (logps[1::2] - ref[1::2])
        return -F.logsigmoid(chosen - rejected), chosen, rejected
    chosen = beta * logps[0::2] / counts[0::2]
    rejected = beta * logps[1::2] / counts[1::2]
    return -F.logsigmoid(chosen - rejected - gamma), chosen, rejected


def reward_figures(sums: list[float], prefix: str) -> dict[str, float]:
    """Mean chosen/rejected reward, margin and accuracy from ``PreferenceLoss.take`` sums."""
    chosen, rejected, correct, pairs = sums
    if not pairs:
        return {}
    return {
        f"{prefix}rewards_chosen": chosen / pairs,
        f"{prefix}rewards_rejected": rejected / pairs,
        f"{prefix}rewards_margin": (chosen - rejected) / pairs,
        f"{prefix}rewards_accuracy": correct / pairs,
    }


def collate_pairs(
    pairs: list[PreferenceExample], pad_id: int, fast: bool, budget: int
) -> dict[str, object]:
    """A micro-batch of pairs: {"pieces": [(piece, share of the pairs)], "pairs", "num_tokens"}.
    Fast: pieces of consecutive whole pairs up to ``budget`` tokens, each one packed row (its
    width rounded up as the sft pieces are, to bound oneDNN's cached shapes); plain: one
    padded piece, a row per sample. ``spans`` (row, start, end) locate the samples."""
    groups: list[list[PreferenceExample]] = []
    size = 0
    for pair in pairs:
        if fast and groups and size + pair.num_tokens <= budget:
            groups[-1].append(pair)
            size += pair.num_tokens
        else:
            groups.append([pair])
            size = pair.num_tokens
    if not fast:
        groups = [pairs]
    pieces = []
    for group in groups:
        samples = [ex for pair in group for ex in (pair.chosen, pair.rejected)]
        lengths = [len(ex.input_ids) for ex in samples]
        if fast:  # pack_length = the group's length: one row, the samples in this order
            packed = pack_batch(samples, pad_id, sum(lengths))
            piece = _pad_to_bucket({k: packed[k] for k in _PACKED}, pad_id)
            ends = torch.tensor(lengths).cumsum(0)
            spans = torch.stack([torch.zeros_like(ends), ends - torch.tensor(lengths), ends], 1)
        else:
            piece = pad_batch(samples, pad_id)
            piece.pop("num_tokens")
            spans = torch.tensor([[r, 0, n] for r, n in enumerate(lengths)])
        piece["spans"] = spans
        pieces.append((piece, len(group) / len(pairs)))
    tokens = sum(pair.num_tokens for pair in pairs)
    return {"pieces": pieces, "pairs": len(pairs), "num_tokens": torch.tensor(tokens)}


_PACKED = ("input_ids", "labels", "position_ids", "attention_mask")


def load_pair_sets(cfg: DPOConfig, tokenizer) -> tuple[list, list, list[str]]:
    """(train pairs, val pairs, lines to print), as train/data.load_train_val for sft."""
    kwargs = dict(
        template=resolve_template(tokenizer, cfg.template, cfg.thinking),
        system=resolve_system(cfg.system),
        think=cfg.think,
        max_length=cfg.max_length,
        seed=cfg.seed,
        strict=cfg.strict,
    )
    train, report = load_preference_examples(list(cfg.dataset), tokenizer, **kwargs)
    lines = [report.summary().replace("examples", "pairs", 1)]
    lines += report.problem_lines(list(cfg.dataset))
    val: list[PreferenceExample] = []
    if cfg.val_dataset:
        val, vreport = load_preference_examples(list(cfg.val_dataset), tokenizer, **kwargs)
        lines += ["val: " + vreport.summary().replace("examples", "pairs", 1)]
    elif cfg.val_split > 0 and len(train) >= 10:
        train, val = split(train, cfg.val_split, cfg.seed)
        lines.append(f"val split {cfg.val_split:g}: {len(train)} train, {len(val)} val pairs")
    if not train:
        raise TrainDataError(f"--dataset {','.join(cfg.dataset)}: no pair to train on")
    return train, val, lines


class DPORecipe(SFTRecipe):
    """One `dpo` run: SFTRecipe with preference pairs and PreferenceLoss."""

    verb = "dpo"
    cfg: DPOConfig

    def setup_output(self) -> None:
        """As sft's, and a resume must keep the loss and its constants."""
        saved_path = self.out / "config.yaml"
        if self.cfg.resume and not self.cfg.overwrite and saved_path.is_file():
            saved = yaml.safe_load(saved_path.read_text()) or {}
            for key in DPO_FIXED:
                if key in saved and saved[key] != getattr(self.cfg, key):
                    raise ckpt.CheckpointError(
                        f"--resume: {key} is {getattr(self.cfg, key)!r} but the checkpoints were "
                        f"trained with {saved[key]!r} ({saved_path}); use the same or --overwrite"
                    )
        super().setup_output()

    def setup_data(self, train=None, val=None) -> None:
        """Tokenizer, chat template, pairs (``cfg.dataset``, unless given), val batches."""
        from loraforge.models import load_tokenizer

        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        self.template = resolve_template(tokenizer, cfg.template, cfg.thinking)
        if train is None:
            train, val, self.data_lines = load_pair_sets(cfg, tokenizer)
        else:
            val = val or []
            self.data_lines = [f"{len(train)} train, {len(val)} val pairs (given)"]
        self.train_set = train
        self.pad_id = tokenizer.pad_token_id
        self.per_epoch = micro_batches_per_epoch(len(train), cfg.batch_size)
        ordered = sorted(val, key=lambda p: p.num_tokens)  # similar lengths: less padding
        bs = cfg.batch_size
        self.val_batches = [self._collate(ordered[i : i + bs]) for i in range(0, len(val), bs)]
        self.window = [0.0] * 4
        self.val_figures: dict[str, float] = {}

    def _collate(self, pairs: list[PreferenceExample]) -> dict:
        return collate_pairs(pairs, self.pad_id, self.cfg.fast, self.cfg.max_length)

    def batch_stream(self, start: int, rank: int):
        return train_batches(
            self.cfg, self.train_set, self.pad_id, start, rank, self.world, self._collate
        )

    def make_loss(self) -> nn.Module:
        cfg = self.cfg
        return PreferenceLoss(self.model, cfg.loss, cfg.beta, cfg.simpo_gamma)

    def split_batch(self, batch: dict) -> tuple[list[tuple[dict, float]], int]:
        return batch["pieces"], batch["pairs"]

    def train_step(self):
        step = super().train_step()
        sums = self.accelerator.unwrap_model(self.loss_model).take(True)
        sums = ddp.sum_across(self.accelerator, *sums)  # every rank: a collective
        self.window = [w + s for w, s in zip(self.window, sums, strict=True)]
        return step

    def window_extras(self) -> tuple[dict[str, float], str]:
        figures = reward_figures(self.window, "train_")
        self.window = [0.0] * 4
        return figures, _shown(figures, "train_")

    def evaluate(self) -> float:
        """Validation: the mean pair loss and the reward figures (``self.val_figures``); rank r
        scores every world-th batch."""
        acc = self.accelerator
        module = acc.unwrap_model(self.loss_model)
        self.loss_model.eval()
        total = 0.0
        with torch.no_grad():
            for b in self.val_batches[acc.process_index :: self.world]:
                for piece, share in b["pieces"]:
                    pairs = share * b["pairs"]
                    total += float(self.loss_model(**to_device(piece, acc.device))) * pairs
        self.loss_model.train()
        total, *sums = ddp.sum_across(acc, total, *module.take(False))
        self.val_figures = reward_figures(sums, "val_")
        return total / sums[3] if sums[3] else float("nan")

    def record_val(self, loss: float) -> None:
        state = self.state
        if self.main:
            self.metrics.log(state.step, val_loss=loss, **self.val_figures)
            shown = _shown(self.val_figures, "val_")
            self.bar.console.print(f"step {state.step}: val loss {loss:.4f}  {shown}")
        if state.best_val_loss is None or loss < state.best_val_loss:
            state.best_val_loss, state.best_step = loss, state.step


def _shown(figures: dict[str, float], prefix: str) -> str:
    """The progress line's part: margin and accuracy."""
    if not figures:
        return ""
    margin, accuracy = figures[f"{prefix}rewards_margin"], figures[f"{prefix}rewards_accuracy"]
    return f"margin {margin:+.3f} acc {accuracy:.2f}"


def run_dpo(
    cfg: DPOConfig,
    *,
    train: list[PreferenceExample] | None = None,
    val: list[PreferenceExample] | None = None,
) -> Path:
    """Train and write the adapter to ``cfg.output``; returns that dir. ``train``/``val``
    (tokenised pairs) replace loading ``cfg.dataset``. ``cfg.nproc`` > 1 outside a launcher:
    the run happens in that many new processes."""
    if cfg.nproc > 1 and not ddp.under_launcher():
        if train is not None or val is not None:
            raise ddp.LaunchError("--nproc > 1 reads --dataset: given pairs cannot be passed")
        code = ddp.relaunch(cfg, verb="dpo")
        if code != 0:
            raise ddp.LaunchError(f"dpo --nproc {cfg.nproc}: a process failed (exit code {code})")
        return Path(cfg.output)
    return DPORecipe(cfg).run(train=train, val=val)
