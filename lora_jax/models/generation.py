"""Text generation with a KV cache for the decoders of `lora_jax.models`.

`generate` prefills the prompts in one call, then adds a token a step inside
one compiled `while_loop`, greedy or sampled (temperature, top-p). It needs
only what every family's model has: `__call__(ids, attention_mask, *,
decode=True)` with a 'cache' collection, and `config.vocab_size`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.blocks import init_cache


def generate(model: nn.Module, params: Any, prompt_ids: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
             attention_mask: jax.Array | None = None, stop_ids: Sequence[int] = (),
             vocab_size: int | None = None,
             model_kwargs: Mapping[str, Any] | None = None) -> jax.Array:
  """Continues prompts with a KV cache: prefill in one call, then a token a step.

  One compiled program serves every temperature, `top_p`, rng, stop ids and
  `vocab_size` for a given shape: only `max_new_tokens`, greedy-or-not and
  the number of stop ids are static.

  Args:
    model: a decoder of `lora_jax.models` (any family), or one with adapters.
    params: its params (boxed or not).
    prompt_ids: (batch, prompt_len) int; pad prompts on the left.
    max_new_tokens: how many tokens to add at most.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_p: nucleus sampling: sample only among the most likely tokens whose
      probabilities reach `top_p` together (1.0: all tokens).
    rng: for sampling (required when temperature > 0): one key, from which
      the rows draw together, or one key per row (shape `(batch,)`), each
      row then drawing from its own: a row's tokens depend only on its
      prompt, its key and its model inputs, never on the other rows, so it
      equals that prompt run alone with that key.
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
  if rng is not None:
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)  # raw uint32 key data (jax.random.PRNGKey)
    if rng.shape not in ((), prompt_ids.shape[:1]):
      raise ValueError(f"rng of shape {rng.shape}: give one key, or one per row (shape "
                       f"({prompt_ids.shape[0]},))")
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
  if key.ndim:  # a key per row
    return jax.vmap(jax.random.categorical)(key, nucleus).astype(jnp.int32)
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

  # One key a step: (steps,) from one key, (steps, batch) from a key per row.
  split = functools.partial(jax.random.split, num=max_new_tokens)
  keys = jnp.moveaxis(jax.vmap(split)(rng), 0, 1) if rng.ndim else split(rng)
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
