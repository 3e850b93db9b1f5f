"""The fast loss (packed, labelled positions only, fused lm_head + CE) equals the plain one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from loraforge.config import SFTConfig
from loraforge.data.collate import pack_batch, pad_batch
from loraforge.data.tokenize import IGNORE_INDEX, encode_conversation
from loraforge.train.loss import SFTLoss, sparse_lm_loss, token_ce


def _full_loss(hidden, labels, lm_head):
    """token_ce's mean over the full logits: what the sparse loss must equal."""
    total, count = token_ce(lm_head(hidden), labels)
    return total / count


@pytest.mark.parametrize("trainable_head", [False, True])
def test_sparse_loss_and_grads_match_full(trainable_head):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(trainable_head)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[:, :3] = IGNORE_INDEX  # sparse labels, like a prompt
    labels[1, 6] = IGNORE_INDEX
    want = _full_loss(hidden, labels, head)
    (g_want,) = torch.autograd.grad(want, hidden)
    got = sparse_lm_loss(hidden, labels, head, chunk=3)  # several chunks
    (g_got,) = torch.autograd.grad(got, hidden)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_no_labels_gives_zero_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = sparse_lm_loss(hidden, torch.full((1, 4), IGNORE_INDEX), nn.Linear(8, 5, bias=False))
    loss.backward()
    assert loss.item() == 0.0


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from loraforge.models import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def test_fast_packed_loss_equals_plain_padded(lora_model, tokenizer):
    convs = [
        [{"role": "user", "content": "hi " * k}, {"role": "assistant", "content": "yo " * k}]
        for k in (1, 4, 2)
    ]
    exs = [encode_conversation(tokenizer, c) for c in convs]
    pad = tokenizer.pad_token_id
    fast, plain = SFTLoss(lora_model, fast=True), SFTLoss(lora_model, fast=False)
    packed = {k: v for k, v in pack_batch(exs, pad).items() if k != "num_tokens"}
    padded = {k: v for k, v in pad_batch(exs, pad).items() if k != "num_tokens"}
    lf, lp = fast(**packed), plain(**padded)
    assert torch.allclose(lf, lp, atol=1e-5)
    lora = [p for p in lora_model.parameters() if p.requires_grad]
    gf = torch.autograd.grad(lf, lora)
    gp = torch.autograd.grad(lp, lora)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gf, gp, strict=True))


def test_first_steps_fast_matches_plain(tiny_model_dir, tokenizer, tmp_path):
    """Same seed, same data: the bf16 fast path tracks the fp32 plain path step by step."""
    from loraforge.train.recipe import run_sft

    exs = [
        encode_conversation(
            tokenizer,
            [
                {"role": "user", "content": f"who is number {k}?"},
                {"role": "assistant", "content": f"number {k} is " + "great " * (k % 3 + 1)},
            ],
        )
        for k in range(16)
    ]
    losses = {}
    for fast in (True, False):
        cfg = SFTConfig(
            model=str(tiny_model_dir),
            output=tmp_path / f"fast-{fast}",
            fast=fast,
            max_steps=4,
            logging_steps=1,
            lora_dropout=0.0,  # dropout masks depend on the (packed vs padded) shapes
            learning_rate=1e-2,  # big steps, so the curve moves
            warmup_ratio=0.0,
        )
        run_sft(cfg, train=exs)
        rows = [json.loads(x) for x in (cfg.output / "metrics.jsonl").read_text().splitlines()]
        losses[fast] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses[True]) == len(losses[False]) == 4
    assert losses[False][-1] < losses[False][0] - 0.01  # it does learn
    for a, b in zip(losses[True], losses[False], strict=True):
        assert a == pytest.approx(b, rel=2e-2)


def test_packed_attention_equals_separate_forwards(tiny_model_dir, tokenizer):
    """Sample-by-sample attention on packed rows (several rows, with padding) is exact."""
    from loraforge.cpu.attention import use_packed_attention
    from loraforge.models import load_model

    exs = [
        encode_conversation(tokenizer, [{"role": "user", "content": "x " * k}]
                            + [{"role": "assistant", "content": "y " * (2 * k)}])
        for k in (1, 6, 3, 2)
    ]  # fmt: skip
    model = load_model(tiny_model_dir)
    use_packed_attention(model)
    b = pack_batch(exs, tokenizer.pad_token_id, pack_length=max(len(e.input_ids) for e in exs))
    assert b["input_ids"].shape[0] > 1  # several rows, some padded
    with torch.no_grad():
        packed = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
        ).logits
    seen = 0
    for r in range(packed.shape[0]):
        pos = 0
        while pos < packed.shape[1] and b["position_ids"][r, pos] == 0:
            n = (
                next(
                    (i for i in range(pos + 1, packed.shape[1]) if b["position_ids"][r, i] == 0),
                    packed.shape[1],
                )
                - pos
            )
            ids = b["input_ids"][r, pos : pos + n]
            match = [e for e in exs if e.input_ids == ids.tolist()]
            if match:
                with torch.no_grad():
                    alone = model(input_ids=ids[None]).logits
                assert torch.allclose(packed[r, pos : pos + n], alone[0], atol=1e-4)
                seen += 1
            pos += n
    assert seen == len(exs)


