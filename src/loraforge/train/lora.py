"""Load the base model for training and put LoRA on it through PEFT.

On the fast path the frozen base is held in bf16 (when the device has bf16): under autocast a
frozen fp32 weight would be cast to bf16 again in every forward and backward, and bf16 halves
its memory. LoRA weights (and so the optimizer state) stay fp32.
"""

from __future__ import annotations

import warnings

import torch

from loraforge.config import SFTConfig
from loraforge.errors import UserError


class LoraSetupError(UserError):
    """LoRA settings that do not fit the model (e.g. target modules it does not have)."""


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def lora_config(cfg: SFTConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_lora_model(cfg: SFTConfig, device: torch.device, bf16_base: bool):
    """The PEFT model in train mode: frozen base (bf16 if ``bf16_base``, which also means the
    caller runs it under bf16 autocast), fp32 LoRA weights."""
    from peft import get_peft_model

    from loraforge.models import load_model

    model = load_model(cfg.model, dtype="bfloat16" if bf16_base else "float32", device=str(device))
    model.config.use_cache = False
    if cfg.fast:  # packed rows: attention sample by sample (see cpu/attention.py)
        from loraforge.cpu.attention import use_packed_attention

        use_packed_attention(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        with warnings.catch_warnings():
            # PEFT asks the model `is_gradient_checkpointing`, which transformers 5 deprecates
            # with a FutureWarning on every load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=True)
    except ValueError as e:
        raise LoraSetupError(
            f"--target-modules {cfg.target_modules}: {str(e).splitlines()[0]}"
        ) from e
    if cfg.fast:
        from loraforge.cpu.dropout import share_lora_dropout
        from loraforge.cpu.fused import use_fused_blocks, use_fused_lora

        share_lora_dropout(peft_model)
        use_fused_blocks(peft_model)
        use_fused_lora(peft_model)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if bf16_base:  # runs under autocast, which makes PEFT's input casts wasted copies
        from loraforge.cpu.fused import skip_input_casts

        skip_input_casts(peft_model)
    peft_model.train()
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT counts them (``get_nb_trainable_parameters``)."""
    return model.get_nb_trainable_parameters()
