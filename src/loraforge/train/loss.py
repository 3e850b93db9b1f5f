"""The training loss, as a module: ``SFTLoss(model, fast)(**batch) -> scalar``.

Being an ``nn.Module`` whose forward returns the loss is what lets ``accelerator.prepare`` (and
later DDP/FSDP) wrap it without the loop knowing.

The fast path never materialises full-vocab logits for the whole batch. It runs the model body
to get hidden states, keeps only the positions whose shifted label is not -100 (labels are
sparse: only assistant tokens), and applies lm_head + cross-entropy to those in chunks. With a
frozen lm_head (the usual case: tied embeddings, not a LoRA target) a fused function computes
each chunk's loss and its gradient w.r.t. the hidden states in the forward pass, so only an
(N, hidden) gradient is kept for backward, not (N, vocab) logits. A trainable lm_head falls back
to recomputing each chunk in backward (activation checkpointing).

``token_ce`` is the same loss on full logits, as a (sum, count) pair: evaluation, `loraforge
eval` and the benchmark's final loss sum it over batches (``TokenMean``), so a dataset's loss is
weighted by labelled tokens, not by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.cpu.buckets import round_up
from loraforge.data.tokenize import IGNORE_INDEX

ROW_BUCKET = 32


def _rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with ``a``'s rows zero-padded to a multiple of ROW_BUCKET (result sliced back).

    oneDNN builds and keeps a kernel, with its working memory, for every matrix shape it meets;
    with the labelled-token count of each row as the first dimension of a 49k-wide matmul, that
    grew the training process by ~40 MB a step here. A few bucketed shapes bound it."""
    n = a.shape[0]
    width = round_up(n, ROW_BUCKET)
    if width == n:
        return a @ b
    return (torch.cat([a, a.new_zeros(width - n, a.shape[1])]) @ b)[:n]


class _FrozenLinearCE(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``; ``weight`` is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else hidden.new_empty(0)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = _rows_matmul(h.to(weight.dtype), weight.t()).float()
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not need_grad:  # evaluation: the loss only
                continue
            probs = (logits - lse[:, None]).exp_()  # d(loss)/d(logits) = softmax - onehot
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            grad[s : s + chunk] = _rows_matmul(probs.to(weight.dtype), weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _chunk_ce(
    lm_head: nn.Module, h: torch.Tensor, t: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    logits = lm_head(h).float()
    if softcap:  # Gemma 2: logits = cap * tanh(logits / cap), as its forward computes them
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, t, reduction="sum")


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions of (B, T) ``labels`` are scored: the shifted labels not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed fp32 next-token cross-entropy, labelled positions) of full (B, T, V) ``logits``
    against (B, T) ``labels`` aligned with the inputs (the shift by one happens here)."""
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, labelled_tokens(labels)


@dataclass
class TokenMean:
    """A loss weighted by labelled tokens over many batches: sum of token losses / tokens."""

    total: float = 0.0
    count: int = 0

    def add(self, total: torch.Tensor | float, count: int) -> None:
        """A batch's summed loss (``token_ce``) and its labelled token count."""
        self.total += float(total)
        self.count += count

    def add_mean(self, mean: torch.Tensor | float, count: int) -> None:
        """A batch's mean loss over ``count`` labelled tokens (what ``SFTLoss`` returns)."""
        self.add(float(mean) * count, count)

    @property
    def mean(self) -> float:
        return self.total / max(1, self.count)


def sparse_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    chunk: int = 256,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions only.

    ``hidden`` is (B, T, H) from the model body, ``labels`` (B, T) aligned with the inputs (the
    shift happens here, as in transformers). ``softcap``: the model's final logit soft-capping
    (config.final_logit_softcapping, Gemma 2), applied before the cross-entropy."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    t = targets[keep]
    n = t.numel()
    if n == 0:
        return hidden.sum() * 0.0  # keeps the graph; no labelled token in this batch
    weight = getattr(lm_head, "weight", None)
    fused = (
        not softcap  # the fused gradient is softmax - onehot of the raw logits
        and isinstance(lm_head, nn.Linear)
        and lm_head.bias is None
        and weight is not None
        and not weight.requires_grad
    )
    if fused:
        device = h.device.type
        # cast once here, not once per chunk inside autocast
        w = (
            weight.to(torch.get_autocast_dtype(device))
            if torch.is_autocast_enabled(device)
            else weight
        )
        need_grad = torch.is_grad_enabled() and h.requires_grad
        total = _FrozenLinearCE.apply(h, w, t, chunk, need_grad)
    else:
        total = sum(
            checkpoint(
                _chunk_ce, lm_head, h[s : s + chunk], t[s : s + chunk], softcap, use_reentrant=False
            )
            for s in range(0, n, chunk)
        )
    return total / n


class SFTLoss(nn.Module):
    """Wraps a (PEFT) causal LM; forward(batch) returns the mean loss over labelled tokens."""

    def __init__(self, model: nn.Module, fast: bool = True, chunk: int = 128):
        # chunk: labelled positions per lm_head slice; 128 x 49,152 fp32 logits = 25 MB (the
        # loss step's transient memory is a few of those; 256 measured no faster)
        super().__init__()
        self.model = model
        self.fast = fast
        self.chunk = chunk

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if not self.fast:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False
            ).loss
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else None
        causal_lm = causal_lm or self.model
        out = causal_lm.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        # Bug fix: Gemma 2 caps its final logits (cap * tanh(x / cap)); the loss on the raw
        # lm_head output trained another model than the one served (found on a tiny gemma2).
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        return sparse_lm_loss(
            out.last_hidden_state, labels, causal_lm.get_output_embeddings(), self.chunk, softcap
        )
