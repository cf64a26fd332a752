"""Many adapters in one batch: every example runs with its own adapter.

K adapters share a base as one *stack*: every adapted layer holds their A, B
(and DoRA magnitudes) along a new first axis, zero-padded to one rank, with
each adapter's own scale as data (`lora_scale`, shape (K,)). A `StackSpec` is
the stack's static shape: the layers, K, the rank, DoRA or not. The model
`inject(model, spec)` takes `adapter_ids` (one per example: the adapter's
index, or -1 for the base) as an extra keyword of its call; each layer runs
every example through all K adapters' A at once (K * r columns), keeps each
example's own adapter (weighed by its scale, the others by zero) and contracts
with all K B's at once, so one compiled program serves any mix of adapters and
no adapter is ever copied per example; any adapters that fit the spec share
the program (swapping the stack's values never recompiles).

Padding is exact: the padded rows of A and columns of B are zero, so they add
nothing and (their gradients being zero) stay zero in training. An
example's output is the output of the base plus its adapter alone; a layer
its adapter does not target adds zero. Built and filled by `lora_jax.stack`.
"""

from __future__ import annotations

import dataclasses
import string
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import _check_dtype, _check_rank
from lora_jax.layers import _align, _annotated, _dora_gain, _dropout, dora_output
from lora_jax.layout import Contraction, layout_of
from lora_jax.quantize import dequantize

BASE_ID = -1  # the adapter id of an example that runs on the base alone
SCALE, DORA = "lora_scale", "lora_dora"  # a stack's per-adapter settings (frozen params)


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """The static shape of an adapter stack: what one compiled program serves.

  Attributes:
    layers: module paths of the adapted layers (the union of the adapters').
    count: K, the number of adapter slots.
    max_rank: the rank every adapter is padded to.
    use_dora: whether the stack holds DoRA magnitudes (DoRA adapters and plain
      ones mix: a plain adapter's gain is 1).
    lora_dtype: dtype of A, B and the magnitudes.
    dropout_rate: adapter dropout in training (applies to every adapter).
  """

  layers: tuple[str, ...]
  count: int
  max_rank: int
  use_dora: bool = False
  lora_dtype: str = "float32"
  dropout_rate: float = 0.0

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
    if not layers or not all(isinstance(p, str) and p for p in layers):
      raise ValueError(f"StackSpec layers={self.layers!r}: must name at least one layer path")
    set_("layers", tuple(sorted(set(layers))))
    set_("count", _check_rank(self.count, "count"))
    set_("max_rank", _check_rank(self.max_rank, "max_rank"))
    set_("lora_dtype", _check_dtype(self.lora_dtype))
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"StackSpec dropout_rate={self.dropout_rate!r}: must be in [0, 1)")

  def selects(self, path: str) -> bool:
    """Whether the linear layer at module `path` holds stacked adapters."""
    return path in self.layers


_ids = threading.local()  # the adapter ids of the outermost injected call in progress


def set_ids(ids: jax.Array | None) -> Any:
  """Sets the adapter ids the layers read; returns the previous ones."""
  previous = getattr(_ids, "value", None)
  _ids.value = ids
  return previous


