"""Packing: samples stay apart (mask + position ids), labels stay right, logits match."""

from __future__ import annotations

import pytest
import torch

from loraforge.data.collate import (
    block_causal_mask,
    epoch_order,
    pack_batch,
    pack_rows,
    pad_batch,
)
from loraforge.data.tokenize import IGNORE_INDEX, Example, encode_conversation


def _conv(k: int) -> list[dict]:
    return [
        {"role": "user", "content": "question " * (k % 4 + 1) + str(k)},
        {"role": "assistant", "content": "answer " * (k % 5 + 1) + str(k)},
    ]


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    return [encode_conversation(tokenizer, _conv(k)) for k in range(5)]


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 4], capacity=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 4][i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3  # 22 tokens need at least 3 rows of 10
    assert pack_rows([12, 3], capacity=10) == [[0], [1]]  # too long: a row of its own


def test_block_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seg)[0, 0]
    assert m.shape == (6, 6) and m.dtype == torch.bool
    assert m.diagonal().all()  # no fully masked row: SDPA would give NaN there
    assert not m[2:5, 0:2].any()  # sample 1 never sees sample 0
    assert not m[5, :5].any()  # padding sees only itself
    assert m[4, 2:5].all() and not m[2, 3:].any()  # causal within a sample


def test_pack_batch_boundaries(examples, tokenizer):
    b = pack_batch(examples, tokenizer.pad_token_id, pack_length=4096)
    assert b["input_ids"].shape[0] == 1
    lengths = [len(e.input_ids) for e in examples]
    assert b["input_ids"].shape[1] == sum(lengths)
    assert int(b["num_tokens"]) == sum(lengths)
    pos = 0
    for e in examples:  # a single row keeps the original order
        n = len(e.input_ids)
        assert b["input_ids"][0, pos : pos + n].tolist() == e.input_ids
        assert b["position_ids"][0, pos : pos + n].tolist() == list(range(n))
        # the first token of a sample is never a target; the rest keep their labels
        assert b["labels"][0, pos].item() == IGNORE_INDEX
        assert b["labels"][0, pos + 1 : pos + n].tolist() == e.labels[1:]
        mask = b["attention_mask"][0, 0]
        assert not mask[pos : pos + n, :pos].any() and not mask[pos : pos + n, pos + n :].any()
        assert mask[pos : pos + n, pos : pos + n].equal(torch.ones(n, n, dtype=torch.bool).tril())
        pos += n
    # EOS (== pad here) inside a sample stays a label: labels never come from "token == pad"
    eos = tokenizer.eos_token_id
    assert (b["labels"] == eos).sum() == sum(e.labels.count(eos) for e in examples) > 0


def test_pack_batch_splits_rows_and_pads(examples, tokenizer):
    longest = max(len(e.input_ids) for e in examples)
    b = pack_batch(examples, tokenizer.pad_token_id, pack_length=longest)
    rows, width = b["input_ids"].shape
    assert rows > 1 and width <= longest
    real = (b["attention_mask"][:, 0].diagonal(dim1=1, dim2=2)).sum()
    assert real == rows * width  # every position attends at least to itself
    assert int(b["num_tokens"]) == sum(len(e.input_ids) for e in examples)
    expected = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples)
    assert (b["labels"] != IGNORE_INDEX).sum() == expected


def test_packed_logits_equal_separate_forwards(examples, tokenizer, tiny_model_dir):
    from loraforge.models import load_model

    model = load_model(tiny_model_dir)
    b = pack_batch(examples[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
        ).logits
        pos = 0
        for e in examples[:3]:
            n = len(e.input_ids)
            alone = model(input_ids=torch.tensor([e.input_ids])).logits
            assert torch.allclose(packed[0, pos : pos + n], alone[0], atol=1e-4)
            pos += n
        # and the restarted position ids alone are not enough (the reason for the 4D mask)
        leaky = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        n0 = len(examples[0].input_ids)
        assert not torch.allclose(leaky[0, n0:], packed[0, n0:], atol=1e-4)


def test_pad_batch(examples, tokenizer):
    b = pad_batch(examples[:2], tokenizer.pad_token_id)
    n0, n1 = (len(e.input_ids) for e in examples[:2])
    assert b["input_ids"].shape == (2, max(n0, n1))
    assert b["attention_mask"].sum().item() == n0 + n1
    assert b["labels"][0, :n0].tolist() == examples[0].labels
    assert (b["labels"][0, n0:] == IGNORE_INDEX).all()


def test_epoch_order_is_seeded():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 3)) == list(range(10))
