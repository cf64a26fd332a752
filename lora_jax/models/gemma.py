"""Gemma 2 and Gemma 3 (text) in plain Flax linen.

A Gemma decoder layer normalizes before and after both its attention and its
MLP (four RMSNorms, each scaling by `1 + weight`), its MLP is GeGLU (GELU in
its tanh approximation), and its queries are scaled by
`query_pre_attn_scalar ** -0.5` rather than `head_dim ** -0.5`, with head_dim
decoupled from hidden / heads. The token embeddings are multiplied by
`sqrt(hidden_size)` and tied to the output head. Layers alternate local
sliding-window attention with global attention (`layer_types`: Gemma 2 every
other layer, Gemma 3 five local to one global).

Gemma 2 soft-caps the attention logits and the final logits
(`cap * tanh(x / cap)`). Gemma 3 drops the caps, normalizes each head of q and
k (RMSNorm, before the rotary embedding), and gives its local layers their own
rotary base (`rope_local_base_freq`) while its global layers use `rope_theta`
with a linear `rope_scaling_factor` (the 4B and larger sizes).

Module names are transformers' (`Gemma2ForCausalLM`, `Gemma3ForCausalLM`):

    embed_tokens/embedding                          (vocab, hidden)
    layers_{i}/input_layernorm/scale                (hidden,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel      as in `llama.py`
    layers_{i}/self_attn/{q,k}_norm/scale           (head_dim,), Gemma 3
    layers_{i}/post_attention_layernorm/scale       (hidden,)
    layers_{i}/pre_feedforward_layernorm/scale      (hidden,)
    layers_{i}/mlp/{gate,up,down}_proj/kernel       as in `llama.py`
    layers_{i}/post_feedforward_layernorm/scale     (hidden,)
    norm/scale                                      (hidden,)

>>> model = Gemma(config_for("gemma-tiny"))
>>> ids = jnp.zeros((2, 5), jnp.int32)
>>> model.apply(nn.unbox(model.init(jax.random.key(0), ids)), ids).shape
(2, 5, 256)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.blocks import (REMAT_POLICIES, Attention, GatedMLP, check_windows,
                                    embedding, inverse_frequencies, layer_windows, norm,
                                    output_logits, run_layers)

MODEL_TYPES = ("gemma2", "gemma3_text")  # transformers' names of the two


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Architecture (HF's `Gemma2Config` / `Gemma3TextConfig` names) and how to run it.

  `model_type` is 'gemma2' or 'gemma3_text'; the other fields say what the
  family does (see the module docstring). `rope_local_base_freq` None gives
  every layer `rope_theta` (Gemma 2). `dtype`, `param_dtype`, `scan_layers` and
  `remat` as `LlamaConfig`'s.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "gemma3_text"
  query_pre_attn_scalar: float = 256.0
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  rope_local_base_freq: float | None = 10_000.0
  rope_scaling_factor: float = 1.0
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  qk_norm: bool = True
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = True
  scan_layers: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    put = functools.partial(object.__setattr__, self)
    put("dtype", jnp.dtype(self.dtype))
    put("param_dtype", jnp.dtype(self.param_dtype))
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r}: Gemma is one of {MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError("num_heads must be a multiple of num_kv_heads.")
    if self.remat != "none" and self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}.")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
      cap = getattr(self, key)
      if cap is not None and not cap > 0:
        raise ValueError(f"{key}={cap!r}: must be positive or None")
    if not self.query_pre_attn_scalar > 0 or not self.rope_scaling_factor > 0:
      raise ValueError("query_pre_attn_scalar and rope_scaling_factor must be positive")
    put("layer_types", check_windows(self.sliding_window, self.layer_types, self.num_layers))

  def windows(self) -> tuple[int, ...] | None:
    """Each layer's attention window (0: global), or None when no layer has one."""
    return layer_windows(self.sliding_window, self.layer_types, self.num_layers)

  def frequencies(self) -> np.ndarray:
    """Each layer's rotary inverse frequencies, `(num_layers, head_dim // 2)`: local
    layers at `rope_local_base_freq`, global ones at `rope_theta` scaled linearly."""
    windows = self.windows() or (0,) * self.num_layers
    glob = inverse_frequencies(self.head_dim, self.rope_theta,
                               linear_factor=self.rope_scaling_factor)
    local = glob if self.rope_local_base_freq is None else inverse_frequencies(
        self.head_dim, self.rope_local_base_freq)
    return np.stack([local if w else glob for w in windows])


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU in its tanh approximation (HF's `gelu_pytorch_tanh`)."""
  return jax.nn.gelu(x, approximate=True)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def _gemma2(layers: int, window: int = 4096) -> dict:
  return dict(model_type="gemma2", rope_theta=10_000.0, rope_local_base_freq=None,
              sliding_window=window, qk_norm=False, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, max_position_embeddings=8192, num_layers=layers,
              layer_types=tuple("full_attention" if (i + 1) % 2 == 0 else "sliding_attention"
                                for i in range(layers)))


def _gemma3(layers: int, window: int = 1024, scaling: float = 8.0) -> dict:
  return dict(model_type="gemma3_text", sliding_window=window, num_layers=layers,
              rope_scaling_factor=scaling,
              layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(layers)))


