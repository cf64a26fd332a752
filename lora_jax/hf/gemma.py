"""transformers' Gemma 2 and Gemma 3 (text) configs, in and out.

The weights need nothing of their own: Gemma's module names are the reference
Gemma's (`lora_jax.models.gemma`), translated as every family's are in
`lora_jax.hf.checkpoints`. Only `config.json` differs, and anything in it the
model cannot honour is an error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.models.gemma import MODEL_TYPES, GemmaConfig

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_ACTIVATION = "gelu_pytorch_tanh"
# What transformers' `Gemma2Config` and `Gemma3TextConfig` take for a key a `config.json`
# leaves out (hub configs of Gemma 3 with its vision encoder give few of them).
_COMMON = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6,
               tie_word_embeddings=True)
DEFAULTS = {
    "gemma2": dict(_COMMON, vocab_size=256000, rope_theta=10_000.0,
                   max_position_embeddings=8192, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(_COMMON, vocab_size=262208, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, max_position_embeddings=131072,
                        attn_logit_softcapping=None, final_logit_softcapping=None),
}


def gemma_config(hf: Mapping[str, Any], **overrides: Any) -> GemmaConfig:
  """A `GemmaConfig` from the `config.json` of a `Gemma2ForCausalLM` or `Gemma3ForCausalLM`.

  Args:
    hf: the parsed `config.json` (`model_type` 'gemma2' or 'gemma3_text').
    **overrides: run options such as `scan_layers=True`, `dtype`, `remat`.

  Raises:
    ValueError: naming any setting the reference Gemma does not implement.
  """
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ValueError(f"config.json has model_type {kind!r}; Gemma is one of {MODEL_TYPES} "
                     "(a multimodal 'gemma3' checkpoint's text model is 'gemma3_text')")
  gemma3 = kind == "gemma3_text"
  hf = {**DEFAULTS[kind], **hf}
  activation = hf.get("hidden_activation") or hf.get("hidden_act") or _ACTIVATION
  unsupported = {}
  if activation != _ACTIVATION:
    unsupported["hidden_activation"] = activation
  for key in ("attention_bias", "use_bidirectional_attention"):
    if hf.get(key):
      unsupported[key] = hf[key]
  rope = dict(hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear"):
    unsupported["rope_scaling"] = hf["rope_scaling"]
  if unsupported:
    raise ValueError(f"config.json sets {unsupported}, which the reference Gemma lacks")
  layers = hf["num_hidden_layers"]
  layer_types = hf.get("layer_types")
  if layer_types is None and isinstance(layers, int):  # transformers' default pattern
    every = hf.get("sliding_window_pattern", 6) if gemma3 else 2
    layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                   for i in range(layers)]
  fields = dict(
      model_type=kind, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=layers,
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],
      head_dim=hf["head_dim"], query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
      rms_norm_eps=hf["rms_norm_eps"], rope_theta=float(hf["rope_theta"]),
      rope_local_base_freq=float(hf["rope_local_base_freq"]) if gemma3 else None,
      rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
      sliding_window=hf["sliding_window"],
      layer_types=None if layer_types is None else tuple(layer_types),
      attn_logit_softcapping=hf["attn_logit_softcapping"],
      final_logit_softcapping=hf["final_logit_softcapping"], qk_norm=gemma3,
      max_position_embeddings=hf["max_position_embeddings"],
      tie_word_embeddings=hf["tie_word_embeddings"])
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "head_dim"):
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.json: {key}={value!r} (missing or not a positive integer)")
  try:
    return GemmaConfig(**{**fields, **overrides})
  except ValueError as e:
    raise ValueError(f"config.json: {e}") from None


def gemma_hf_config(config: GemmaConfig, dtype: Any) -> dict[str, Any]:
  """transformers' `config.json` for a `GemmaConfig`, weights stored in `dtype`."""
  c = config
  out = {
      "architectures": [ARCHITECTURES[c.model_type]], "model_type": c.model_type,
      "hidden_activation": _ACTIVATION, "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "query_pre_attn_scalar": c.query_pre_attn_scalar, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "sliding_window": c.sliding_window,
      "layer_types": list(c.layer_types) if c.layer_types else
      ["sliding_attention" if w else "full_attention"
       for w in (c.windows() or (0,) * c.num_layers)],
      "attn_logit_softcapping": c.attn_logit_softcapping,
      "final_logit_softcapping": c.final_logit_softcapping, "attention_bias": False,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": jnp.dtype(dtype).name,
  }
  if c.model_type == "gemma3_text":
    if not c.qk_norm:
      raise ValueError("transformers' Gemma 3 always normalizes q and k: it cannot hold a "
                       "gemma3_text model with qk_norm=False")
    out["rope_local_base_freq"] = c.rope_local_base_freq
    out["rope_scaling"] = (None if c.rope_scaling_factor == 1.0 else
                           {"rope_type": "linear", "factor": c.rope_scaling_factor})
  elif c.rope_local_base_freq is not None or c.rope_scaling_factor != 1.0 or c.qk_norm:
    raise ValueError("a gemma2 config has one rotary base, no rope scaling and no q/k norms: "
                     "transformers' Gemma2 cannot hold this model")
  return out
