"""The adapter math, and LoRA versions of flax's linear layers.

Where an adapter's A, B and DoRA magnitude sit relative to the kernel is its
`Layout` (`lora_jax.layout`); `add_adapter` creates them in that layout and
computes the update, `merged_kernel` folds them into the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lora_jax.config import AdapterSpec
from lora_jax.layout import (
    Contraction, Layout, dense_contraction, dense_general_contraction, einsum_contraction,
    layout_of, read_layout)
from lora_jax.quantize import dequantize, is_quantized
from lora_jax.quantized_base import axes_of


def merged_kernel(kernel, lora_a, lora_b, scale: float, lora_magnitude=None,
                  layout: Layout | None = None) -> jax.Array:
  """`W + scale * A @ B` (DoRA: rescaled per output feature), in float32.

  Args:
    layout: the adapter's layout; read from the shapes when not given.
  """
  if layout is None:
    layout = read_layout(kernel.shape, lora_a.shape, lora_b.shape,
                         None if lora_magnitude is None else lora_magnitude.shape)
  a = layout.squeeze(lora_a, "a").astype(jnp.float32)
  b = layout.squeeze(lora_b, "b").astype(jnp.float32)
  w = kernel.astype(jnp.float32) + scale * layout.delta(a, b)
  if lora_magnitude is None:
    return w
  gain = _dora_gain(layout.squeeze(lora_magnitude, "m"), layout.column_norm(w))
  return _align(gain, layout.letters("m"), layout.kernel) * w


def _dora_gain(magnitude: jax.Array, norm: jax.Array) -> jax.Array:
  """m / ||W'|| in float32, with the norm rounded as the magnitude is stored.

  The magnitude starts as the kernel's norm in its own dtype; rounding the
  norm the same way keeps the gain exactly 1 at init for any `lora_dtype`.
  Where a column of W' is all zero its direction is undefined: the gain is 1
  there, so a zero column of the base stays the base's zero at init with
  finite gradients, and its B gets LoRA's gradient; its magnitude starts at 0
  and learns the column's size once B has moved.
  """
  norm = norm.astype(magnitude.dtype).astype(jnp.float32)
  nonzero = norm > 0
  return jnp.where(nonzero, magnitude.astype(jnp.float32) / jnp.where(nonzero, norm, 1.0), 1.0)


def _align(array: jax.Array, letters: str, target: str) -> jax.Array:
  """Transposes `array` (axes named by `letters`) to broadcast against `target`."""
  perm = [letters.index(c) for c in target if c in letters]
  shape = [array.shape[letters.index(c)] if c in letters else 1 for c in target]
  return jnp.reshape(jnp.transpose(array, perm), shape)


def _init_a(spec: AdapterSpec, fan_in: int):
  def init(key, shape, dtype):
    if spec.a_init == "gaussian":  # PEFT: normal_(std=1/r)
      return (jax.random.normal(key, shape, jnp.float32) / spec.rank).astype(dtype)
    # PEFT's kaiming_uniform_(a=sqrt(5)) on a (r, fan_in) weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def _annotated(init, raw_kernel: Any, layout: Layout, which: str):
  """`init` with partitioning names derived from the kernel's, if it has any,
  and its layout recorded while `recording_layouts` is on.

  Adapters must shard with their kernel: left unannotated they would be
  silently replicated on every device.
  """
  record = getattr(_recording, "on", False)
  names = (layout.axis_names(which, raw_kernel.names)
           if isinstance(raw_kernel, nn.Partitioned) else None)

  def boxed(*args):
    value = init(*args)
    if names is not None:
      value = raw_kernel.replace(value=value, names=names)
    return Recorded(value, layout) if record else value

  return boxed


class Recorded(struct.PyTreeNode, nn.meta.AxisMetadata):
  """An adapter param with its layout, as `lora_jax.layouts` traces a model.

  Flax's lifted transforms tell every box where they insert an axis, so the
  layout it ends with is exact, whatever the shapes.
  """

  value: Any
  layout: Layout = struct.field(pytree_node=False)

  def unbox(self) -> Any:
    return self.value

  def replace_boxed(self, val: Any) -> Recorded:
    return self.replace(value=val)

  def add_axis(self, index: int, params: dict[Any, Any]) -> Recorded:
    return self.replace(value=nn.meta.add_axis(self.value, index, params),
                        layout=self.layout.add_axis(index))

  def remove_axis(self, index: int, params: dict[Any, Any]) -> Recorded:
    return self.replace(value=nn.meta.remove_axis(self.value, index, params),
                        layout=self.layout.remove_axis(index))


_recording = threading.local()


@contextlib.contextmanager
def recording_layouts():
  """Within it, `add_adapter` boxes every adapter param in a `Recorded`."""
  previous = getattr(_recording, "on", False)
  _recording.on = True
  try:
    yield
  finally:
    _recording.on = previous


def _dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool | None) -> jax.Array | None:
  """The dropped-out input, or None when dropout is off."""
  if deterministic is None:
    deterministic = not module.has_rng("dropout")
  if rate == 0.0 or deterministic:
    return None
  if not module.has_rng("dropout"):
    raise ValueError(
        f"{type(module).__name__} at '{'/'.join(module.path)}': adapter dropout with "
        "deterministic=False needs a 'dropout' rng: apply(..., rngs={'dropout': key})")
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def add_adapter(
    module: nn.Module,
    spec: AdapterSpec,
    contraction: Contraction,
    inputs: jax.Array,
    outputs: jax.Array,
    *,
    deterministic: bool | None = None,
) -> jax.Array:
  """Adds the adapter's update to a linear layer's `outputs`.

  Creates `lora_a`, `lora_b` (and `lora_magnitude` with DoRA) beside the
  layer's `kernel`, in the same module scope. This is the one place the LoRA
  math lives: every LoRA layer and every injected layer calls it.

  Args:
    module: the bound linear layer; its `kernel` (and `bias`) exist already.
    spec: the adapter's settings.
    contraction: how the layer maps `inputs` to `outputs`.
    inputs: the layer's input.
    outputs: the base layer's output for `inputs`; its dtype is the compute
      dtype of the adapter path too, so float32 adapters never upcast a
      bfloat16 layer.
    deterministic: disables adapter dropout; `None` means dropout runs only
      when a `'dropout'` rng was given.

  Returns:
    `outputs + scale * (dropout(inputs) @ A) @ B`, or DoRA's
    `m / ||W + scale*A@B|| * (inputs @ (W + scale*A@B)) + bias`.
  """
  raw_kernel = module.get_variable("params", "kernel")
  # Dense for DoRA's norms (a quantized kernel's dequantization is dropped when unused).
  kernel = dequantize(nn.meta.unbox(raw_kernel))
  layout = layout_of(contraction)
  a_shape, b_shape, m_shape = layout.shapes(kernel.shape, spec.rank)
  fan_in = layout.fan_in(kernel.shape)
  dtype = jnp.dtype(spec.lora_dtype)
  lora_a = module.param("lora_a", _annotated(_init_a(spec, fan_in), raw_kernel, layout, "a"),
                        a_shape, dtype)
  lora_b = module.param("lora_b", _annotated(nn.initializers.zeros_init(), raw_kernel, layout, "b"),
                        b_shape, dtype)
  a, b = layout.squeeze(lora_a, "a"), layout.squeeze(lora_b, "b")

  compute = outputs.dtype
  precision = getattr(module, "precision", None)
  dropped = _dropout(module, inputs, spec.dropout_rate, deterministic)
  x = (inputs if dropped is None else dropped).astype(compute)
  update = _low_rank_update(contraction, layout, x, a.astype(compute), b.astype(compute),
                            jnp.asarray(spec.scale, compute), precision)
  if not spec.use_dora:
    return outputs + update

  # DoRA (Liu et al. 2024): y = m / ||W'|| * (x @ W') + bias with W' = W + scale*A@B.
  # ||W'|| is a constant for the backward pass (section 4.3 of the paper; PEFT does the same).
  norm_init = lambda _, shape, dt: jnp.reshape(
      layout.column_norm(kernel.astype(jnp.float32)), shape).astype(dt)
  magnitude = module.param("lora_magnitude", _annotated(norm_init, raw_kernel, layout, "m"),
                           m_shape, dtype)
  m = layout.squeeze(magnitude, "m")
  w = kernel.astype(jnp.float32) + spec.scale * layout.delta(a.astype(jnp.float32),
                                                             b.astype(jnp.float32))
  gain = _align(_dora_gain(m, jax.lax.stop_gradient(layout.column_norm(w))),
                layout.letters("m"), contraction.outputs)
  return dora_output(module, contraction, kernel, x if dropped is not None else None,
                     outputs, update, gain)


def dora_output(module: nn.Module, contraction: Contraction, kernel: jax.Array,
                dropped: jax.Array | None, outputs: jax.Array, update: jax.Array,
                gain: jax.Array) -> jax.Array:
  """DoRA's `gain * (x @ W + update) + bias`, given the base layer's `outputs`
  (`x @ W + bias`), the low-rank `update` and the gain `m / ||W'||` aligned to the
  outputs; `dropped` is the dropped-out input when dropout ran."""
  compute = outputs.dtype
  # gain - 1 in float32: near 1, bf16 steps of 2**-7 would swallow small magnitude updates.
  gain_minus_one, gain = (gain - 1).astype(compute), gain.astype(compute)
  if dropped is None:  # x @ W is the base output less its bias
    bias = module.get_variable("params", "bias")
    base = outputs
    if bias is not None:
      bias_letters = "".join(c for c in contraction.outputs if c in contraction.kernel)
      base = outputs - _align(nn.meta.unbox(bias).astype(compute), bias_letters, contraction.outputs)
  else:  # dropout changed the input: x @ W again, on the dropped input (as PEFT does)
    base = jnp.einsum(f"{contraction.inputs},{contraction.kernel}->{contraction.outputs}",
                      dropped, kernel.astype(compute),
                      precision=getattr(module, "precision", None))
  return outputs + gain_minus_one * base + gain * update


def base_output(module: nn.Module, contraction: Contraction, inputs: jax.Array,
                call: Any) -> jax.Array:
  """A linear layer's own output: `call()`, or on a quantized kernel the same
  contraction with the kernel dequantized to the compute dtype inside the step.

  Flax's dtype rule holds: the compute dtype is the layer's `dtype`, else the
  promotion of the input, kernel and bias dtypes.
  """
  if not module.has_variable("params", "kernel"):
    return call()
  kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
  if not is_quantized(kernel):
    return call()
  kernel = _gathered(kernel, axes_of("/".join(module.path)))
  bias = (nn.meta.unbox(module.get_variable("params", "bias"))
          if module.has_variable("params", "bias") else None)
  dtype = module.dtype or jnp.result_type(inputs, kernel.dtype,
                                          *([] if bias is None else [bias]))
  c = contraction
  outputs = jnp.einsum(f"{c.inputs},{c.kernel}->{c.outputs}", jnp.asarray(inputs, dtype),
                       kernel.dequantize(dtype), precision=getattr(module, "precision", None))
  if bias is not None:
    letters = "".join(ch for ch in c.outputs if ch in c.kernel)
    outputs = outputs + _align(bias.astype(dtype), letters, c.outputs)
  return outputs


def _gathered(kernel: Any, names: Sequence[str | None] | None) -> Any:
  """A quantized kernel's codes and block statistics gathered over the `fsdp` mesh axis
  (under the step's logical axis rules, its logical axis `names` from
  `lora_jax.quantized_base.kernel_axes`): FSDP gathers a kernel for its matmul, and this
  way 4 or 8 bits a weight cross the wire, not the dequantized compute dtype."""
  rules = nn.get_logical_axis_rules()
  if not rules or names is None or len(names) < kernel.codes.ndim:
    return kernel
  names = tuple(names)[len(names) - kernel.codes.ndim:]  # a layer of a stack: its own axes

  def fsdp(name: str | None) -> bool:
    axes = nn.logical_to_mesh_axes((name,), rules)[0] if name is not None else None
    return "fsdp" in (axes if isinstance(axes, tuple) else (axes,))

  kept = tuple(None if fsdp(name) else name for name in names)
  # The barrier keeps XLA from laying out (copying) the whole stacked codes for the gather.
  codes, absmax = jax.lax.optimization_barrier((kernel.codes, kernel.absmax))
  return kernel.replace(codes=nn.with_logical_constraint(codes, kept),
                        absmax=nn.with_logical_constraint(absmax, kept))


def _low_rank_update(contraction: Contraction, layout: Layout, x: jax.Array, a: jax.Array,
                     b: jax.Array, scale: jax.Array, precision: Any) -> jax.Array:
  """`scale * (x @ A) @ B` in the layout of the layer's output; A @ B is never formed."""
  lead = contraction.inputs[:len(contraction.inputs) - len(layout.contract)]
  if (layout.a == layout.contract + layout.rank and layout.b == layout.rank + layout.free
      and contraction.inputs == lead + layout.contract
      and contraction.outputs == lead + layout.free):
    # Dense-like, (tokens..., in) -> (tokens..., out): two 2-D matmuls over all tokens.
    # As einsums over (batch, seq, ...) XLA:CPU computes B's gradient from a transposed
    # copy of the output's cotangent, 13% of a 124M-param Llama's train step.
    rank = a.shape[-1]
    h = jnp.dot(x.reshape(-1, a.size // rank), a.reshape(-1, rank), precision=precision)
    h = h * scale  # scaling the rank-sized activation is cheapest
    out_shape = x.shape[:len(lead)] + b.shape[1:]
    return jnp.dot(h, b.reshape(rank, -1), precision=precision).reshape(out_shape)
  hidden = "".join(c for c in contraction.inputs if c not in layout.contract) + layout.rank
  h = jnp.einsum(f"{contraction.inputs},{layout.letters('a')}->{hidden}", x, a,
                 precision=precision)
  h = h * scale
  return jnp.einsum(f"{hidden},{layout.letters('b')}->{contraction.outputs}", h, b,
                    precision=precision)


class _Adapted(nn.Module):
  """The LoRA fields shared by every LoRA layer (keyword-only)."""

  rank: int = dataclasses.field(default=8, kw_only=True)
  alpha: float = dataclasses.field(default=8.0, kw_only=True)
  use_rslora: bool = dataclasses.field(default=False, kw_only=True)
  dropout_rate: float = dataclasses.field(default=0.0, kw_only=True)
  a_init: str = dataclasses.field(default="kaiming_uniform", kw_only=True)
  use_dora: bool = dataclasses.field(default=False, kw_only=True)
  lora_dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)
  deterministic: bool | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    self.adapter_spec  # validates the fields as soon as the layer is built
    super().__post_init__()

  @property
  def adapter_spec(self) -> AdapterSpec:
    return AdapterSpec(
        rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora,
        dropout_rate=self.dropout_rate, a_init=self.a_init, use_dora=self.use_dora,
        lora_dtype=self.lora_dtype)

  def _adapt(self, contraction, inputs, outputs, deterministic):
    if deterministic is None:
      deterministic = self.deterministic
    return add_adapter(self, self.adapter_spec, contraction, inputs, outputs,
                       deterministic=deterministic)


class LoRADense(nn.Dense, _Adapted):
  """`nn.Dense` with a LoRA adapter: `y = x @ W + b + scale * (dropout(x) @ A) @ B`.

  The fields and params of `nn.Dense` are kept, so a `Dense` checkpoint loads
  unchanged; `lora_a` has shape `(fan_in, rank)` and `lora_b` `(rank,
  features)`; with `use_dora`, `lora_magnitude` has shape `(features,)`.

  Attributes:
    rank: r (default 8).
    alpha: scale numerator; the scale is alpha / r (default 8, as in PEFT).
    use_rslora: scale by alpha / sqrt(r).
    dropout_rate: dropout on the adapter's input only.
    a_init: 'kaiming_uniform' (PEFT's default) or 'gaussian'; B starts at zero
      so the layer starts as the base layer.
    use_dora: DoRA: a trainable magnitude per output feature.
    lora_dtype: dtype of the adapter params (float32 even for a bf16 base).
    deterministic: default for the call argument of the same name; `None`
      runs adapter dropout exactly when a `'dropout'` rng is given.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = LoRADense(4, rank=2)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'params': {'bias': (4,), 'kernel': (3, 4), 'lora_a': (3, 2), 'lora_b': (2, 4)}}
  """

  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    contraction = dense_contraction(jnp.ndim(inputs))
    outputs = base_output(self, contraction, inputs, lambda: super(LoRADense, self).__call__(inputs))
    return self._adapt(contraction, inputs, outputs, deterministic)


class LoRADenseGeneral(nn.DenseGeneral, _Adapted):
  """`nn.DenseGeneral` with a LoRA adapter.

  The kernel has shape `batch + contracting + features` (`batch` from
  `batch_dims`, `contracting` the input sizes along `axis`); `lora_a` has
  shape `batch + contracting + (rank,)`, `lora_b` `batch + (rank,) +
  features`, and DoRA's `lora_magnitude` `batch + features`.

  Attributes:
    (as `LoRADense`)

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = LoRADenseGeneral((4, 5), axis=(-2, -1), rank=2, use_dora=True)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3, 6)))
    >>> jax.tree.map(jnp.shape, params)
    {'params': {'bias': (4, 5), 'kernel': (3, 6, 4, 5), 'lora_a': (3, 6, 2), 'lora_b': (2, 4, 5), 'lora_magnitude': (4, 5)}}
  """

  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    n_features = len(self.features) if isinstance(self.features, (tuple, list)) else 1
    contraction = dense_general_contraction(jnp.ndim(inputs), self.axis, self.batch_dims, n_features)
    outputs = base_output(self, contraction, inputs,
                          lambda: super(LoRADenseGeneral, self).__call__(inputs))
    return self._adapt(contraction, inputs, outputs, deterministic)


class LoRAEinsum(nn.Einsum, _Adapted):
  """`nn.Einsum` with a LoRA adapter.

  Kernel axes contracted with the input belong to `lora_a`, axes kept in the
  output to `lora_b`. When the kernel lists its contracting axes before its
  output axes (`'btd,dnh->btnh'`, kernel `(d, n, h)`), `lora_a` is
  `contracting + (rank,)` and `lora_b` `(rank,) + output`. Otherwise
  (`'btd,ndh->btnh'`) both keep all kernel axes, size 1 where the axis is not
  theirs, rank last: `lora_a (1, d, 1, rank)`, `lora_b (n, 1, h, rank)`.
  Axes in the input, kernel and output are carried by both.

  Attributes:
    (as `LoRADense`)

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = LoRAEinsum((6, 3, 5), 'btd,ndh->btnh', rank=2)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 2, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'params': {'bias': (6, 5), 'kernel': (6, 3, 5), 'lora_a': (1, 3, 1, 2), 'lora_b': (6, 1, 5, 2)}}
  """

  @nn.compact
  def __call__(
      self, inputs: jax.Array, einsum_str: str | None = None, *, deterministic: bool | None = None
  ) -> jax.Array:
    equation = einsum_str if einsum_str is not None else self.einsum_str
    contraction = einsum_contraction(equation, jnp.shape(inputs), self.shape)
    outputs = base_output(self, contraction, inputs,
                          lambda: super(LoRAEinsum, self).__call__(inputs, einsum_str))
    return self._adapt(contraction, inputs, outputs, deterministic)
