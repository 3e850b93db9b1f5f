"""Training data for `sft`: load the datasets, split off a seeded validation set, batch them.

The batch stream is a pure function of (seed, micro-batch index): resume restarts it at the
checkpoint's data position and sees exactly the batches the killed run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from loraforge.config import SFTConfig
from loraforge.cpu.buckets import round_up
from loraforge.data.collate import epoch_order, pack_batch, pad_batch
from loraforge.data.tokenize import IGNORE_INDEX, Example, resolve_system, resolve_template
from loraforge.errors import UserError


class TrainDataError(UserError):
    """Data that leaves nothing to train on."""


def load_train_val(cfg: SFTConfig, tokenizer) -> tuple[list[Example], list[Example], list[str]]:
    """(train, val, lines to print). Examples without a labelled token are dropped."""
    from loraforge.data import load_examples

    kwargs = dict(
        template=resolve_template(tokenizer, cfg.template, cfg.thinking),
        system=resolve_system(cfg.system),
        think=cfg.think,
        max_length=cfg.max_length,
        seed=cfg.seed,
        model_name=cfg.model_name,
        model_author=cfg.model_author,
        strict=cfg.strict,
    )
    train, report = load_examples(list(cfg.dataset), tokenizer, **kwargs)
    lines = [report.summary(), *report.problem_lines(list(cfg.dataset))]
    val: list[Example] = []
    if cfg.val_dataset:
        val, vreport = load_examples(list(cfg.val_dataset), tokenizer, **kwargs)
        lines += ["val: " + vreport.summary(), *vreport.problem_lines(list(cfg.val_dataset))]
    elif cfg.val_split > 0 and len(train) >= 10:
        train, val = split(train, cfg.val_split, cfg.seed)
        lines.append(f"val split {cfg.val_split:g}: {len(train)} train, {len(val)} val examples")
    train = [e for e in train if e.num_labels > 0]
    val = [e for e in val if e.num_labels > 0]
    if not train:
        raise TrainDataError(f"--dataset {','.join(cfg.dataset)}: no example has an answer")
    return train, val, lines


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split: the same seed gives the same validation set on every run."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    return train, [examples[i] for i in sorted(val_idx)]


def micro_batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def collate(cfg: SFTConfig, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    if cfg.fast:
        return pack_batch(examples, pad_id, max(cfg.pack_length, cfg.max_length))
    return pad_batch(examples, pad_id)


def train_batches(
    cfg: SFTConfig,
    train: list,
    pad_id: int,
    start: int,
    rank: int = 0,
    world: int = 1,
    collate_fn: Callable[[list], dict] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches from global index ``start`` on; rank r of w takes every w-th one.
    ``collate_fn`` (dpo's pairs) replaces ``collate(cfg, examples, pad_id)``."""
    collate_fn = collate_fn or (lambda examples: collate(cfg, examples, pad_id))
    per_epoch = micro_batches_per_epoch(len(train), cfg.batch_size)
    m = start * world + rank
    order_epoch, order = -1, []
    while True:
        epoch, i = divmod(m, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(train), cfg.seed, epoch)
        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        yield collate_fn([train[j] for j in idx])
        m += world


def val_batches(cfg: SFTConfig, val: list[Example], pad_id: int) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(val, key=lambda e: len(e.input_ids))  # similar lengths: less padding
    return [
        collate(cfg, ordered[i : i + cfg.batch_size], pad_id)
        for i in range(0, len(ordered), cfg.batch_size)
    ]


def backward_pieces(
    batch: dict[str, torch.Tensor], pad_id: int, budget: int = 512
) -> list[tuple[dict, float]]:
    """Split a packed batch into pieces of whole samples (at most ``budget`` tokens unless one
    sample is longer, padding cut off), each with its share of the batch's labelled tokens:
    summing ``share * mean loss of the piece`` gives the batch's mean loss, so forward+backward
    can run piece by piece and keep one piece's activations alive at a time. This is the
    peak-memory lever of the fast path; at these lengths the matmuls run as fast."""
    lengths = batch.get("row_lengths")
    batch = {k: v for k, v in batch.items() if k != "row_lengths"}
    labels = batch["labels"]
    total = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if lengths is None or total == 0:
        return [(batch, 1.0)]
    pieces = []
    for r, n in enumerate(lengths.tolist()):
        starts = (batch["position_ids"][r, :n] == 0).nonzero().flatten().tolist()
        for a, b in _group(starts + [n], budget):
            k = int((labels[r, a + 1 : b] != IGNORE_INDEX).sum())
            if k == 0:
                continue  # nothing to learn from these samples
            piece = {key: v[r : r + 1, a:b] for key, v in batch.items() if key != "attention_mask"}
            piece["attention_mask"] = batch["attention_mask"][r : r + 1, :, a:b, a:b]
            pieces.append((_pad_to_bucket(piece, pad_id), k / total))
    return pieces


def _group(bounds: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive samples ([bounds[i], bounds[i+1])) grouped greedily into spans of at most
    ``budget`` tokens; a longer sample is a span of its own."""
    spans, a = [], bounds[0]
    for prev, end in zip(bounds[1:-1], bounds[2:], strict=True):
        if end - a > budget:
            spans.append((a, prev))
            a = prev
    spans.append((a, bounds[-1]))
    return spans


BUCKET = 64


def _pad_to_bucket(piece: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a row to a multiple of BUCKET tokens (the padding is one masked block of its
    own, with no labels). oneDNN caches kernels per matrix shape and the process keeps each
    one's memory: rows of every possible length grew RSS by ~40 MB a step here; a few widths
    bound it."""
    n = piece["input_ids"].shape[1]
    width = round_up(n, BUCKET)
    extra = width - n
    if extra == 0:
        return piece
    ids = torch.cat([piece["input_ids"], torch.full((1, extra), pad_id)], dim=1)
    labels = torch.cat([piece["labels"], torch.full((1, extra), IGNORE_INDEX)], dim=1)
    pos = torch.cat([piece["position_ids"], torch.arange(extra)[None]], dim=1)
    mask = torch.zeros(1, 1, width, width, dtype=torch.bool)
    mask[..., :n, :n] = piece["attention_mask"]
    mask[..., n:, n:] = torch.ones(extra, extra, dtype=torch.bool).tril()
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}