def check_ids(ids: Any, spec: StackSpec, batch: int | None) -> jax.Array:
  """`ids` as an int32 vector, checked where its values are known."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"adapter_ids must be a vector of integers (one per example), got "
                     f"{ids.dtype} of shape {ids.shape}")
  if batch is not None and ids.shape[0] != batch:
    raise ValueError(f"adapter_ids has {ids.shape[0]} ids for a batch of {batch} examples")
  if not isinstance(ids, jax.core.Tracer):
    bad = [int(i) for i in jax.device_get(ids) if not BASE_ID <= int(i) < spec.count]
    if bad:
      raise ValueError(f"adapter id {bad[0]} is out of range: the stack holds {spec.count} "
                       f"adapters (ids 0..{spec.count - 1}, or {BASE_ID} for the base)")
  return ids.astype(jnp.int32)


def add_stacked_adapters(module: nn.Module, spec: StackSpec, contraction: Contraction,
                         inputs: jax.Array, outputs: jax.Array, *,
                         deterministic: bool | None = None) -> jax.Array:
  """Adds each example's adapter update to a linear layer's `outputs`.

  Creates the stacked `lora_a`, `lora_b`, `lora_scale` (and `lora_magnitude`,
  `lora_dora`) beside the layer's kernel, all zero (the stack's values come
  from `lora_jax.stack`), and reads the adapter ids of the call in progress.
  Examples are the first axis of the layer's input. An example whose id is
  out of range gets NaN outputs (ids known outside a trace are checked first).
  """
  e = contraction.inputs[0]
  if e in contraction.kernel or e not in contraction.outputs:
    raise ValueError(f"layer '{'/'.join(module.path)}' ({','.join(contraction[:2])}->"
                     f"{contraction.outputs}): mixed batches need the first input axis to be "
                     "the examples, kept in the output and not in the kernel")
  ids = getattr(_ids, "value", None)
  if ids is None:
    ids = jnp.zeros((inputs.shape[0],), jnp.int32)  # creating params, or a one-adapter stack
  if ids.shape[0] != inputs.shape[0]:
    raise ValueError(f"adapter_ids has {ids.shape[0]} ids but layer '{'/'.join(module.path)}' "
                     f"sees {inputs.shape[0]} examples")
  raw_kernel = module.get_variable("params", "kernel")
  kernel = dequantize(nn.meta.unbox(raw_kernel))
  member = layout_of(contraction)
  layout = member.stacked()
  a_shape, b_shape, m_shape = layout.shapes(kernel.shape, spec.max_rank, spec.count)
  dtype = jnp.dtype(spec.lora_dtype)
  zeros = nn.initializers.zeros_init()
  lora_a = module.param("lora_a", _annotated(zeros, raw_kernel, layout, "a"), a_shape, dtype)
  lora_b = module.param("lora_b", _annotated(zeros, raw_kernel, layout, "b"), b_shape, dtype)
  scale = module.param(SCALE, zeros, (spec.count,), jnp.float32)

  valid = (ids >= 0) & (ids < spec.count)
  index = jnp.where(valid, ids, 0)
  # Each example's weight on every adapter: its scale on its own, 0 elsewhere; the
  # base's examples weigh nothing, and out-of-range ids poison their row with NaN.
  s = jnp.where(valid, jnp.take(scale, index), jnp.where(ids == BASE_ID, 0.0, jnp.nan))
  weights = jax.nn.one_hot(index, spec.count, dtype=jnp.float32) * s[:, None]
  compute = outputs.dtype
  dropped = _dropout(module, inputs, spec.dropout_rate, deterministic)
  x = (inputs if dropped is None else dropped).astype(compute)
  # Every example through every adapter's A (K * r columns, no per-example copy of
  # any adapter), weighed, then through all the B's at once.
  k = next(c for c in string.ascii_letters if c not in "".join(contraction) + member.rank)
  hidden = "".join(c for c in contraction.inputs if c not in member.contract) + k + member.rank
  precision = getattr(module, "precision", None)
  h = jnp.einsum(f"{contraction.inputs},{k}{member.letters('a')}->{hidden}", x,
                 layout.squeeze(lora_a, "a").astype(compute), precision=precision)
  h = h * _align(weights.astype(compute), e + k, hidden)
  update = jnp.einsum(f"{hidden},{k}{member.letters('b')}->{contraction.outputs}", h,
                      layout.squeeze(lora_b, "b").astype(compute), precision=precision)
  if not spec.use_dora:
    return outputs + update

  norm_init = lambda _, shape, dt: jnp.broadcast_to(
      member.column_norm(kernel.astype(jnp.float32)), shape).astype(dt)
  magnitude = module.param("lora_magnitude", _annotated(norm_init, raw_kernel, layout, "m"),
                           m_shape, dtype)
  dora = module.param(DORA, zeros, (spec.count,), jnp.float32)
  a32 = layout.squeeze(lora_a, "a").astype(jnp.float32)
  b32 = layout.squeeze(lora_b, "b").astype(jnp.float32)
  kernel32 = kernel.astype(jnp.float32)

  def norm(one):  # ||W + s A@B|| of one adapter: one kernel-sized temporary at a time
    a, b, s = one
    return member.column_norm(kernel32 + s * member.delta(a, b))

  norms = jax.lax.stop_gradient(jax.lax.map(norm, (a32, b32, scale)))
  gains = jnp.where(jnp.reshape(dora, (-1,) + (1,) * (norms.ndim - 1)) > 0,
                    _dora_gain(layout.squeeze(magnitude, "m"), norms), 1.0)
  gain = jnp.where(jnp.reshape(valid, (-1,) + (1,) * (norms.ndim - 1)),
                   jnp.take(gains, index, axis=0), 1.0)
  gain = _align(gain, e + member.letters("m"), contraction.outputs)
  return dora_output(module, contraction, kernel, x if dropped is not None else None,
                     outputs, update, gain)
