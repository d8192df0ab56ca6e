"""Checkpoint formats: Hugging Face safetensors directories, GGUF, PEFT LoRA adapters."""
