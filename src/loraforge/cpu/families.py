"""The model families the fast paths know: one table for training and for the engine.

Keyed by the HF ``config.model_type``, which is also the package of its modeling code
(``transformers.models.<model_type>.modeling_<model_type>``) unless ``package`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """How a family's decoder layer differs from Llama's, for infer/runner.py. What the config
    states (sliding windows and layer_types, softcapping, query_pre_attn_scalar, partial rotary,
    the activation) is read from the config; this is what only the modeling code says."""

    unit_offset_norm: bool = False  # Gemma's RMSNorm: x * (1 + w), the product in fp32
    scaled_embed: bool = False  # embeddings times the embedding module's embed_scale
    sandwich_norms: bool = False  # norms after attention and around the MLP: 4 per layer
    qk_norm: bool = False  # RMSNorm per head on q and k before RoPE (q_norm, k_norm)
    rope_per_layer_type: bool = False  # one RoPE base per layer type (Gemma 3: local, global)
    fused_projections: bool = False  # the checkpoint's own qkv_proj and gate_up_proj (Phi-3)


GEMMA = {"unit_offset_norm": True, "scaled_embed": True, "sandwich_norms": True}


@dataclass(frozen=True)
class Family:
    prefix: str  # class-name prefix in its modeling module: <prefix>RMSNorm, <prefix>MLP
    fused_blocks: bool  # RMSNorm and SiLU MLP exactly Llama's: fused.py's autograd applies
    runner: bool  # infer/runner.py's own forward computes exactly this model
    block: Block = Block()  # what the runner's layer does differently from Llama's
    package: str | None = None  # transformers.models.<package>, when not the model_type


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", fused_blocks=True, runner=True),
    "mistral": Family("Mistral", fused_blocks=True, runner=True),
    "qwen2": Family("Qwen2", fused_blocks=True, runner=True),  # q/k/v biases: the runner has them
    # Qwen3 RMS-normalises q and k per head before RoPE; its RMSNorm and MLP are Llama's
    "qwen3": Family("Qwen3", fused_blocks=True, runner=True, block=Block(qk_norm=True)),
    # Gemma's norm is x * (1 + w) and its MLP GELU-tanh: not Llama's blocks, so not fused
    "gemma2": Family("Gemma2", fused_blocks=False, runner=True, block=Block(**GEMMA)),
    "gemma3_text": Family(
        "Gemma3",
        fused_blocks=False,
        runner=True,
        block=Block(**GEMMA, qk_norm=True, rope_per_layer_type=True),
        package="gemma3",
    ),
    # Phi-3's MLP is one gate_up_proj (not Llama's gate/up modules); its RMSNorm is Llama's
    "phi3": Family("Phi3", fused_blocks=False, runner=True, block=Block(fused_projections=True)),
}


def modeling_module(model_type: str) -> str:
    """The module transformers defines ``model_type``'s classes in."""
    family = FAMILIES.get(model_type)
    package = (family.package if family else None) or model_type
    return f"transformers.models.{package}.modeling_{package}"


def runner_types() -> list[str]:
    """The model types the engine's runner supports."""
    return [t for t, f in FAMILIES.items() if f.runner]


def engine_path(model_type: str) -> str:
    """Which forward the engine runs for ``model_type``: "fast runner" (infer/runner.py) or
    "generic" (infer/generic.py, transformers' own forward: any causal LM, slower)."""
    family = FAMILIES.get(model_type)
    return "fast runner" if family is not None and family.runner else "generic"
