"""loraforge: LoRA fine-tuning and serving of chat LLMs, pleasant on a CPU, scaling out on GPUs."""

__version__ = "0.1.0"
