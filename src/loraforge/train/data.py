"""Training data for `sft`: load the datasets, split off a seeded validation set, batch them.

The batch stream is a pure function of (seed, micro-batch index): resume restarts it at the
checkpoint's data position and sees exactly the batches the killed run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from loraforge.config import SFTConfig
from loraforge.data.collate import epoch_order, pack_batch, pad_batch
from loraforge.data.tokenize import DEFAULT_SYSTEM, Example
from loraforge.errors import UserError


class TrainDataError(UserError):
    """Data that leaves nothing to train on."""


def load_train_val(cfg: SFTConfig, tokenizer) -> tuple[list[Example], list[Example], list[str]]:
    """(train, val, lines to print). Examples without a labelled token are dropped."""
    from loraforge.data import load_examples

    kwargs = dict(
        template=cfg.template,
        system=DEFAULT_SYSTEM if cfg.system is None else cfg.system,
        max_length=cfg.max_length,
        seed=cfg.seed,
        model_name=cfg.model_name,
        model_author=cfg.model_author,
    )
    train, report = load_examples(list(cfg.dataset), tokenizer, **kwargs)
    lines = [report.summary()]
    val: list[Example] = []
    if cfg.val_dataset:
        val, vreport = load_examples(list(cfg.val_dataset), tokenizer, **kwargs)
        lines.append("val: " + vreport.summary())
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
    cfg: SFTConfig, train: list[Example], pad_id: int, start: int, rank: int = 0, world: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches from global index ``start`` on; rank r of w takes every w-th one."""
    per_epoch = micro_batches_per_epoch(len(train), cfg.batch_size)
    m = start * world + rank
    order_epoch, order = -1, []
    while True:
        epoch, i = divmod(m, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(len(train), cfg.seed, epoch)
        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        yield collate(cfg, [train[j] for j in idx], pad_id)
        m += world


def val_batches(cfg: SFTConfig, val: list[Example], pad_id: int) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(val, key=lambda e: len(e.input_ids))  # similar lengths: less padding
    return [
        collate(cfg, ordered[i : i + cfg.batch_size], pad_id)
        for i in range(0, len(ordered), cfg.batch_size)
    ]
