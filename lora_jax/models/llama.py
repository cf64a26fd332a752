"""The Llama architecture in plain Flax linen: Llama 2, 3, 3.1, 3.2, and the
families built the same way, Mistral, Qwen 2 / 2.5 and Qwen 3.

Mistral is Llama with sliding-window attention; Qwen 2 adds biases to the q, k
and v projections; Qwen 3 normalizes each head of q and k (RMSNorm, before the
rotary embedding). `LlamaConfig.model_type` names the family as transformers
does, and its options (`attention_bias`, `qkv_bias`, `qk_norm`,
`sliding_window`, `layer_types`) say what differs.

The model knows nothing about LoRA: every linear layer is a plain `nn.Dense`
(no bias) called through `__call__`, so adapters can be injected later by
intercepting those calls. Module names mirror Hugging Face's, so PEFT target
names (`q_proj`, `down_proj`, ...) carry over:

    embed_tokens/embedding                    (vocab, hidden)
    layers_{i}/input_layernorm/scale          (hidden,)
    layers_{i}/self_attn/q_proj/kernel        (hidden, heads * head_dim)
    layers_{i}/self_attn/{k,v}_proj/kernel    (hidden, kv_heads * head_dim)
    layers_{i}/self_attn/o_proj/kernel        (heads * head_dim, hidden)
    layers_{i}/post_attention_layernorm/scale (hidden,)
    layers_{i}/mlp/{gate,up}_proj/kernel      (hidden, intermediate)
    layers_{i}/mlp/down_proj/kernel           (intermediate, hidden)
    norm/scale                                (hidden,)
    lm_head/kernel                            (hidden, vocab), absent if tied

plus `bias` beside the q/k/v (and o) kernels where the family has them, and
`layers_{i}/self_attn/{q,k}_norm/scale` (head_dim,) for Qwen 3.

Kernels are HF's `weight` transposed; RMSNorm's HF `weight` is called `scale`
here (flax's name). With `scan_layers=True` the layers are one `nn.scan`ned
module `layers` whose leaves carry a leading layer axis; `stack_layers` and
`unstack_layers` convert between the two layouts.

Rotary embeddings use HF's rotate-half convention, so HF q/k weights load with
a transpose only. Every param is an `nn.LogicallyPartitioned` box after
`init`, named with the logical axes 'vocab', 'embed', 'heads', 'kv', 'mlp',
'norm' (and 'layers' when scanned); activations are constrained to ('batch',
'length', ...), a no-op unless logical axis rules are set.

>>> model = Llama(config_for("tiny"))
>>> ids = jnp.zeros((2, 5), jnp.int32)
>>> variables = model.init(jax.random.key(0), ids)
>>> specs = nn.get_partition_spec(variables)["params"]
>>> tuple(specs["layers_0"]["self_attn"]["q_proj"]["kernel"])
('embed', 'heads')
>>> model.apply(nn.unbox(variables), ids).shape
(2, 5, 256)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax  # noqa: F401 (the docstring's example)
import jax.numpy as jnp
import numpy as np

# The shared blocks and generation, importable from here as they always were.
from lora_jax.models.blocks import (  # noqa: F401
    INIT, LAYER_TYPES, REMAT_POLICIES, Attention, GatedMLP, RMSNorm, RopeScaling, apply_rope,
    attention, check_windows, dense, embedding, init_cache, inverse_frequencies, layer_windows,
    norm, output_logits, positions_from_mask, run_layers, stack_layers, unstack_layers)
from lora_jax.models.generation import generate  # noqa: F401

# The families of this architecture, as transformers' `model_type` names them.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture (HF's `LlamaConfig` names) and how to run it.

  `head_dim` defaults to `hidden_size // num_heads`; `rope_scaling` accepts
  what `RopeScaling.of` does; `dtype` is the compute dtype, `param_dtype` the
  storage one (strings such as "bfloat16" work). `remat` is 'none' or a key of
  `REMAT_POLICIES`.

  The family's options: `attention_bias` (biases on q, k, v and o, as HF's
  Llama and Qwen 3 configs mean it), `qkv_bias` (on q, k and v only: Qwen 2),
  `qk_norm` (Qwen 3), `sliding_window` (a query sees itself and the
  `sliding_window - 1` tokens before it) on the layers `layer_types` marks
  'sliding_attention' (default: every layer, as Mistral).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  model_type: str = "llama"
  attention_bias: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  scan_layers: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # Normalised here so that configs from JSON/YAML compare and hash equal.
    put = functools.partial(object.__setattr__, self)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError("hidden_size must divide by num_heads, or give head_dim.")
      put("head_dim", self.hidden_size // self.num_heads)
    put("rope_scaling", RopeScaling.of(self.rope_scaling))
    put("dtype", jnp.dtype(self.dtype))
    put("param_dtype", jnp.dtype(self.param_dtype))
    if self.num_heads % self.num_kv_heads:
      raise ValueError("num_heads must be a multiple of num_kv_heads.")
    if self.remat != "none" and self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}.")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r}: this architecture serves "
                       f"{', '.join(MODEL_TYPES)}")
    put("layer_types", check_windows(self.sliding_window, self.layer_types, self.num_layers))

  def windows(self) -> tuple[int, ...] | None:
    """Each layer's attention window (0: the whole causal context), or None when no
    layer has one."""
    return layer_windows(self.sliding_window, self.layer_types, self.num_layers)


_LLAMA3 = dict(vocab_size=128256, num_heads=32, num_kv_heads=8, rope_theta=500_000.0,
               max_position_embeddings=131072)
_MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, max_position_embeddings=32768)
_QWEN2 = dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=32768)
_QWEN3 = dict(model_type="qwen3", qk_norm=True, vocab_size=151936, head_dim=128,
              rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960)
PRESETS = {
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2,
                        max_position_embeddings=128),
    # The shipped byte-level model (lora_jax/assets/tiny-kjv): 256 bytes + 3 specials,
    # padded to 320 so the vocabulary axis divides by common mesh sizes.
    "tiny-byte": LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=384,
                             num_layers=4, num_heads=4, num_kv_heads=2,
                             max_position_embeddings=512),
    "llama-3.2-1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_layers=16,
                                rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                                tie_word_embeddings=True, **_LLAMA3),
    "llama-3.1-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_layers=32,
                                rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), **_LLAMA3),
    "llama-3.1-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                                 rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                                 **dict(_LLAMA3, num_heads=64)),
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32),
    "mistral-7b": LlamaConfig(  # v0.1: every layer sees a 4096-token window
        model_type="mistral", vocab_size=32000, sliding_window=4096, **_MISTRAL),
    "mistral-7b-v0.3": LlamaConfig(model_type="mistral", vocab_size=32768, rope_theta=1e6,
                                   **_MISTRAL),
    "qwen2.5-0.5b": LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2,
                                tie_word_embeddings=True, **_QWEN2),
    "qwen2.5-7b": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, **_QWEN2),
    "qwen3-0.6b": LlamaConfig(hidden_size=1024, intermediate_size=3072, num_layers=28,
                              num_heads=16, num_kv_heads=8, tie_word_embeddings=True, **_QWEN3),
    "qwen3-8b": LlamaConfig(hidden_size=4096, intermediate_size=12288, num_layers=36,
                            num_heads=32, num_kv_heads=8, **_QWEN3),
    "qwen3-32b": LlamaConfig(hidden_size=5120, intermediate_size=25600, num_layers=64,
                             num_heads=64, num_kv_heads=8, **_QWEN3),
}


def config_for(name: str, **overrides: Any) -> LlamaConfig:
  """A preset of `PRESETS` with fields replaced, e.g. `scan_layers=True`."""
  if name not in PRESETS:
    raise KeyError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  # The preset's head_dim was derived from these: derive it again.
  if {"hidden_size", "num_heads"} & overrides.keys() and "head_dim" not in overrides:
    overrides["head_dim"] = None
  return dataclasses.replace(PRESETS[name], **overrides)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies, float32 (head_dim // 2,), as HF computes them (with Llama
  3.1's `rope_scaling`, HF's `_compute_llama3_parameters`)."""
  return inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm attention then pre-norm SwiGLU MLP, each with a residual."""

  config: LlamaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, positions=None, window=None):
    c = self.config
    attn = Attention(c, self.decode, qkv_bias=c.attention_bias or c.qkv_bias,
                     o_bias=c.attention_bias, qk_norm=c.qk_norm, name="self_attn")
    x = x + attn(norm(c, "input_layernorm")(x), attention_mask, positions,
                 rope_frequencies(c), window)
    x = x + GatedMLP(c, name="mlp")(norm(c, "post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None  # (carry, per-layer output), the shape nn.scan wants.


class Llama(nn.Module):
  """The decoder: token ids in, float32 logits (batch, seq, vocab) out.

  `__call__(input_ids, attention_mask=None, positions=None, *, decode=False)`:
  `attention_mask` (batch, seq) is 1 for real tokens, 0 for padding (left or
  right); `positions` default to the count of real tokens before each one
  (so left padding needs nothing else). `decode=True` reads and writes the
  'cache' collection (see `blocks.Attention`, `init_cache`, `generate`).
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, *, decode=False):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    embed = embedding(c)
    x = nn.with_logical_constraint(embed(input_ids), ("batch", "length", "embed"))
    windows = c.windows()  # per layer: scanned with the layers' params
    windows = () if windows is None else (jnp.asarray(windows, jnp.int32),)
    x = run_layers(LlamaDecoderLayer, c, decode, x, attention_mask, positions, windows)
    return output_logits(c, embed, norm(c, "norm")(x))
