"""Lean model definitions that load Hugging Face safetensors checkpoints."""
