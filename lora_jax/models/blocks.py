"""Building blocks the decoder families share: rotary embeddings, grouped-query
attention with a KV cache, RMSNorm, gated MLPs, layer stacking and remat.

Families (`llama.py`, `gemma.py`) compose these as their papers describe; the
blocks take what differs between them as options (biases, q/k norms, the
query scale, attention soft-capping, sliding windows, the norm's `1 + weight`
convention, the MLP's activation). Per-layer settings (a layer's attention
window, its rotary frequencies) are arrays with a leading layer axis, scanned
with the layers' params, so one compiled layer serves layers that differ.

A family's config provides `hidden_size`, `num_heads`, `num_kv_heads`,
`head_dim`, `intermediate_size`, `rms_norm_eps`, `dtype`, `param_dtype`,
`num_layers`, `scan_layers` and `remat`. Nothing here knows about LoRA: every
linear layer is a plain `nn.Dense` called through `__call__`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
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


# Remat policy names. 'none' (no remat) is also accepted.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' `layer_types`


def check_windows(sliding_window: Any, layer_types: Any, num_layers: int
                  ) -> tuple[str, ...] | None:
  """`layer_types` as a tuple, checked with `sliding_window` (raises `ValueError`)."""
  if sliding_window is not None and (isinstance(sliding_window, bool)
                                     or not isinstance(sliding_window, int) or sliding_window < 1):
    raise ValueError(f"sliding_window={sliding_window!r}: must be a positive integer or None")
  if layer_types is None:
    return None
  layer_types = tuple(layer_types)
  if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
    raise ValueError(f"layer_types={list(layer_types)}: must give one of {LAYER_TYPES} for "
                     f"each of the {num_layers} layers")
  if "sliding_attention" in layer_types and sliding_window is None:
    raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
  return layer_types


def layer_windows(sliding_window: int | None, layer_types: tuple[str, ...] | None,
                  num_layers: int) -> tuple[int, ...] | None:
  """Each layer's attention window (0: the whole causal context; without `layer_types`
  every layer slides), or None when no layer has one."""
  if sliding_window is None:
    return None
  types = layer_types or ("sliding_attention",) * num_layers
  windows = tuple(sliding_window if t == "sliding_attention" else 0 for t in types)
  return windows if any(windows) else None


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                        linear_factor: float = 1.0) -> np.ndarray:
  """Rotary inverse frequencies, float32 (head_dim // 2,), as HF computes them.

  With `scaling` this is HF's `_compute_llama3_parameters`: long wavelengths
  are divided by `factor`, short ones kept, the band between interpolated
  smoothly. `linear_factor` divides them all (HF's `rope_type: "linear"`).
  """
  exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1.0) / np.float32(theta) ** exponents
  inv_freq = inv_freq / np.float32(linear_factor)
  s = scaling
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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *,
              scale: float | None = None, softcap: float | None = None) -> jax.Array:
  """Grouped-query attention; softmax in float32.

  Args:
    q: (batch, q_len, heads, head_dim).
    k: (batch, kv_len, kv_heads, head_dim); query head i reads kv head
      i // (heads // kv_heads), as HF's `repeat_kv`.
    v: like k.
    allowed: (batch, q_len, kv_len) bool, which keys each query may see.
    scale: the scores' factor (default `head_dim ** -0.5`).
    softcap: scores become `softcap * tanh(scores / softcap)` (Gemma 2).

  Returns:
    (batch, q_len, heads, head_dim) in v's dtype.
  """
  b, q_len, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, q_len, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
  scores = scores * (dim ** -0.5 if scale is None else scale)
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  # A finite floor, not -inf: a query seeing no key (left padding) gets a
  # uniform average instead of NaNs.
  scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, q_len, heads, dim)


INIT = nn.initializers.normal(0.02)  # HF's initializer_range


def dense(config: Any, features: int, axes: tuple[str, str], name: str,
          bias: bool = False) -> nn.Dense:
  """A linear layer in the config's dtypes, its kernel (and bias) logically named."""
  return nn.Dense(features, use_bias=bias, dtype=config.dtype, param_dtype=config.param_dtype,
                  kernel_init=nn.with_logical_partitioning(INIT, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                  name=name)


class RMSNorm(nn.Module):
  """x / rms(x) * scale (or, `unit_offset`, * (1 + scale): Gemma's convention, its
  scale starting at 0), in float32, returned in `dtype`.

  HF rounds to the input dtype before multiplying by its `weight`; here the
  product is rounded once, at the end.
  """

  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x * (1 + scale if self.unit_offset else scale)).astype(self.dtype)


def norm(config: Any, name: str, unit_offset: bool = False) -> RMSNorm:
  """An `RMSNorm` in the config's eps and dtypes."""
  return RMSNorm(config.rms_norm_eps, config.dtype, config.param_dtype, unit_offset, name=name)


class Attention(nn.Module):
  """Causal GQA with rotary embeddings and, when `decode`, a KV cache.

  `__call__(x, attention_mask, positions, inv_freq, window=None)`: `inv_freq`
  are this layer's rotary frequencies; `window`, when given, this layer's
  window (a query sees itself and the `window - 1` slots before it; 0: the
  whole context).

  In decode mode the 'cache' collection holds, per layer, `cached_key` and
  `cached_value` (batch, max_length, kv_heads, head_dim), `cached_mask`
  (batch, max_length), which slots hold real tokens, and `cache_index`, the
  next free slot. `init` creates them at the input's length; later calls
  write their tokens from `cache_index` on and attend to every filled slot.

  Attributes:
    config: the family's config (sizes and dtypes).
    decode: use the cache.
    qkv_bias: biases on q, k and v.
    o_bias: a bias on the output projection.
    qk_norm: RMSNorm over each head of q and k before the rotary embedding.
    unit_offset: those norms scale by `1 + weight` (Gemma).
    scale: the scores' factor (default `head_dim ** -0.5`).
    softcap: attention logit soft-capping.
  """

  config: Any
  decode: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  unit_offset: bool = False
  scale: float | None = None
  softcap: float | None = None

  @nn.compact
  def __call__(self, x, attention_mask, positions, inv_freq, window=None):
    c = self.config
    b, length, _ = x.shape
    q = dense(c, c.num_heads * c.head_dim, ("embed", "heads"), "q_proj", self.qkv_bias)(x)
    k = dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv"), "k_proj", self.qkv_bias)(x)
    v = dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv"), "v_proj", self.qkv_bias)(x)
    q = q.reshape(b, length, c.num_heads, c.head_dim)
    k = k.reshape(b, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, length, c.num_kv_heads, c.head_dim)
    if self.qk_norm:  # each head of q and k, before the rotary embedding
      q = norm(c, "q_norm", self.unit_offset)(q)
      k = norm(c, "k_norm", self.unit_offset)(k)
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

    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cached:
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, index, 0, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, index, 0, 0))
      ci.value = index + length
      k, v = ck.value, cv.value

    causal = k_slots[None, :] <= q_slots[:, None]
    if window is not None:
      causal &= (window <= 0) | (q_slots[:, None] - k_slots[None, :] < window)
    allowed = mask[:, None, :] & causal[None, :, :]
    out = attention(q, k, v, allowed, scale=self.scale, softcap=self.softcap)
    out = nn.with_logical_constraint(out.reshape(b, length, c.num_heads * c.head_dim),
                                     ("batch", "length", "heads"))
    return dense(c, c.hidden_size, ("heads", "embed"), "o_proj", self.o_bias)(out)


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)): SwiGLU with `silu`, GeGLU with tanh-approximated `gelu`."""

  config: Any
  activation: Callable[[jax.Array], jax.Array] = nn.silu

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = dense(c, c.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = dense(c, c.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    h = nn.with_logical_constraint(self.activation(gate) * up, ("batch", "length", "mlp"))
    return dense(c, c.hidden_size, ("mlp", "embed"), "down_proj")(h)


def embedding(config: Any) -> nn.Embed:
  """The token embedding `embed_tokens`, in the config's dtypes."""
  return nn.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                  param_dtype=config.param_dtype,
                  embedding_init=nn.with_logical_partitioning(INIT, ("vocab", "embed")),
                  name="embed_tokens")


