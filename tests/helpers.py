"""Test helpers shared by several test files (import as ``from helpers import make_adapter``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path


def make_tiny_model(out: Path, tokenizer, seed: int = 0, model_type: str = "llama") -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved as an HF dir with ``tokenizer``; another
    ``model_type`` (olmo2, phi3, gemma2, ...) gives that architecture at the same size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        head_dim=16,  # hidden / heads; gemma2's default (256) would not fit hidden 64
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    system: str | None = "Be brief.",
    *,
    base_spec: str | None = None,
    r: int = 8,
    targets: str | list[str] = "all-linear",
    **lora_kw,
) -> Path:
    """A random, non-zero LoRA adapter on ``base_dir`` saved as a loraforge adapter dir.

    ``init_lora_weights=False`` makes B non-zero, and B is scaled up so that the adapter really
    changes the tiny model's greedy output (otherwise adapter mix-ups would go unnoticed).
    ``base_spec``: the base recorded in loraforge.json, if not ``base_dir``; ``lora_kw`` go to
    PEFT's LoraConfig (``use_rslora``, ``alpha_pattern``, ...).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.adapters import AdapterMeta, write_meta

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **lora_kw
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    meta = AdapterMeta(
        base_model=str(base_spec or base_dir), chat_template=tokenizer.chat_template, system=system
    )
    write_meta(out_dir, meta)
    return out_dir


def write_item_conversations(path: Path, n: int = 48) -> Path:
    """``n`` one-turn "what is item k?" conversations of varied lengths, as a messages JSONL."""
    import json

    with path.open("w") as f:
        for k in range(n):
            user = {"role": "user", "content": f"what is item {k}?"}
            bot = {"role": "assistant", "content": f"item {k} is " + "very " * (k % 6) + "nice"}
            f.write(json.dumps({"messages": [user, bot]}) + "\n")
    return path


def qa_examples(tokenizer, n: int) -> list:
    """``n`` tokenised one-turn conversations of varied lengths (assistant tokens labelled)."""
    from loraforge.data.tokenize import encode_conversation

    def conv(k: int) -> list[dict]:
        answer = f"item {k} is " + "very " * (k % 5) + "nice"
        return [{"role": "user", "content": f"what is item {k}?"},
                {"role": "assistant", "content": answer}]  # fmt: skip

    return [encode_conversation(tokenizer, conv(k)) for k in range(n)]


def assert_bf16_agrees(
    ref_logits, got_logits, *, margin: float, atol: float, what: str = "", decode=None
) -> int:
    """Two bf16 implementations agree along a reference greedy sequence, as far as bf16 allows.

    ``ref_logits`` / ``got_logits`` [T, V]: the next-token logits of each side at every position
    of the reference's greedy sequence, both fed the reference's tokens (teacher-forced), so one
    early near-tie cannot derail the rest of the comparison. Exact token equality is not a
    property of bf16: the rounding depends on the kernels the CPU gets (AMX, AVX-512 BF16, ...).
    So, at every position: max |logit diff| <= ``atol``, and where the reference's top-1 logit
    beats its top-2 by more than ``margin``, both sides pick the same top-1 token. Returns how
    many positions had their top-1 token checked; ``decode`` (token id -> text) makes failure
    messages readable.
    """
    ref, got = ref_logits.float(), got_logits.float()
    assert ref.shape == got.shape, f"{what}logits of shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    top2 = ref.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    want, have = ref.argmax(-1).tolist(), got.argmax(-1).tolist()
    diffs = (got - ref).abs().amax(-1).tolist()

    def name(tok: int) -> str:
        return f"{tok} {decode(tok)!r}" if decode else str(tok)

    checked = 0
    for t, (m, d, w, h) in enumerate(zip(margins, diffs, want, have, strict=True)):
        where = (
            f"{what}position {t}: reference token {name(w)}, got {name(h)}; "
            f"reference top-2 margin {m:.4g}, max |logit diff| {d:.4g}"
        )
        if m > margin:
            checked += 1
            assert h == w, f"{where}: top-1 differs although the margin is > {margin}"
        assert d <= atol, f"{where}: logits differ by more than atol={atol}"
    return checked


def start_server(app) -> tuple[str, object, threading.Thread]:
    """``app`` served by uvicorn on a free 127.0.0.1 port in a daemon thread of this process:
    (base URL, the uvicorn.Server (set ``should_exit`` to stop it), the thread)."""
    import uvicorn

    from loraforge.bench.served import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    return f"http://127.0.0.1:{port}", server, thread


def hf_reference(model, ids: list[int], n: int, eos: int = 2) -> tuple[list[int], object]:
    """HF's greedy tokens for ``ids`` (up to and including EOS) and the logits [T, V] (float32)
    each was chosen from: the reference the engine's parity tests compare against."""
    import torch

    out = model.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=eos,
        output_logits=True,
        return_dict_in_generate=True,
    )
    toks = out.sequences[0, len(ids) :].tolist()
    t = toks.index(eos) + 1 if eos in toks else len(toks)
    return toks[:t], torch.stack(out.logits)[:t, 0].float()