PRESETS = {
    "gemma-tiny": GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_heads=4, num_kv_heads=2, head_dim=32,
                              query_pre_attn_scalar=32.0,
                              **_gemma3(2, window=4, scaling=1.0)),
    "gemma-2-2b": GemmaConfig(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                              num_heads=8, num_kv_heads=4, head_dim=256, **_gemma2(26)),
    "gemma-2-9b": GemmaConfig(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                              num_heads=16, num_kv_heads=8, head_dim=256, **_gemma2(42)),
    "gemma-2-27b": GemmaConfig(vocab_size=256000, hidden_size=4608, intermediate_size=36864,
                               num_heads=32, num_kv_heads=16, head_dim=128,
                               query_pre_attn_scalar=144.0, **_gemma2(46)),
    "gemma-3-1b": GemmaConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                              num_heads=4, num_kv_heads=1, head_dim=256,
                              max_position_embeddings=32768,
                              **_gemma3(26, window=512, scaling=1.0)),
    "gemma-3-4b": GemmaConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                              num_heads=8, num_kv_heads=4, head_dim=256, **_gemma3(34)),
    "gemma-3-12b": GemmaConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                               num_heads=16, num_kv_heads=8, head_dim=256, **_gemma3(48)),
    "gemma-3-27b": GemmaConfig(vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                               num_heads=32, num_kv_heads=16, head_dim=128,
                               query_pre_attn_scalar=168.0, **_gemma3(62)),
}


def config_for(name: str, **overrides: Any) -> GemmaConfig:
  """A preset of `PRESETS` with fields replaced, e.g. `scan_layers=True`."""
  if name not in PRESETS:
    raise KeyError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


class GemmaDecoderLayer(nn.Module):
  """Attention and GeGLU MLP, each between a pre- and a post-norm, each with a residual."""

  config: GemmaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, positions, inv_freq, window=None):
    c = self.config
    attn = Attention(c, self.decode, qk_norm=c.qk_norm, unit_offset=True,
                     scale=c.query_pre_attn_scalar ** -0.5, softcap=c.attn_logit_softcapping,
                     name="self_attn")
    h = attn(norm(c, "input_layernorm", True)(x), attention_mask, positions, inv_freq, window)
    x = x + norm(c, "post_attention_layernorm", True)(h)
    h = GatedMLP(c, gelu_tanh, name="mlp")(norm(c, "pre_feedforward_layernorm", True)(x))
    x = x + norm(c, "post_feedforward_layernorm", True)(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


class Gemma(nn.Module):
  """The decoder: token ids in, float32 logits (batch, seq, vocab) out; called as `Llama`."""

  config: GemmaConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, *, decode=False):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    embed = embedding(c)
    # The scale rounded to the embedding's dtype first, as transformers does.
    x = embed(input_ids) * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    per_layer = (jnp.asarray(c.frequencies()),)
    windows = c.windows()
    if windows is not None:
      per_layer += (jnp.asarray(windows, jnp.int32),)
    x = run_layers(GemmaDecoderLayer, c, decode, x, attention_mask, positions, per_layer)
    logits = output_logits(c, embed, norm(c, "norm", True)(x))
    return _softcap(logits, c.final_logit_softcapping)