def test_shared_dropout():
    from loraforge.cpu.dropout import SharedInputDropout, _Shared

    torch.manual_seed(0)
    shared = _Shared()
    q, k = SharedInputDropout(0.25, shared), SharedInputDropout(0.25, shared)
    x = torch.ones(200, 300)
    a, b = q(x), k(x)
    assert a is b  # same input tensor: one mask, as a fused qkv LoRA would have
    c = q(x.clone())
    assert not torch.equal(a, c)  # a new input: a new mask
    assert (a == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert a.mean().item() == pytest.approx(1.0, abs=0.02)  # unbiased
    q.eval()
    assert q(x) is x


def test_fast_model_setup(tiny_model_dir):
    """The fast path: bf16 frozen base, fp32 LoRA, shared dropout, packed attention."""
    from loraforge.cpu.dropout import SharedInputDropout
    from loraforge.train.lora import load_lora_model

    cfg = SFTConfig(model=str(tiny_model_dir))
    model = load_lora_model(cfg, torch.device("cpu"), bf16_base=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    drops = [m for m in model.modules() if isinstance(m, SharedInputDropout)]
    assert len(drops) == 7 * 2  # 7 linear layers x 2 decoder layers
    assert model.get_base_model().config._attn_implementation == "loraforge_packed"


@pytest.mark.parametrize(
    "options",
    [  # gradient checkpointing: test_train_recipe.py checks it gives the same numbers
        {"use_dora": True, "target_modules": r".*\.(q_proj|v_proj)"},
        {"fast": False, "grad_accum": 2, "lr_scheduler": "linear"},
    ],
)
def test_options_train(options, tiny_model_dir, tokenizer, tmp_path):
    from loraforge.train.recipe import run_sft

    exs = [
        encode_conversation(
            tokenizer,
            [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}],
        )
        for k in range(8)
    ]
    cfg = SFTConfig(model=str(tiny_model_dir), output=tmp_path / "o", max_steps=2, **options)
    out = run_sft(cfg, train=exs)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_dora"] == options.get("use_dora", False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # no NaN


def test_row_by_row_backward_equals_whole_batch(lora_model, tokenizer):
    """backward_pieces: rows (bucket-padded) weighted by their labelled tokens give the batch's
    loss and gradients."""
    from loraforge.train.data import BUCKET, backward_pieces

    convs = [
        [{"role": "user", "content": "hi " * k}, {"role": "assistant", "content": "yo " * k}]
        for k in (9, 2, 5, 7)
    ]
    exs = [encode_conversation(tokenizer, c) for c in convs]
    pad = tokenizer.pad_token_id
    width = max(len(e.input_ids) for e in exs) + 4
    batch = {k: v for k, v in pack_batch(exs, pad, width).items() if k != "num_tokens"}
    assert batch["input_ids"].shape[0] > 1
    fast = SFTLoss(lora_model, fast=True)
    lora = [p for p in lora_model.parameters() if p.requires_grad]
    whole = fast(**{k: v for k, v in batch.items() if k != "row_lengths"})
    g_whole = torch.autograd.grad(whole, lora)
    pieces = backward_pieces(batch, pad)
    assert len(pieces) == batch["input_ids"].shape[0]
    assert abs(sum(share for _, share in pieces) - 1.0) < 1e-9
    assert all(p["input_ids"].shape[1] % BUCKET == 0 for p, _ in pieces)
    total = sum(fast(**p) * share for p, share in pieces)
    g_rows = torch.autograd.grad(total, lora)
    assert torch.allclose(total, whole, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_rows, g_whole, strict=True))


def test_fast_loss_applies_gemma2_final_softcapping(tokenizer, tmp_path):
    """Gemma 2 computes logits as cap * tanh(x / cap); the fast sparse loss must too (it took
    the raw lm_head output before, so gemma2 trained on other logits than it serves)."""
    from helpers import make_tiny_model
    from peft import LoraConfig, get_peft_model

    from loraforge.models import load_model

    model = load_model(make_tiny_model(tmp_path / "g2", tokenizer, model_type="gemma2"))
    model.config.final_logit_softcapping = 0.5  # small: tiny random logits are near 0
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(model, cfg).eval()
    convs = [
        [{"role": "user", "content": "hi " * k}, {"role": "assistant", "content": "yo " * k}]
        for k in (1, 3)
    ]
    batch = pad_batch([encode_conversation(tokenizer, c) for c in convs], tokenizer.pad_token_id)
    batch = {k: v for k, v in batch.items() if k != "num_tokens"}
    fast, plain = SFTLoss(peft, fast=True)(**batch), SFTLoss(peft, fast=False)(**batch)
    assert torch.allclose(fast, plain, atol=1e-5), (fast, plain)
    lora = [p for p in peft.parameters() if p.requires_grad]
    gf, gp = torch.autograd.grad(fast, lora), torch.autograd.grad(plain, lora)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gf, gp, strict=True))
