"""A jitted, sharded LoRA train step (what `pjit` was: `jax.jit` with shardings).

The step takes the adapters (and `trainable` params), their optimizer state,
the frozen base and a batch. Adapters and optimizer state are donated and
returned; the base is an argument the step neither donates nor returns, so no
step copies it, and gradients are taken with respect to the adapters only, so
the base costs no weight gradients. Every input and output has an explicit
sharding, so after the first call the step never recompiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding

from lora_jax.config import LoRAConfig
from lora_jax.layout import Layout
from lora_jax.quantized_base import kernel_axes, quantized_axes
from lora_jax.sharding import (
    DEFAULT_RULES, batch_sharding, follow_params, param_shardings, replicated)
from lora_jax.tree import check_trainable_rules, combine, split

# (params, batch, rng) -> (summed loss, summed weight): the step divides once,
# so gradient accumulation gives exactly the full batch's mean.
LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array]]


def _token_losses(model: nn.Module, params: Any, batch: Mapping[str, jax.Array],
                  rngs: Mapping[str, jax.Array], **call_kwargs: Any
                  ) -> tuple[jax.Array, jax.Array]:
  """Next-token cross entropy of every position, and each position's weight."""
  ids = batch["input_ids"]
  mask = batch.get("attention_mask", jnp.ones(ids.shape, jnp.int32))
  logits = model.apply({"params": params}, ids, mask, rngs=rngs,
                       **call_kwargs).astype(jnp.float32)
  # Every position predicts the next token; the last has none (weight 0). Whole-sequence
  # logits avoid a sliced copy, and optax's logsumexp form keeps no log-softmax copy:
  # both vocabulary-sized.
  pad = jnp.zeros_like(ids[:, :1])
  targets = jnp.concatenate([ids[:, 1:], pad], axis=1)
  weights = (batch.get("loss_mask", mask)[:, 1:] * mask[:, 1:]).astype(jnp.float32)
  weights = jnp.concatenate([weights, jnp.zeros_like(weights[:, :1])], axis=1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets), weights


def causal_lm_loss(model: nn.Module, *, dropout: bool = True) -> LossFn:
  """Next-token cross entropy for a model called as `model(input_ids, attention_mask)`.

  The batch holds `input_ids` (batch, seq) and optionally `attention_mask`
  (1 for real tokens) and `loss_mask` (1 for tokens to predict, e.g. the
  completion of an instruction; defaults to every real token). With
  `dropout` a `'dropout'` rng is passed, so adapter dropout runs (training);
  without, the model is deterministic (evaluation).
  """
  def loss_fn(params, batch, rng):
    nll, weights = _token_losses(model, params, batch, {"dropout": rng} if dropout else {})
    return jnp.sum(nll * weights), jnp.sum(weights)
  return loss_fn