def output_logits(config: Any, embed: nn.Embed, x: jax.Array) -> jax.Array:
  """Float32 logits: through the embedding when `config.tie_word_embeddings`, else
  through `lm_head`."""
  if config.tie_word_embeddings:
    return embed.attend(x).astype(jnp.float32)
  return dense(config, config.vocab_size, ("embed", "vocab"), "lm_head")(x).astype(jnp.float32)


def run_layers(layer: type[nn.Module], config: Any, decode: bool, x: jax.Array,
               attention_mask: jax.Array, positions: jax.Array | None,
               per_layer: tuple[jax.Array, ...] = ()) -> jax.Array:
  """The decoder layers `layer(config, decode, name=...)` in turn, from inside a
  parent's compact `__call__`: scanned as one `layers` module with `scan_layers`,
  else `layers_0 ... layers_{N-1}`; rematerialized as `config.remat` says.

  Each layer is called `(x, attention_mask, positions, *settings)` and returns
  `(x, None)`; `per_layer` are arrays with a leading layer axis, layer i gets
  their i-th entries as its `settings`.
  """
  if config.remat != "none":
    # CSE prevention is only needed outside scan's loop; inside it costs speed.
    layer = nn.remat(layer, policy=REMAT_POLICIES[config.remat],
                     prevent_cse=not config.scan_layers)
  if config.scan_layers:
    layer = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast) + (0,) * len(per_layer),
                    length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = layer(config, decode, name="layers")(x, attention_mask, positions, *per_layer)
    return x
  for i in range(config.num_layers):
    x, _ = layer(config, decode, name=f"layers_{i}")(
        x, attention_mask, positions, *(setting[i] for setting in per_layer))
  return x


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


def init_cache(model: nn.Module, batch_size: int, max_length: int) -> Any:
  """A zeroed 'cache' collection for `max_length` tokens (no params built)."""
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  init = functools.partial(model.init, decode=True)
  shapes = jax.eval_shape(init, jax.random.key(0), ids)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
