"""The model families the fast paths know: one table for training and for the engine.

Keyed by the HF ``config.model_type``, which is also the package of its modeling code
(``transformers.models.<model_type>.modeling_<model_type>``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    prefix: str  # class-name prefix in its modeling module: <prefix>RMSNorm, <prefix>MLP
    fused_blocks: bool  # RMSNorm and SiLU MLP exactly Llama's: fused.py's autograd applies
    runner: bool  # infer/runner.py's own forward computes exactly this model


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", fused_blocks=True, runner=True),
    "mistral": Family("Mistral", fused_blocks=True, runner=True),
    "qwen2": Family("Qwen2", fused_blocks=True, runner=True),  # q/k/v biases: the runner has them
    # Qwen3 RMS-normalises q and k per head (q_norm, k_norm) before RoPE; the runner's layer has
    # no such step yet, so it would compute another model. Its RMSNorm and MLP are Llama's.
    "qwen3": Family("Qwen3", fused_blocks=True, runner=False),
}


def modeling_module(model_type: str) -> str:
    """The module transformers defines ``model_type``'s classes in."""
    return f"transformers.models.{model_type}.modeling_{model_type}"


def runner_types() -> list[str]:
    """The model types the engine's runner supports."""
    return [t for t, f in FAMILIES.items() if f.runner]
