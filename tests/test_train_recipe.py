"""The `sft` recipe's parts: the sharded batch stream, the LR schedule as the recipe builds it,
gradient checkpointing (same numbers, less memory) and the one token-weighted cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import qa_examples

from loraforge.config import SFTConfig
from loraforge.data.tokenize import IGNORE_INDEX, Example
from loraforge.train.data import micro_batches_per_epoch, train_batches
from loraforge.train.loss import TokenMean, labelled_tokens, sparse_lm_loss, token_ce
from loraforge.train.recipe import SFTRecipe, Throughput

PAD = 0


def _numbered(n: int) -> list[Example]:
    """Examples whose every token is 1000 + their index, so a batch names its examples."""
    return [
        Example(
            input_ids=[1000 + k] * (3 + k % 4), labels=[IGNORE_INDEX] + [1000 + k] * (2 + k % 4)
        )
        for k in range(n)
    ]


def _names(batch: dict) -> set[int]:
    return set(batch["input_ids"].flatten().tolist()) - {PAD}


def _take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fast", [True, False])
def test_two_ranks_see_the_single_process_stream(fast):
    cfg = SFTConfig(batch_size=3, seed=7, fast=fast)
    train = _numbered(22)
    per_epoch = micro_batches_per_epoch(len(train), cfg.batch_size)  # 8: the last batch has 1
    one = _take(train_batches(cfg, train, PAD, 0), 3 * per_epoch)  # three epochs
    r0 = _take(train_batches(cfg, train, PAD, 0, rank=0, world=2), 3 * per_epoch // 2)
    r1 = _take(train_batches(cfg, train, PAD, 0, rank=1, world=2), 3 * per_epoch // 2)
    # together, in order: rank 0 takes the even micro-batches, rank 1 the odd ones
    assert all(_same(a, b) for a, b in zip(one[0::2], r0, strict=True))
    assert all(_same(a, b) for a, b in zip(one[1::2], r1, strict=True))
    half = per_epoch // 2
    for epoch in range(3):  # within an epoch the ranks share no example and miss none
        seen0 = set().union(*map(_names, r0[epoch * half : (epoch + 1) * half]))
        seen1 = set().union(*map(_names, r1[epoch * half : (epoch + 1) * half]))
        assert not seen0 & seen1
        assert seen0 | seen1 == {1000 + k for k in range(len(train))}
    assert _names(one[0]) != _names(one[per_epoch])  # each epoch is reshuffled


def test_resume_continues_the_same_stream():
    cfg = SFTConfig(batch_size=4, seed=3)
    train = _numbered(18)
    full = _take(train_batches(cfg, train, PAD, 0), 12)
    again = _take(train_batches(cfg, train, PAD, 5), 7)  # `start`: micro-batches already done
    assert all(_same(a, b) for a, b in zip(full[5:], again, strict=True))
    for rank in (0, 1):  # per rank, ``start`` counts that rank's micro-batches
        whole = _take(train_batches(cfg, train, PAD, 0, rank, 2), 8)
        resumed = _take(train_batches(cfg, train, PAD, 3, rank, 2), 5)
        assert all(_same(a, b) for a, b in zip(whole[3:], resumed, strict=True))


def _expected_lr(kind: str, step: int, base: float, warmup: int, total: int) -> float:
    """Closed form: linear warmup from 0, then cosine / linear decay towards 0, or constant."""
    if step < warmup:
        return base * step / warmup
    if kind == "constant":
        return base
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("ratio", "warmup"), [(0.0, 0), (0.05, 2), (0.2, 6)])
def test_lr_schedule_as_the_recipe_builds_it(kind, ratio, warmup, tmp_path):
    base = 1e-3
    cfg = SFTConfig(lr_scheduler=kind, warmup_ratio=ratio, learning_rate=base, epochs=3,
                    grad_accum=2, output=tmp_path)  # fmt: skip
    recipe = SFTRecipe(cfg)
    recipe.setup_accelerator()
    recipe.model, recipe.per_epoch = torch.nn.Linear(2, 2), 20  # what setup_model/_data give
    recipe.setup_optim()
    total = recipe.total_steps
    assert total == 30  # 3 epochs x 20 micro-batches / accum 2
    lrs = []  # the lr each optimizer step uses (what metrics.jsonl logs as train_lr)
    for _ in range(total):
        lrs.append(recipe.scheduler.get_last_lr()[0])
        recipe.optimizer.step()
        recipe.scheduler.step()
    want = [_expected_lr(kind, s, base, warmup, total) for s in range(total)]
    assert lrs[0] == pytest.approx(0.0 if warmup else base, abs=1e-12)
    assert lrs[warmup] == pytest.approx(base, rel=1e-9)  # the end of warmup: the peak
    last = {"constant": base, "linear": base / (total - warmup)}.get(
        kind, base * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
    )
    assert lrs[-1] == pytest.approx(last, rel=1e-9)
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-15)


def _gc_run(model_dir, examples, fast: bool, checkpointing: bool):
    """Two recipe train_steps and one more batch's loss and LoRA gradients, from one seed."""
    cfg = SFTConfig(model=str(model_dir), fast=fast, gradient_checkpointing=checkpointing,
                    batch_size=4, learning_rate=1e-2, warmup_ratio=0.0)  # fmt: skip
    recipe = SFTRecipe(cfg)
    recipe.setup_accelerator()
    recipe.setup_data(examples)
    recipe.setup_model()
    recipe.setup_optim()
    recipe.resume()
    mlp = recipe.model.get_base_model().model.layers[0].mlp
    forwards = []
    hook = mlp.register_forward_pre_hook(lambda *_: forwards.append(1))
    steps = [recipe.train_step() for _ in range(2)]  # LoRA B leaves 0: A gets gradients too
    hook.remove()
    batch = {
        k: v for k, v in next(recipe.batches).items() if k not in ("num_tokens", "row_lengths")
    }
    with recipe.accelerator.autocast():
        loss = recipe.loss_model(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    return steps, float(loss.detach()), grads, len(forwards)


@pytest.mark.parametrize("fast", [True, False])
def test_gradient_checkpointing_gives_the_same_numbers(fast, tiny_model_dir, tokenizer):
    """Same seed, same data (LoRA dropout on): the same losses, gradient norms and LoRA
    gradients with and without checkpointing. Measured on CPU (torch 2.13): bit-identical, fast
    and plain (the recompute replays the RNG, so dropout draws the same masks); the bound leaves
    room for a kernel that is not deterministic."""
    exs = qa_examples(tokenizer, 12)
    plain_steps, plain_loss, plain_grads, plain_fwd = _gc_run(tiny_model_dir, exs, fast, False)
    ckpt_steps, ckpt_loss, ckpt_grads, ckpt_fwd = _gc_run(tiny_model_dir, exs, fast, True)
    assert ckpt_fwd == 2 * plain_fwd  # checkpointing is on: backward recomputes each layer
    for a, b in zip(plain_steps, ckpt_steps, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
    assert plain_loss == pytest.approx(ckpt_loss, rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in plain_grads.items())
    for name, g in plain_grads.items():
        assert torch.allclose(g, ckpt_grads[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("frozen_head", [True, False])
def test_sparse_loss_equals_token_ce_on_a_model_batch(frozen_head, tiny_model_dir, tokenizer):
    """The fast path's loss (labelled positions only, lm_head in chunks: fused when frozen) is
    the mean of token_ce on the full logits of the same batch."""
    from loraforge.data.collate import pad_batch
    from loraforge.models import load_model

    model = load_model(tiny_model_dir).eval()
    head = model.get_output_embeddings().requires_grad_(not frozen_head)
    batch = pad_batch(qa_examples(tokenizer, 5), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        total, count = token_ce(head(hidden), batch["labels"])
        sparse = sparse_lm_loss(hidden, batch["labels"], head, chunk=7)
    assert count == labelled_tokens(batch["labels"]) > 0
    assert float(sparse) == pytest.approx(float(total) / count, rel=1e-6)


def test_token_mean_weights_batches_by_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, 11)
    labels = torch.randint(0, 11, (4, 9))
    labels[0, :7] = IGNORE_INDEX  # batches with very different labelled counts
    labels[2:, :2] = IGNORE_INDEX
    whole_sum, whole_n = token_ce(logits, labels)
    by_sum, by_mean = TokenMean(), TokenMean()
    for rows in (slice(0, 1), slice(1, 4)):
        s, n = token_ce(logits[rows], labels[rows])
        by_sum.add(s, n)
        by_mean.add_mean(s / n, n)
    assert by_sum.count == by_mean.count == whole_n
    assert by_sum.mean == pytest.approx(float(whole_sum) / whole_n, rel=1e-6)
    assert by_mean.mean == pytest.approx(by_sum.mean, rel=1e-6)
    assert TokenMean().mean == 0.0


def test_throughput_window_and_run():
    from loraforge.train.recipe import StepFigures

    tp = Throughput()
    tp.add(StepFigures(loss=2.0, tokens=100, seconds=1.0, lr=1e-3, grad_norm=None))
    tp.add(StepFigures(loss=4.0, tokens=300, seconds=1.0, lr=1e-3, grad_norm=None))
    assert (tp.window_loss, tp.window_tokens_per_s) == (3.0, 200.0)
    tp.reset_window()
    tp.add(StepFigures(loss=1.0, tokens=50, seconds=0.5, lr=1e-3, grad_norm=None))
    assert (tp.window_loss, tp.window_tokens_per_s) == (1.0, 100.0)
    assert (tp.run_tokens, tp.run_seconds) == (450, 2.5)


def test_accelerator_reset_only_while_accelerate_has_it(monkeypatch, capsys):
    """The private reset is called when it exists; without it one warning line, no crash."""
    from accelerate.state import AcceleratorState

    from loraforge.cpu import guard
    from loraforge.train import distributed

    calls = []
    monkeypatch.setattr(AcceleratorState, "_reset_state", lambda: calls.append(1), raising=False)
    distributed.reset_accelerator_state()
    assert calls == [1]
    monkeypatch.delattr(AcceleratorState, "_reset_state")
    monkeypatch.setattr(guard, "_warned", set())
    distributed.reset_accelerator_state()
    distributed.reset_accelerator_state()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "_reset_state" in err
