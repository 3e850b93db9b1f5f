"""Load the base model for training and put LoRA on it through PEFT.

On the fast path the frozen base is held in bf16 (when the device has bf16): under autocast a
frozen fp32 weight would be cast to bf16 again in every forward and backward, and bf16 halves
its memory. LoRA weights (and so the optimizer state) stay fp32.

QLoRA (``--quantization``): the base's linear layers are loaded in bitsandbytes' 4 or 8 bits,
everything else as above. PEFT's ``prepare_model_for_kbit_training`` is not called: it casts
the embeddings, norms and lm_head back to fp32 (made for fp16, where bf16 autocast needs none of
it; under autocast those fp32 weights are cast to bf16 again each step) and turns on gradient
checkpointing, which here is ``--gradient-checkpointing``'s call. Measured on the bundled model
(nf4, batch 4, 4 steps, 1 thread): peak RSS 1669 / 1679 MB without it, 2376 / 2470 MB with it
(checkpointing off), same loss to 1%; speed within the noise of a shared CPU (26 vs 40, then
106 vs 98 tokens/s).
"""

from __future__ import annotations

import warnings

import torch

from loraforge.config import SFTConfig
from loraforge.console import console
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


def mixed_precision(device: torch.device, fast: bool) -> str:
    """accelerate's ``mixed_precision`` for the fast path on ``device``: "bf16" where it has
    bf16; "fp16" on a CUDA GPU without it (pre-Ampere), where accelerate adds the GradScaler
    that fp16's narrow range needs (the base then stays fp32: no bf16_base); else "no"."""
    if not fast:
        return "no"
    if bf16_supported(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"


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
    caller runs it under bf16 autocast; quantized if ``cfg.quantization``), fp32 LoRA weights."""
    from peft import get_peft_model

    from loraforge.models import load_model, load_quantized_model

    dtype = "bfloat16" if bf16_base else "float32"
    if cfg.quantization:
        model = load_quantized_model(cfg.model, cfg.quantization, dtype, str(device))
    else:
        model = load_model(cfg.model, dtype=dtype, device=str(device))
    model.config.use_cache = False
    if model.config._attn_implementation == "eager":  # no SDPA for it (models.attention_for)
        # Packed SDPA would drop what eager computes (gemma2's score soft-capping), and eager
        # ADDS the mask to the scores: the packed rows' bool mask must become 0 / -inf first
        # (a tiny gemma2: logits off by 0.78 with the bool mask, 4e-7 with the additive one).
        model.get_decoder().register_forward_pre_hook(_additive_mask, with_kwargs=True)
    elif cfg.fast:  # packed rows: attention sample by sample (see cpu/attention.py)
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
        if cfg.quantization:  # its forward is PEFT's Linear's; bitsandbytes layers have their own
            console.print(
                f"[dim]{cfg.quantization} base: fused LoRA linear not used (bitsandbytes layers "
                "keep PEFT's forward)[/dim]"
            )
        else:
            use_fused_lora(peft_model)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if bf16_base:  # runs under autocast, which makes PEFT's input casts wasted copies
        from loraforge.cpu.fused import skip_input_casts

        skip_input_casts(peft_model)
    peft_model.train()
    return peft_model


def _additive_mask(module, args, kwargs):
    """Forward pre-hook: a 4D bool attention mask (packed rows) as the additive float mask
    eager attention expects; any other mask passes unchanged."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return None
    dtype = module.get_input_embeddings().weight.dtype
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return args, {**kwargs, "attention_mask": additive.masked_fill(~mask, torch.finfo(dtype).min)}


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT counts them (``get_nb_trainable_parameters``)."""
    return model.get_nb_trainable_parameters()
