"""Turn a list of tokenised examples into model inputs: packed (the fast path) or padded.

Packing concatenates examples into rows with no padding between them. Two things keep packed
samples apart, and both are needed: ``position_ids`` restart at 0 for every sample (RoPE sees
the same positions as an unpacked forward), and ``attention_mask`` is a 4D block-diagonal
causal mask (bool, B×1×T×T, True = attend). With SDPA, restarted position ids alone do NOT stop
a token attending to the previous sample; transformers passes a 4D mask through unchanged.

The first token of each sample gets label -100: nothing before it in its own sample predicts it,
so without this the last token of sample k would be trained to predict sample k+1's first token.
Labels never come from "token == pad" (pad == EOS in the bundled model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraforge.data.tokenize import IGNORE_INDEX, Example


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of ``range(n)`` that depends only on (seed, epoch): resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: group example indices into rows of at most ``capacity`` tokens
    (an example longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) sample ids -> (B, 1, T, T) bool mask: attend to earlier tokens of the same sample.
    The diagonal is always True, so no row is fully masked (SDPA would return NaN there)."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


def pack_batch(
    examples: Sequence[Example], pad_id: int, pack_length: int = 2048
) -> dict[str, torch.Tensor]:
    """Pack ``examples`` into as few rows as fit in ``pack_length`` tokens, right-padding the
    rows to the longest. Returns input_ids, labels, position_ids, attention_mask (4D bool),
    num_tokens (real tokens, padding excluded) and row_lengths (real tokens per row)."""
    rows = pack_rows([len(e.input_ids) for e in examples], pack_length)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)  # padding: one segment of its own
    for r, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(sorted(row)):  # sorted: a stable order inside the row
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[r, pos : pos + n] = torch.tensor(ex.input_ids)
            labels[r, pos : pos + n] = torch.tensor(ex.labels)
            labels[r, pos] = IGNORE_INDEX
            position_ids[r, pos : pos + n] = torch.arange(n)
            segment_ids[r, pos : pos + n] = k
            pos += n
        position_ids[r, pos:] = torch.arange(width - pos)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": block_causal_mask(segment_ids),
        "num_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
        "row_lengths": torch.tensor([sum(len(examples[i].input_ids) for i in row) for row in rows]),
    }


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The plain path: one row per example, right-padded, with a 2D padding mask."""
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[r, :n] = torch.tensor(ex.input_ids)
        labels[r, :n] = torch.tensor(ex.labels)
        attention_mask[r, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "num_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
    }
