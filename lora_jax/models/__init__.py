"""Plain Flax (linen) models to fine-tune. They know nothing about LoRA.

Each architecture is a module with its config, model and presets: `llama`
(Llama, Mistral, Qwen 2 / 2.5, Qwen 3) and `gemma` (Gemma 2, Gemma 3), both
built from `blocks`; `generation.generate` serves all of them. A config's
`model_type` names its family as transformers does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from lora_jax.models import gemma, llama

# architecture -> its module (PRESETS, config_for), and its config and model classes
ARCHITECTURES = {"llama": llama, "gemma": gemma}
CLASSES = {"llama": (llama.LlamaConfig, llama.Llama), "gemma": (gemma.GemmaConfig, gemma.Gemma)}
FAMILY_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen 2", "qwen3": "Qwen 3",
                "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
PRESETS = {name: c for module in ARCHITECTURES.values() for name, c in module.PRESETS.items()}


def architecture_of(config: Any) -> str:
  """'llama' or 'gemma': the architecture a config belongs to."""
  for name, (config_class, _) in CLASSES.items():
    if isinstance(config, config_class):
      return name
  raise TypeError(f"{type(config).__name__} is no model config of lora_jax.models")


def model_for(config: Any) -> nn.Module:
  """The plain model of a config of any architecture."""
  return CLASSES[architecture_of(config)][1](config)


def config_for(name: str, **overrides: Any) -> Any:
  """A preset of any architecture (`PRESETS`), fields replaced, e.g. `scan_layers=True`."""
  for module in ARCHITECTURES.values():
    if name in module.PRESETS:
      return module.config_for(name, **overrides)
  raise KeyError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")


def family_name(config: Any) -> str:
  """The family's name for people: 'Llama', 'Qwen 3', 'Gemma 2', ..."""
  return FAMILY_NAMES[config.model_type]