class MixedLoss:
  """Next-token cross entropy of several adapters trained at once, each on its own
  examples: the sum over adapters of each adapter's mean token loss.

  For a model injected with an adapter stack (`lora_jax.stack`): the batch
  also holds `adapter_ids` (one per example). Every adapter's gradient is then
  that of its own mean loss, as if it trained alone on its examples; with an
  elementwise optimizer (Adam, SGD; no clipping by a norm over all of them)
  each slot trains exactly as a separate run would. `make_train_step` calls
  `example_weights` on the whole batch before splitting it into
  micro-batches, so accumulation keeps each adapter's mean exact. Examples
  with adapter id -1 (the base) add nothing.
  """

  def __init__(self, model: nn.Module, count: int, *, dropout: bool = True):
    self.model, self.count, self.dropout = model, count, dropout

  def example_weights(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """1 / (tokens of the example's adapter in the batch), per example."""
    ids = batch["adapter_ids"]
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask", jnp.ones(input_ids.shape, jnp.int32))
    tokens = jnp.sum((batch.get("loss_mask", mask)[:, 1:] * mask[:, 1:]).astype(jnp.float32), 1)
    per_adapter = jax.ops.segment_sum(tokens, jnp.clip(ids, 0, self.count - 1), self.count)
    return jnp.where(ids >= 0, 1.0 / jnp.maximum(per_adapter[jnp.clip(ids, 0)], 1.0), 0.0)

  def __call__(self, params, batch, rng):
    nll, weights = _token_losses(self.model, params, batch,
                                 {"dropout": rng} if self.dropout else {},
                                 adapter_ids=batch["adapter_ids"])
    weights = weights * batch["example_weight"][:, None]
    return jnp.sum(nll * weights), jnp.sum(weights)


class InMesh:
  """A jitted function traced and run under its mesh and logical-axis rules.

  Models annotate activations with `nn.with_logical_constraint`; those are
  no-ops unless a mesh and rules are in context when the function is traced.
  Without them XLA places activations by propagation alone, and for FSDP it
  may keep the whole batch's activations on every device.
  """

  def __init__(self, fn: Callable, mesh: Mesh, rules, params: Any = None):
    self.fn, self.mesh, self.rules = fn, mesh, tuple(rules)
    self.axes = quantized_axes(params)  # once, not at every call

  def _context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    stack.enter_context(kernel_axes(self.axes))  # quantized kernels gather their codes
    return stack

  def __call__(self, *args):
    with self._context():
      return self.fn(*args)

  def lower(self, *args):
    with self._context():
      return self.fn.lower(*args)

  def _cache_size(self) -> int:
    return self.fn._cache_size()


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A compiled-once sharded step, and where its inputs live.

  Attributes:
    step: `(adapters, opt_state, base, batch, rng) -> (adapters, opt_state,
      metrics)`, metrics `{'loss', 'tokens', 'grad_norm'}` (replicated; with a
      `MixedLoss`, 'loss' is the mean over the batch's adapters of each one's
      mean loss and 'tokens' the number of adapters in the batch).
    adapter_shardings: shardings of the trained leaves (adapters and
      `trainable` params), each adapter placed like its kernel.
    base_shardings: shardings of the frozen leaves.
    opt_shardings: the optimizer state's, following its params.
    batch_sharding: inputs split over the `data` and `fsdp` mesh axes.
  """

  step: Callable
  init_opt_state: Callable
  config: LoRAConfig | None
  adapter_shardings: Any
  base_shardings: Any
  opt_shardings: Any
  batch_sharding: NamedSharding

  def place(self, params: Mapping) -> tuple[Any, Any, Any]:
    """Splits unboxed params and puts them on the mesh.

    Returns:
      `(adapters, opt_state, base)`, sharded as the step expects.
    """
    adapters, base = split(params, self.config)
    # A copy: the step donates the adapters, and the caller keeps what it passed in.
    adapters = jax.device_put(jax.tree.map(jnp.copy, adapters), self.adapter_shardings)
    base = jax.device_put(base, self.base_shardings)
    return adapters, self.init_opt_state(adapters), base

  def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Puts a global batch (on every host the same) on the mesh."""
    return {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()}


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    abstract_params: Mapping,
    config: LoRAConfig | None = None,
    *,
    rules=DEFAULT_RULES,
    accum_steps: int = 1,
    layouts: Mapping[str, Layout] | None = None,
) -> TrainStep:
  """Builds the sharded LoRA train step.

  Args:
    loss_fn: `(params, batch, rng) -> (summed loss, summed weight)`, e.g.
      `causal_lm_loss(model)`.
    tx: the optimizer of the trained leaves, e.g. `optax.adamw(1e-4)` or
      `lora_jax.optimizer(...)` for LoRA+. The frozen base never reaches it.
    mesh: from `lora_jax.sharding.make_mesh`.
    abstract_params: `jax.eval_shape(model.init, ...)['params']`: shapes and
      logical axis names (boxed), no memory.
    config: its `trainable` rules decide what trains besides the adapters.
    rules: logical axis rules.
    accum_steps: split each batch into this many micro-batches, accumulating
      gradients (the update equals the full batch's).
    layouts: every adapter's layout by layer path (`lora_jax.layouts`; an
      adapter stack's `dict(stack.layouts)`), placing adapters like their
      kernels; without it each is read from the shapes.

  Returns:
    A `TrainStep`.
  """
  if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps!r}: must be an integer >= 1")
  check_trainable_rules(abstract_params, config)
  # A loss normalised per group of examples (`MixedLoss`) weighs the whole batch first.
  example_weights = getattr(loss_fn, "example_weights", None)
  # The step relies on sharding propagation (GSPMD): Explicit mesh axes would demand an
  # out_sharding on every ambiguous op of the model. Same devices, Auto axes; `place` and
  # `shard_batch` put inputs there.
  mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
  shardings = param_shardings(abstract_params, mesh, rules, layouts=layouts)
  adapter_sh, base_sh = split(shardings, config)
  if not adapter_sh:
    raise ValueError("abstract_params hold no adapters or trainable params: nothing to train")
  abstract_adapters = split(nn.unbox(abstract_params), config)[0]
  opt_sh = follow_params(jax.eval_shape(tx.init, abstract_adapters), abstract_adapters,
                         adapter_sh, mesh)
  batch_sh = batch_sharding(mesh)
  scalar = replicated(mesh)

  def grads_of(adapters, base, batch, rng):
    def total(a):
      return loss_fn(combine(a, base), batch, rng)
    (loss, weight), grads = jax.value_and_grad(total, has_aux=True)(adapters)
    return loss, weight, grads

  shards = mesh.shape["data"] * mesh.shape["fsdp"]

  def train_step(adapters, opt_state, base, batch, rng):
    if example_weights is not None:
      batch = {**batch, "example_weight": example_weights(batch)}
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % (accum_steps * shards):
      raise ValueError(
          f"batch size {sorted(sizes)} must be one size, divisible by accum_steps "
          f"({accum_steps}) x the data and fsdp mesh axes ({shards})")
    if accum_steps == 1:
      loss, weight, grads = grads_of(adapters, base, batch, rng)
    else:
      # Micro-batch i takes rows i, i + k, i + 2k, ...: every device keeps its
      # share of every micro-batch, so the split moves no data.
      def micro(x):
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      def body(carry, inputs):
        index, mb = inputs
        mb = jax.lax.with_sharding_constraint(mb, jax.tree.map(lambda _: batch_sh, mb))
        loss, weight, grads = grads_of(adapters, base, mb, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, weight, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree.map(jnp.zeros_like, adapters))
      micro_batches = jax.tree.map(micro, dict(batch))
      (loss, weight, grads), _ = jax.lax.scan(
          body, zeros, (jnp.arange(accum_steps), micro_batches))
    # A sum of per-group means is normalised already (its weight counts the groups).
    divisor = jnp.maximum(weight, 1.0) if example_weights is None else jnp.ones((), jnp.float32)
    grads = jax.tree.map(lambda g: g / divisor.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
    metrics = {"loss": loss / jnp.maximum(weight, 1.0), "tokens": weight,
               "grad_norm": optax.tree.norm(grads)}
    return adapters, opt_state, metrics

  step = InMesh(jax.jit(
      train_step,
      in_shardings=(adapter_sh, opt_sh, base_sh, batch_sh, scalar),
      out_shardings=(adapter_sh, opt_sh, scalar),
      donate_argnums=(0, 1)), mesh, rules, abstract_params)
  return TrainStep(step, jax.jit(tx.init, out_shardings=opt_sh), config, adapter_sh, base_sh,
                   opt_sh, batch_sh)
