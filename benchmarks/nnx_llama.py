"""An NNX port of `lora_jax.models.llama.Llama`, for flax.nnx.LoRA in benchmarks/compare.py.

Same math as the linen model (it reuses its attention, rotary and mask
functions; only the module structure is NNX), same param names and layouts:
`Linear.kernel` is (in, out) like `nn.Dense.kernel`, so `from_linen` moves
the linen params in without copying or transposing anything. With
`lora_rank` the seven projections are `nnx.LoRALinear`s whose adapters are
`nnx.LoRAParam`s: train them with `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`.

`nnx.LoRA` has no alpha: it computes `x @ A @ B`, scale 1. `LoRALinear`
here multiplies the adapter's output by `lora_scale` (alpha / r), which is what
PEFT, qwix and lora_jax do, so every contender computes the same function.

Only the training/scoring call is ported (no KV cache, no scanned layers).
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.models.llama import (
    LlamaConfig, apply_rope, attention, positions_from_mask, rope_frequencies)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nnx.LoRALinear):
  """`nnx.LoRALinear` with PEFT's scale alpha / r on the adapter path."""

  def __init__(self, *args, lora_scale: float, **kwargs):
    super().__init__(*args, **kwargs)
    self.lora_scale = lora_scale

  def __call__(self, x):
    return nnx.Linear.__call__(self, x) + self.lora(x) * self.lora_scale


def _linear(c: LlamaConfig, lora: dict | None, name: str, n_in: int, n_out: int, rngs):
  kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
            kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
  if lora is None or name not in lora["targets"]:
    return nnx.Linear(n_in, n_out, **kw)
  return LoRALinear(n_in, n_out, lora_rank=lora["rank"], lora_scale=lora["alpha"] / lora["rank"],
                    lora_param_dtype=c.param_dtype, **kw)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, c: LlamaConfig):
    self.scale = nnx.Param(jnp.ones((dim,), c.param_dtype))
    self.eps, self.dtype = c.rms_norm_eps, c.dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
  def __init__(self, c: LlamaConfig, lora, rngs):
    self.c = c
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    self.q_proj = _linear(c, lora, "q_proj", h, q, rngs)
    self.k_proj = _linear(c, lora, "k_proj", h, kv, rngs)
    self.v_proj = _linear(c, lora, "v_proj", h, kv, rngs)
    self.o_proj = _linear(c, lora, "o_proj", q, h, rngs)

  def __call__(self, x, mask, positions):
    c, (b, n, _) = self.c, x.shape
    q = self.q_proj(x).reshape(b, n, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, n, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, n, c.num_kv_heads, c.head_dim)
    inv_freq = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    slots = jnp.arange(n)
    allowed = mask[:, None, :] & (slots[None, :] <= slots[:, None])[None]
    return self.o_proj(attention(q, k, v, allowed).reshape(b, n, -1))


class MLP(nnx.Module):
  def __init__(self, c: LlamaConfig, lora, rngs):
    h, i = c.hidden_size, c.intermediate_size
    self.gate_proj = _linear(c, lora, "gate_proj", h, i, rngs)
    self.up_proj = _linear(c, lora, "up_proj", h, i, rngs)
    self.down_proj = _linear(c, lora, "down_proj", i, h, rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, c: LlamaConfig, lora, rngs):
    self.input_layernorm = RMSNorm(c.hidden_size, c)
    self.self_attn = Attention(c, lora, rngs)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c)
    self.mlp = MLP(c, lora, rngs)

  def __call__(self, x, mask, positions):
    x = x + self.self_attn(self.input_layernorm(x), mask, positions)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """`Llama(config, rngs=...)(input_ids, attention_mask=None)` -> float32 logits."""

  def __init__(self, c: LlamaConfig, *, lora_rank: int | None = None, lora_alpha: float = 8.0,
               targets=TARGETS, rngs: nnx.Rngs):
    if c.scan_layers or c.remat != "none":
      raise ValueError("the NNX port has no scan_layers or remat")
    lora = None if lora_rank is None else dict(rank=lora_rank, alpha=lora_alpha,
                                               targets=tuple(targets))
    self.c = c
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype,
                                  param_dtype=c.param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(c, lora, rngs) for _ in range(c.num_layers)])
    self.norm = RMSNorm(c.hidden_size, c)
    if not c.tie_word_embeddings:
      self.lm_head = _linear(c, None, "lm_head", c.hidden_size, c.vocab_size, rngs)

  def __call__(self, input_ids, attention_mask=None):
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    mask = attention_mask.astype(jnp.bool_)
    positions = positions_from_mask(mask)
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, mask, positions)
    x = self.norm(x)
    logits = self.embed_tokens.attend(x) if self.c.tie_word_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32)


def from_linen(config: LlamaConfig, linen_params: Any, *, lora_rank: int | None = None,
               lora_alpha: float = 8.0, a_init=nnx.initializers.he_uniform(),
               seed: int = 0) -> Llama:
  """The NNX model holding the linen model's (unboxed, unscanned) params.

  The base arrays are used as they are (no copy); the model is first built
  abstractly, so no random base weights are ever allocated. Adapters (with
  `lora_rank`) start as `nnx.LoRALinear`'s do, B zero, A from `a_init` (by
  default he-uniform, `nnx.LoRALinear`'s default).
  """
  make = lambda: Llama(config, lora_rank=lora_rank, lora_alpha=lora_alpha, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(nnx.eval_shape(make))
  flat = dict(nnx.to_flat_state(state))
  for path, var in flat.items():
    keys = [str(k) for k in path]
    if "lora" in keys:  # .../q_proj/lora/lora_a
      key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(keys).encode()))
      shape, dtype = var.shape, var.dtype
      value = (a_init(key, shape, dtype) if keys[-1] == "lora_a"
               else jnp.zeros(shape, dtype))
    else:
      node = linen_params
      for i, k in enumerate(keys):  # layers/3/... in NNX is layers_3/... in linen
        if k == "layers":
          continue
        node = node[f"layers_{k}" if i and keys[i - 1] == "layers" else k]
      value = node
      if tuple(value.shape) != tuple(var.shape):
        raise ValueError(f"{'/'.join(keys)}: linen {value.shape} vs NNX {var.shape}")
    flat[path] = var.replace(value)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
