"""transformers' configs of the Llama architecture's families, in and out: Llama,
Mistral, Qwen 2 / 2.5 and Qwen 3 (`config.json` <-> `LlamaConfig`).

Their weights need nothing of their own: module names are translated for
every family in `lora_jax.hf.checkpoints`. Anything in a config the model
cannot honour is an error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.models.llama import LlamaConfig

# transformers' class of each family (`model_type`) of the architecture.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# --- config.json -----------------------------------------------------------

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def llama_config(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
  """A `LlamaConfig` from transformers' `config.json` contents.

  Args:
    hf: the parsed `config.json` of a `LlamaForCausalLM`, `MistralForCausalLM`,
      `Qwen2ForCausalLM` or `Qwen3ForCausalLM` (its `model_type` says which).
    **overrides: run options such as `scan_layers=True`, `dtype`, `remat`.

  Raises:
    ValueError: naming any setting the reference Llama does not implement.
  """
  kind = hf.get("model_type", "llama")
  if kind not in ARCHITECTURES:
    raise ValueError(f"config.json has model_type {kind!r} "
                     f"({', '.join(hf.get('architectures') or []) or 'no architectures'}); "
                     f"the Llama architecture loads {', '.join(ARCHITECTURES)}")
  for key in _REQUIRED:
    if isinstance(hf.get(key), bool) or not isinstance(hf.get(key), int) or hf[key] < 1:
      raise ValueError(f"config.json: {key}={hf.get(key)!r} (missing or not a positive integer)")
  # What transformers builds for this model_type when the key is absent.
  defaults = {"hidden_act": "silu", "mlp_bias": False, "attention_bias": False,
              "use_sliding_window": False}
  unsupported = {k: hf[k] for k in ("hidden_act", "mlp_bias")
                 if k in hf and hf[k] != defaults[k]}
  if kind == "qwen2" and hf.get("attention_bias", False):
    unsupported["attention_bias"] = hf["attention_bias"]  # Qwen 2's o_proj has none
  if unsupported:
    raise ValueError(f"config.json sets {unsupported}, which the reference Llama lacks")
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  if rope.get("rope_type", rope.get("type", "default")) == "default":
    rope = None
  window = hf.get("sliding_window")
  layer_types = hf.get("layer_types")
  if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
    window = None  # transformers' Qwen attends to the whole context whatever the other keys say
  if kind in ("llama", "mistral") or window is None:
    layer_types = None  # every layer of a Mistral slides; transformers' Llama never does
  elif layer_types is None:  # transformers' Qwen: the layers from max_window_layers on slide
    first = hf.get("max_window_layers", 28)
    layer_types = ["sliding_attention" if i >= first else "full_attention"
                   for i in range(hf["num_hidden_layers"])]
  fields = dict(
      model_type=kind, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=theta, rope_scaling=rope,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      attention_bias=kind in ("llama", "qwen3") and bool(hf.get("attention_bias", False)),
      qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
      sliding_window=None if kind == "llama" else window,
      layer_types=None if layer_types is None else tuple(layer_types))
  try:
    return LlamaConfig(**{**fields, **overrides})
  except ValueError as e:
    raise ValueError(f"config.json: {e}") from None


def llama_hf_config(config: LlamaConfig, dtype: Any) -> dict[str, Any]:
  """transformers' `config.json` for a `LlamaConfig`, weights stored in `dtype`."""
  c = config
  rope = None
  if c.rope_scaling is not None:
    s = c.rope_scaling
    rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
  out = {
      "architectures": [ARCHITECTURES[c.model_type]], "model_type": c.model_type,
      "hidden_act": "silu", "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": rope,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": jnp.dtype(dtype).name,
  }
  if c.model_type in ("llama", "qwen3"):
    out["attention_bias"] = c.attention_bias
  if c.model_type == "llama":
    out["mlp_bias"] = False
  if c.model_type == "mistral":
    out["sliding_window"] = c.sliding_window
  if c.model_type in ("qwen2", "qwen3"):
    windows = c.windows()
    out["use_sliding_window"] = windows is not None
    out["sliding_window"] = c.sliding_window
    out["max_window_layers"] = c.num_layers
    out["layer_types"] = ["full_attention" if not w else "sliding_attention"
                          for w in (windows or (0,) * c.num_layers)]
  return out


