"""Shared fixtures: a tiny randomly initialised Llama that uses the bundled model's tokenizer.

The tokenizer is real (SmolLM2's, with its chat template), so label masks, EOS handling and
templates are tested on what users get; the weights are tiny so each test runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_tiny_model


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from loraforge.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    from loraforge.models import load_tokenizer

    return load_tokenizer(bundled_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama (2 layers, hidden 64) saved as an HF dir with the bundled tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
