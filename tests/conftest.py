"""Shared fixtures: a tiny randomly initialised Llama that uses the bundled model's tokenizer.

The tokenizer is real (SmolLM2's, with its chat template), so label masks, EOS handling and
templates are tested on what users get; the weights are tiny so each test runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from loraforge.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    from loraforge.models import load_tokenizer

    return load_tokenizer(bundled_dir)


def make_tiny_model(out: Path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
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
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama (2 layers, hidden 64) saved as an HF dir with the bundled tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
