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
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1's rotary frequency scaling (HF's `rope_type: "llama3"`)."""

  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  @classmethod
  def of(cls, value: Any) -> RopeScaling | None:
    """From None, a `RopeScaling`, HF's `rope_scaling` dict or a 4-tuple."""
    if value is None or isinstance(value, cls):
      return value
    if isinstance(value, Mapping):
      kind = value.get("rope_type", value.get("type", "llama3"))
      if kind != "llama3":
        raise ValueError(f"Unsupported rope scaling {kind!r}; only 'llama3'.")
      names = {f.name for f in dataclasses.fields(cls)}
      return cls(**{k: v for k, v in value.items() if k in names})
    return cls(*value)


# The families of this architecture, as transformers' `model_type` names them.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Remat policy names. 'none' (no remat) is also accepted.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
    window = self.sliding_window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
      raise ValueError(f"sliding_window={window!r}: must be a positive integer or None")
    if self.layer_types is not None:
      put("layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"layer_types={list(self.layer_types)}: must give one of "
                         f"{LAYER_TYPES} for each of the {self.num_layers} layers")
      if "sliding_attention" in self.layer_types and window is None:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is None")

  def windows(self) -> tuple[int, ...] | None:
    """Each layer's attention window (0: the whole causal context), or None when no
    layer has one."""
    if self.sliding_window is None:
      return None
    types = self.layer_types or ("sliding_attention",) * self.num_layers
    windows = tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else None


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
  """Inverse frequencies, float32 (head_dim // 2,), as HF computes them.

  With `rope_scaling` this is HF's `_compute_llama3_parameters`: long
  wavelengths are divided by `factor`, short ones kept, the band between
  interpolated smoothly.
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  inv_freq = np.float32(1.0) / np.float32(config.rope_theta) ** exponents
  s = config.rope_scaling
  if s is None:
    return inv_freq
  old_len = np.float32(s.original_max_position_embeddings)
  low_freq_wavelen = old_len / np.float32(s.low_freq_factor)
  high_freq_wavelen = old_len / np.float32(s.high_freq_factor)
  wavelen = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x (batch, seq, heads, head_dim) by positions (batch, seq), rotate-half."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position of each token: how many real tokens precede it (left padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
  """Grouped-query attention; softmax in float32.

  Args:
    q: (batch, q_len, heads, head_dim).
    k: (batch, kv_len, kv_heads, head_dim); query head i reads kv head
      i // (heads // kv_heads), as HF's `repeat_kv`.
    v: like k.
    allowed: (batch, q_len, kv_len) bool, which keys each query may see.

  Returns:
    (batch, q_len, heads, head_dim) in v's dtype.
  """
  b, q_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, q_len, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
  scores = scores * dim ** -0.5
  # A finite floor, not -inf: a query seeing no key (left padding) gets a
  # uniform average instead of NaNs.
  scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, q_len, heads, dim)


_INIT = nn.initializers.normal(0.02)  # HF's initializer_range


def _dense(config: LlamaConfig, features: int, axes: tuple[str, str], name: str,
           bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=config.dtype, param_dtype=config.param_dtype,
                  kernel_init=nn.with_logical_partitioning(_INIT, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                  name=name)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, in float32, returned in `dtype`.

  HF rounds to the input dtype before multiplying by its `weight`; here the
  product is rounded once, at the end.
  """

  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x * scale).astype(self.dtype)


class LlamaAttention(nn.Module):
  """Causal GQA with rotary embeddings and, when `decode`, a KV cache.

  In decode mode the 'cache' collection holds, per layer, `cached_key` and
  `cached_value` (batch, max_length, kv_heads, head_dim), `cached_mask`
  (batch, max_length), which slots hold real tokens, and `cache_index`, the
  next free slot. `init` creates them at the input's length; later calls
  write their tokens from `cache_index` on and attend to every filled slot.
  """

  config: LlamaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, positions=None, window=None):
    c = self.config
    b, length, _ = x.shape
    qkv_bias = c.attention_bias or c.qkv_bias
    q = _dense(c, c.num_heads * c.head_dim, ("embed", "heads"), "q_proj", qkv_bias)(x)
    k = _dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv"), "k_proj", qkv_bias)(x)
    v = _dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv"), "v_proj", qkv_bias)(x)
    q = q.reshape(b, length, c.num_heads, c.head_dim)
    k = k.reshape(b, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, length, c.num_kv_heads, c.head_dim)
    if c.qk_norm:  # each head of q and k, before the rotary embedding
      q = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="k_norm")(k)
    mask = attention_mask.astype(jnp.bool_)
    q_slots = k_slots = jnp.arange(length)

    cached = self.decode and self.has_variable("cache", "cached_key")
    if self.decode:  # Created by `init` (shapes only), updated by `apply`.
      ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      cm = self.variable("cache", "cached_mask", jnp.zeros, mask.shape, jnp.bool_)
      ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if cached:
      index = ci.value
      cm.value = jax.lax.dynamic_update_slice(cm.value, mask, (0, index))
      mask = cm.value
      q_slots, k_slots = index + q_slots, jnp.arange(mask.shape[1])
      if positions is None:  # Counted over the whole history, not this call.
        positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(mask), index, length, 1)
    if positions is None:
      positions = positions_from_mask(mask)

    inv_freq = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cached:
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, index, 0, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, index, 0, 0))
      ci.value = index + length
      k, v = ck.value, cv.value

    causal = k_slots[None, :] <= q_slots[:, None]
    if window is not None:  # this layer's window; 0: the whole context
      causal &= (window <= 0) | (q_slots[:, None] - k_slots[None, :] < window)
    allowed = mask[:, None, :] & causal[None, :, :]
    out = attention(q, k, v, allowed).reshape(b, length, c.num_heads * c.head_dim)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads"))
    return _dense(c, c.hidden_size, ("heads", "embed"), "o_proj", c.attention_bias)(out)


class LlamaMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = _dense(c, c.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = _dense(c, c.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return _dense(c, c.hidden_size, ("mlp", "embed"), "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm attention then pre-norm MLP, each with a residual."""

  config: LlamaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, positions=None, window=None):
    c = self.config
    norm = functools.partial(RMSNorm, c.rms_norm_eps, c.dtype, c.param_dtype)
    attn = LlamaAttention(c, self.decode, name="self_attn")
    x = x + attn(norm(name="input_layernorm")(x), attention_mask, positions, window)
    x = x + LlamaMLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None  # (carry, per-layer output), the shape nn.scan wants.


class Llama(nn.Module):
  """The decoder: token ids in, float32 logits (batch, seq, vocab) out.

  `__call__(input_ids, attention_mask=None, positions=None, *, decode=False)`:
  `attention_mask` (batch, seq) is 1 for real tokens, 0 for padding (left or
  right); `positions` default to the count of real tokens before each one
  (so left padding needs nothing else). `decode=True` reads and writes the
  'cache' collection (see `LlamaAttention`, `init_cache`, `generate`).
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, *, decode=False):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
                     name="embed_tokens")
    x = nn.with_logical_constraint(embed(input_ids), ("batch", "length", "embed"))

    layer = LlamaDecoderLayer
    if c.remat != "none":
      # CSE prevention is only needed outside scan's loop; inside it costs speed.
      layer = nn.remat(layer, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    windows = c.windows()  # per layer: scanned with the layers' params
    windows = () if windows is None else (jnp.asarray(windows, jnp.int32),)
    if c.scan_layers:
      layer = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast) + (0,) * len(windows),
                      length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = layer(c, decode, name="layers")(x, attention_mask, positions, *windows)
    else:
      for i in range(c.num_layers):
        x, _ = layer(c, decode, name=f"layers_{i}")(
            x, attention_mask, positions, *(w[i] for w in windows))

    x = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x)
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(c, c.vocab_size, ("embed", "vocab"), "lm_head")(x)
    return logits.astype(jnp.float32)


_LAYER = re.compile(r"layers_(\d+)")


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack(*xs: Any) -> Any:
  if _is_box(xs[0]):
    value = _stack(*(x.value for x in xs))
    return xs[0].replace(value=value, names=("layers",) + tuple(xs[0].names))
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype)
  # numpy stays numpy (host memory) for checkpoint conversion.
  return (np if all(isinstance(x, np.ndarray) for x in xs) else jnp).stack(xs)


def _take(x: Any, i: int) -> Any:
  if _is_box(x):
    return x.replace(value=_take(x.value, i), names=tuple(x.names[1:]))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """`layers_0..layers_{N-1}` subtrees -> one `layers` with a leading layer axis.

  Works on any collection ('params', 'cache'), on arrays, numpy arrays (kept
  in host memory), `nn.Partitioned` boxes (gaining a 'layers' axis name) and
  `jax.ShapeDtypeStruct`s; other keys are kept.
  """
  params = dict(params)
  n = sum(1 for key in params if _LAYER.fullmatch(key))
  if not n:
    raise ValueError("No layers_{i} subtrees to stack.")
  layers = [params.pop(f"layers_{i}") for i in range(n)]
  params["layers"] = jax.tree.map(_stack, *layers, is_leaf=_is_box)
  return params


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`."""
  params = dict(params)
  stacked = params.pop("layers")
  n = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(n):
    params[f"layers_{i}"] = jax.tree.map(functools.partial(_take, i=i), stacked, is_leaf=_is_box)
  return params


def init_cache(model: Llama, batch_size: int, max_length: int) -> Any:
  """A zeroed 'cache' collection for `max_length` tokens (no params built)."""
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  init = functools.partial(model.init, decode=True)
  shapes = jax.eval_shape(init, jax.random.key(0), ids)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(model: Llama, params: Any, prompt_ids: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
             attention_mask: jax.Array | None = None, stop_ids: Sequence[int] = (),
             vocab_size: int | None = None,
             model_kwargs: Mapping[str, Any] | None = None) -> jax.Array:
  """Continues prompts with a KV cache: prefill in one call, then a token a step.

  One compiled program serves every temperature, `top_p`, rng, stop ids and
  `vocab_size` for a given shape: only `max_new_tokens`, greedy-or-not and
  the number of stop ids are static.

  Args:
    model: a `Llama`.
    params: its params (boxed or not).
    prompt_ids: (batch, prompt_len) int; pad prompts on the left.
    max_new_tokens: how many tokens to add at most.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_p: nucleus sampling: sample only among the most likely tokens whose
      probabilities reach `top_p` together (1.0: all tokens).
    rng: key for sampling; required when temperature > 0.
    attention_mask: (batch, prompt_len), 1 for real prompt tokens.
    stop_ids: ids that end a row (e.g. a tokenizer's EOS and end-of-turn
      ids). A row that produced one repeats it to the end; decoding stops
      early once every row has.
    vocab_size: ids at or above it are never produced: the embedding of a
      checkpoint is often padded past its tokenizer's ids.
    model_kwargs: arrays passed as keywords to every call of the model, e.g.
      one id per row for a model that takes them; traced, so new values
      reuse the compiled program.

  Returns:
    (batch, prompt_len + max_new_tokens) int32: the prompts, then new tokens.
  """
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(prompt_ids.shape, jnp.bool_)
  if temperature < 0 or (temperature > 0 and rng is None):
    raise ValueError("temperature must be >= 0, and sampling needs an rng.")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p}: must be in (0, 1]")
  vocab = model.config.vocab_size
  if vocab_size is not None and not 0 < vocab_size <= vocab:
    raise ValueError(f"vocab_size={vocab_size}: must be in [1, {vocab}] (the model's vocabulary)")
  if max_new_tokens <= 0:
    return prompt_ids
  new = _generate(model, params, prompt_ids, jnp.asarray(attention_mask, jnp.bool_),
                  jax.random.key(0) if rng is None else rng, jnp.float32(temperature),
                  jnp.float32(top_p), jnp.asarray(stop_ids, jnp.int32).reshape(-1),
                  jnp.int32(vocab if vocab_size is None else vocab_size),
                  dict(model_kwargs or {}), max_new_tokens=max_new_tokens,
                  greedy=temperature == 0)
  return jnp.concatenate([prompt_ids, new], axis=1)


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
          vocab_size: jax.Array, greedy: bool) -> jax.Array:
  """The next token of each row from its last logits."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  # A token is kept while the probability of the ones before it is below top_p.
  kept = jnp.cumsum(probs, axis=-1) - probs < top_p
  lowest = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
  nucleus = jnp.where((logits >= lowest) | (top_p >= 1), logits, -jnp.inf)
  return jax.random.categorical(key, nucleus, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(model, params, prompt_ids, attention_mask, rng, temperature, top_p, stop_ids,
              vocab_size, model_kwargs, *, max_new_tokens, greedy):
  batch, prompt_len = prompt_ids.shape
  pick = functools.partial(_pick, temperature=temperature, top_p=top_p, vocab_size=vocab_size,
                           greedy=greedy)

  def step(cache, ids, mask, key):
    logits, variables = model.apply({"params": params, "cache": cache}, ids, mask,
                                    decode=True, mutable=["cache"], **model_kwargs)
    return variables["cache"], pick(logits[:, -1], key)

  keys = jax.random.split(rng, max_new_tokens)
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  cache, token = step(cache, prompt_ids, attention_mask, keys[0])
  stopped = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=1)
  out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(token)

  def more(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, token, done, out = carry
    ids = token[:, None]
    cache, following = step(cache, ids, jnp.ones(ids.shape, jnp.bool_), keys[i])
    following = jnp.where(done, token, following)  # a stopped row repeats its stop id
    out = jax.lax.dynamic_update_slice(out, following[:, None], (0, i))
    return i + 1, cache, following, done | stopped(following), out

  _, _, last, _, out = jax.lax.while_loop(
      more, body, (jnp.int32(1), cache, token, stopped(token), out))
  return jnp.where(out < 0, last[:, None], out)
