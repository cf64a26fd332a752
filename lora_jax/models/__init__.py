"""Plain Flax (linen) models to fine-tune. They know nothing about LoRA."""
