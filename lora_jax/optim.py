"""The optimizer of a LoRA model: one `tx` for every trained leaf, LoRA+ inside it.

The trained leaves (adapters and `trainable` params) go through a single copy
of the user's transformation, so anything that looks across leaves (global-norm
clipping, `optax.apply_if_finite`, a schedule's step count) behaves exactly as
that transformation applied to the trained leaves alone. Frozen leaves get
`optax.set_to_zero()` and so no optimizer state.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.config import LoRAConfig, join_path
from lora_jax.tree import FROZEN, LORA, TRAINABLE, check_trainable_rules, partition

TRAINED = "trained"

# Names of trained non-adapter params that are vectors per layer even when
# `nn.scan` stacks them into matrices.
_VECTOR_NAMES = ("bias", "scale")


def optimizer(
    tx: optax.GradientTransformation,
    params: Any,
    config: LoRAConfig | None = None,
    lora_plus_ratio: float | None = None,
    *,
    lora_plus_vectors: bool = True,
) -> optax.GradientTransformation:
  """`tx` for the adapters (and `trainable` params), zero updates elsewhere.

  One copy of `tx` sees every trained leaf at once, so clipping, finiteness
  checks and schedules behave as `tx` on the trained leaves alone. Frozen
  leaves get `optax.set_to_zero()` and so no optimizer state.

  LoRA+ (Hayou et al. 2024) gives the B-group this many times A's learning
  rate by multiplying their updates after `tx`. For every optax optimizer whose
  update is proportional to its learning rate (SGD, Adam, AdamW with its
  decoupled weight decay, Lion, ...) that equals running them at the larger
  rate. Clipping and finiteness checks inside `tx` see the gradients of all
  trained leaves before any scaling, as they would in one optimizer with a
  learning rate per group. As PEFT's `create_loraplus_optimizer`, the
  B-group is:

  * every `lora_b`;
  * every DoRA `lora_magnitude` (a vector, or a matrix stacked by `nn.scan`);
  * `trainable` params that are 1-D or named `bias` or `scale` (biases and
    norm scales, stacked or not). A fully trained 2-D kernel or embedding
    table keeps A's rate.

  Args:
    tx: the optimizer for the trained leaves, e.g. `optax.adamw(1e-4)`.
    params: the param tree the optimizer will see; it must hold adapters or
      `trainable` params.
    config: gives the `trainable` rules.
    lora_plus_ratio: B's learning rate over A's (the paper suggests 16), or
      None for plain LoRA.
    lora_plus_vectors: with False, LoRA+ scales `lora_b` alone, and DoRA
      magnitudes and trained vectors keep A's rate.

  Returns:
    An `optax.partition` transformation.

  Raises:
    ValueError: when nothing would train, a `trainable` rule matches no param,
      or `lora_plus_ratio` is not a finite number > 0.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'dense': {'kernel': jnp.ones((4, 3)), 'lora_a': jnp.ones((4, 2)),
    ...                     'lora_b': jnp.ones((2, 3))}}
    >>> tx = optimizer(optax.sgd(1.0), params, lora_plus_ratio=4.0)
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    >>> jax.tree.map(lambda u: float(u[0, 0]), updates)
    {'dense': {'kernel': 0.0, 'lora_a': -1.0, 'lora_b': -4.0}}
  """
  labels = jax.tree.leaves(partition(params, config))
  check_trainable_rules(params, config)
  if LORA not in labels and TRAINABLE not in labels:
    raise ValueError(
        "params hold no adapter leaves (lora_a/lora_b/lora_magnitude) and no trainable "
        "leaves: the optimizer would train nothing. Initialise a LoRA model (or inject "
        "LoRA) before building the optimizer.")
  if lora_plus_ratio is not None and not (
      isinstance(lora_plus_ratio, (int, float)) and math.isfinite(lora_plus_ratio)
      and lora_plus_ratio > 0):
    raise ValueError(f"lora_plus_ratio={lora_plus_ratio!r}: must be a finite number > 0")

  trained = tx
  if lora_plus_ratio is not None:
    in_b = lambda tree: _b_group(tree, config, vectors=lora_plus_vectors)
    trained = optax.chain(tx, optax.masked(optax.scale(float(lora_plus_ratio)), in_b))

  def trained_or_frozen(tree: Any) -> Any:
    return jax.tree.map(lambda label: FROZEN if label == FROZEN else TRAINED,
                        partition(tree, config))

  return optax.partition({TRAINED: trained, FROZEN: optax.set_to_zero()}, trained_or_frozen)


def _b_group(tree: Any, config: LoRAConfig | None, *, vectors: bool) -> Any:
  """A tree of bools: True where LoRA+ gives B's learning rate (see `optimizer`)."""
  def in_b(key_path: Any, label: str, leaf: Any) -> bool:
    name = join_path(key_path).rsplit("/", 1)[-1]
    if name == "lora_b":
      return True
    if not vectors:
      return False
    if name == "lora_magnitude":
      return True
    # PEFT gives B's rate to every 1-D trained param; under `nn.scan` a bias or
    # norm scale is stacked to 2-D, so its name says what it is.
    return label == TRAINABLE and (jnp.ndim(leaf) == 1 or name in _VECTOR_NAMES)

  # `tree` may hold optax's MaskedNode (no leaves) where the frozen leaves were.
  return jax.tree_util.tree_map_with_path(in_b, partition(tree, config), tree)
