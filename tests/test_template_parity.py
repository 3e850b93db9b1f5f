"""Train-time and chat-time rendering are the same tokens (no template drift).

The bundled template inserts "You are a helpful AI assistant named SmolLM, trained by Hugging
Face" when a conversation has no system message; loraforge replaces that with its own default
(or --system) at training time, records it in the adapter dir, and the engine renders chat
prompts from that record.
"""

from __future__ import annotations

import json

import pytest

from loraforge.config import SFTConfig
from loraforge.data import load_examples
from loraforge.data.tokenize import DEFAULT_SYSTEM
from loraforge.infer.engine import Engine
from loraforge.train.recipe import run_sft


@pytest.mark.parametrize("system", [None, "You are Grace, a shop assistant."])
def test_chat_prompt_is_the_training_prefix(tmp_path, tiny_model_dir, tokenizer, system):
    data = tmp_path / "d.jsonl"
    rec = {"query": "Who are you?", "response": "I am Grace, made by MiaoTech."}
    data.write_text(json.dumps(rec) + "\n")
    cfg = SFTConfig(model=str(tiny_model_dir), dataset=[str(data)], output=tmp_path / "run",
                    max_steps=1, val_split=0.0, system=system)  # fmt: skip
    out = run_sft(cfg)

    used = system or DEFAULT_SYSTEM
    (example,), _ = load_examples([str(data)], tokenizer, system=used)
    first_label = next(i for i, x in enumerate(example.labels) if x != -100)
    engine = Engine.from_adapter(str(out), dtype="float32")
    try:
        prompt = engine.encode([{"role": "user", "content": "Who are you?"}], adapter="run")
    finally:
        engine.close()
    assert prompt == example.input_ids[:first_label]
    text = tokenizer.decode(prompt)
    assert used in text and "SmolLM" not in text
