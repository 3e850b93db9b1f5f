"""The measured CPU fast paths, in one place.

Training: packed attention (attention.py), leaner autograd for RMSNorm, SiLU·mul and LoRA
linears (fused.py), shared LoRA dropout (dropout.py), malloc_trim after each step (memory.py).
Inference: oneDNN-packed bf16 weights (onednn.py) and 4-bit decode weights (int4.py).
Shared: the model-family table both sides consult (families.py), kernel-cache bucketing
(buckets.py) and the version guard every patch of library internals goes through (guard.py).
"""
