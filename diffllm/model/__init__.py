"""Model side: loading a causal LM, switching its attention, the [MASK] token and LoRA."""
