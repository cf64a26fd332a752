"""The adapter math, and LoRA versions of flax's linear layers.

Every linear layer is described by how it contracts its input with its kernel,
as einsum letters (a `Contraction`). From that follows where the adapter's A
and B live:

* contracting axes of the kernel (summed with the input) belong to A,
* output axes of the kernel belong to B,
* shared axes (in the input, the kernel and the output: `DenseGeneral`'s
  `batch_dims`, the layer axis of `nn.scan`) belong to both.

When the kernel is laid out as shared, contracting, then output axes (every
`Dense` and `DenseGeneral`, most einsums) A and B are *compact*:
`A: shared + contracting + (r,)`, `B: shared + (r,) + output`. Otherwise (e.g.
Gemma's `'BTD,NDH->BTNH'`, kernel `(N, D, H)`) both keep every kernel axis, with
size 1 where the axis is not theirs, and the rank last: `A: (1, D, 1, r)`,
`B: (N, 1, H, r)`. Either way the layout can be read back from the shapes
alone, which is what `merge` does.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import opt_einsum

from lora_jax.config import AdapterSpec


class Contraction(NamedTuple):
  """A linear layer as einsum letters: `outputs = einsum(inputs, kernel)`."""

  inputs: str
  kernel: str
  outputs: str


def dense_contraction(ndim: int) -> Contraction:
  """`nn.Dense`: the last input axis with the kernel's first."""
  letters = string.ascii_letters[:ndim + 1]
  batch, i, o = letters[:ndim - 1], letters[ndim - 1], letters[ndim]
  return Contraction(batch + i, i + o, batch + o)


def dense_general_contraction(
    ndim: int, axis: Any, batch_dims: Any, n_features: int
) -> Contraction:
  """`nn.DenseGeneral`: kernel = batch_dims + axis + features axes."""
  # Sorted, as flax orders the kernel's axes by input position whatever order `axis` has.
  axes = lambda a: tuple(sorted(int(d) % ndim for d in (a if isinstance(a, (tuple, list)) else (a,))))
  axis, batch = axes(axis), axes(batch_dims)
  x = string.ascii_letters[:ndim]
  feats = string.ascii_letters[ndim:ndim + n_features]
  shared = "".join(x[d] for d in batch)
  rest = "".join(x[d] for d in range(ndim) if d not in axis + batch)
  return Contraction(x, shared + "".join(x[d] for d in axis) + feats, shared + rest + feats)


def einsum_contraction(equation: str, input_shape, kernel_shape) -> Contraction:
  """`nn.Einsum`: the equation with any ellipsis spelled out."""
  operands, outputs, _ = opt_einsum.parser.parse_einsum_input(
      (equation.replace(" ", ""), jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
       jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)))
  inputs, kernel = operands.split(",")
  return Contraction(inputs, kernel, outputs)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Which kernel axes an adapter's A, B and DoRA magnitude carry."""

  kernel: str
  contract: str
  shared: str
  rank: str

  @property
  def free(self) -> str:
    return "".join(c for c in self.kernel if c not in self.contract + self.shared)

  @property
  def compact(self) -> bool:
    return self.kernel == self.shared + self.contract + self.free

  # Letters of the stored arrays with their size-1 placeholder axes dropped.
  @property
  def a_letters(self) -> str:
    return "".join(c for c in self.kernel if c not in self.free) + self.rank

  @property
  def b_letters(self) -> str:
    if self.compact:
      return self.shared + self.rank + self.free
    return "".join(c for c in self.kernel if c not in self.contract) + self.rank

  @property
  def magnitude_letters(self) -> str:
    return "".join(c for c in self.kernel if c not in self.contract)

  def stored_axes(self, which: str) -> tuple[str | None, ...]:
    """The letter of each stored axis of `'a'`, `'b'` or `'m'` (magnitude).

    `None` marks a size-1 placeholder axis.
    """
    letters = {"a": self.a_letters, "b": self.b_letters, "m": self.magnitude_letters}[which]
    if self.compact:
      return tuple(letters)
    rank = (self.rank,) if which != "m" else ()
    return tuple(c if c in letters else None for c in self.kernel) + rank

  def shapes(self, kernel_shape, rank: int) -> tuple[tuple[int, ...], ...]:
    """Stored shapes of A, B and the magnitude for a kernel of that shape."""
    size = dict(zip(self.kernel, kernel_shape), **{self.rank: rank})
    return tuple(tuple(size[c] if c else 1 for c in self.stored_axes(w)) for w in "abm")

  def axis_names(self, which: str, kernel_names) -> tuple[str | None, ...]:
    """Logical axis names of A, B or the magnitude, from the kernel's names.

    Each adapter axis takes the name of the kernel axis it spans; the rank
    axis and placeholders get `None` (replicated).
    """
    name = dict(zip(self.kernel, kernel_names))
    return tuple(name.get(c) for c in self.stored_axes(which))

  def squeeze(self, array: jax.Array, letters: str, kernel_shape, rank: int = 1) -> jax.Array:
    """Drops size-1 placeholder axes so `array` matches `letters`."""
    size = dict(zip(self.kernel, kernel_shape), **{self.rank: rank})
    return jnp.reshape(array, tuple(size[c] for c in letters))

  def delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B in the kernel's layout (squeezed A and B)."""
    return jnp.einsum(f"{self.a_letters},{self.b_letters}->{self.kernel}", a, b,
                      precision=jax.lax.Precision.HIGHEST)  # TPUs default to bf16 passes

  def column_norm(self, w: jax.Array) -> jax.Array:
    """||w|| per output feature (over the contracting axes): magnitude letters."""
    axes = tuple(i for i, c in enumerate(self.kernel) if c in self.contract)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=axes))


def geometry_of(contraction: Contraction) -> Geometry:
  """The adapter geometry of a layer, from its contraction."""
  x, k, o = contraction
  contract = "".join(c for c in k if c in x and c not in o)
  shared = "".join(c for c in k if c in x and c in o)
  orphan = [c for c in k if c not in x and c not in o]
  if orphan or len(set(k)) != len(k):
    raise ValueError(
        f"cannot add an adapter to a kernel '{k}' in '{x},{k}->{o}': every kernel axis "
        "must be contracted with the input or appear in the output, once")
  if not contract:
    raise ValueError(f"cannot add an adapter to '{x},{k}->{o}': the kernel contracts no input axis")
  rank = next(c for c in string.ascii_letters if c not in x + k + o)
  return Geometry(k, contract, shared, rank)


def geometry_from_shapes(kernel_shape, a_shape, b_shape) -> Geometry:
  """Reads an adapter's layout back from the shapes of kernel, A and B.

  Raises:
    ValueError: when A and B fit the kernel in no layout.
  """
  k, a, b = len(kernel_shape), len(a_shape), len(b_shape)
  letters = string.ascii_letters[:k]
  rank = string.ascii_letters[k]
  kernel_shape, a_shape, b_shape = tuple(kernel_shape), tuple(a_shape), tuple(b_shape)
  s = a + b - k - 2
  c = a - s - 1
  if s >= 0 and c >= 1 and b - s - 1 >= 0:  # compact: shared + contract (+ r) / shared + r + free
    r = a_shape[-1]
    if (a_shape == kernel_shape[:s + c] + (r,)
        and b_shape == kernel_shape[:s] + (r,) + kernel_shape[s + c:]):
      return Geometry(letters, letters[s:s + c], letters[:s], rank)
  elif a == b == k + 1 and a_shape[-1] == b_shape[-1]:  # size-1 placeholders, rank last
    contract, shared, ok = "", "", True
    for letter, kd, ad, bd in zip(letters, kernel_shape, a_shape, b_shape):
      if ad == kd and bd == kd:
        shared += letter
      elif ad == kd and bd == 1:
        contract += letter
      elif not (ad == 1 and bd == kd):
        ok = False
    if ok and contract:
      return Geometry(letters, contract, shared, rank)
  raise ValueError(
      f"lora_a {a_shape} and lora_b {b_shape} do not fit kernel {kernel_shape} in any adapter "
      "layout (A: [shared] + contracting + (r,), B: [shared] + (r,) + output)")


def merged_kernel(kernel, lora_a, lora_b, scale: float, lora_magnitude=None) -> jax.Array:
  """`W + scale * A @ B` (DoRA: rescaled per output feature), in float32."""
  geom = geometry_from_shapes(kernel.shape, lora_a.shape, lora_b.shape)
  rank = lora_a.shape[-1]
  a = geom.squeeze(lora_a, geom.a_letters, kernel.shape, rank).astype(jnp.float32)
  b = geom.squeeze(lora_b, geom.b_letters, kernel.shape, rank).astype(jnp.float32)
  w = kernel.astype(jnp.float32) + scale * geom.delta(a, b)
  if lora_magnitude is None:
    return w
  m = geom.squeeze(lora_magnitude, geom.magnitude_letters, kernel.shape)
  gain = _dora_gain(m, geom.column_norm(w))
  return _align(gain, geom.magnitude_letters, geom.kernel) * w


def _dora_gain(magnitude: jax.Array, norm: jax.Array) -> jax.Array:
  """m / ||W'|| in float32, with the norm rounded as the magnitude is stored.

  The magnitude starts as the kernel's norm in its own dtype; rounding the
  norm the same way keeps the gain exactly 1 at init for any `lora_dtype`.
  """
  norm = norm.astype(magnitude.dtype).astype(jnp.float32)
  return magnitude.astype(jnp.float32) / norm


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


def _annotated(init, raw_kernel: Any, geom: Geometry, which: str):
  """`init` with partitioning names derived from the kernel's, if it has any.

  Adapters must shard with their kernel: left unannotated they would be
  silently replicated on every device.
  """
  if not isinstance(raw_kernel, nn.Partitioned):
    return init
  names = geom.axis_names(which, raw_kernel.names)
  return lambda *args: raw_kernel.replace(value=init(*args), names=names)


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
  kernel = nn.meta.unbox(raw_kernel)
  geom = geometry_of(contraction)
  a_shape, b_shape, m_shape = geom.shapes(kernel.shape, spec.rank)
  fan_in = math.prod(kernel.shape[geom.kernel.index(c)] for c in geom.contract)
  dtype = jnp.dtype(spec.lora_dtype)
  lora_a = module.param("lora_a", _annotated(_init_a(spec, fan_in), raw_kernel, geom, "a"),
                        a_shape, dtype)
  lora_b = module.param("lora_b", _annotated(nn.initializers.zeros_init(), raw_kernel, geom, "b"),
                        b_shape, dtype)
  a = geom.squeeze(lora_a, geom.a_letters, kernel.shape, spec.rank)
  b = geom.squeeze(lora_b, geom.b_letters, kernel.shape, spec.rank)

  compute = outputs.dtype
  precision = getattr(module, "precision", None)
  dropped = _dropout(module, inputs, spec.dropout_rate, deterministic)
  x = (inputs if dropped is None else dropped).astype(compute)
  update = _low_rank_update(contraction, geom, x, a.astype(compute), b.astype(compute),
                            jnp.asarray(spec.scale, compute), precision)
  if not spec.use_dora:
    return outputs + update

  # DoRA (Liu et al. 2024): y = m / ||W'|| * (x @ W') + bias with W' = W + scale*A@B.
  # ||W'|| is a constant for the backward pass (section 4.3 of the paper; PEFT does the same).
  norm_init = lambda _, shape, dt: jnp.reshape(
      geom.column_norm(kernel.astype(jnp.float32)), shape).astype(dt)
  magnitude = module.param("lora_magnitude", _annotated(norm_init, raw_kernel, geom, "m"),
                           m_shape, dtype)
  m = geom.squeeze(magnitude, geom.magnitude_letters, kernel.shape)
  w = kernel.astype(jnp.float32) + spec.scale * geom.delta(a.astype(jnp.float32), b.astype(jnp.float32))
  gain = _align(_dora_gain(m, jax.lax.stop_gradient(geom.column_norm(w))),
                geom.magnitude_letters, contraction.outputs)
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
                      x, kernel.astype(compute), precision=precision)
  return outputs + gain_minus_one * base + gain * update


def _low_rank_update(contraction: Contraction, geom: Geometry, x: jax.Array, a: jax.Array,
                     b: jax.Array, scale: jax.Array, precision: Any) -> jax.Array:
  """`scale * (x @ A) @ B` in the layout of the layer's output; A @ B is never formed."""
  lead = contraction.inputs[:len(contraction.inputs) - len(geom.contract)]
  if (geom.compact and not geom.shared and contraction.inputs == lead + geom.contract
      and contraction.outputs == lead + geom.free):
    # Dense-like, (tokens..., in) -> (tokens..., out): two 2-D matmuls over all tokens.
    # As einsums over (batch, seq, ...) XLA:CPU computes B's gradient from a transposed
    # copy of the output's cotangent, 13% of a 124M-param Llama's train step.
    rank = a.shape[-1]
    h = jnp.dot(x.reshape(-1, a.size // rank), a.reshape(-1, rank), precision=precision)
    h = h * scale  # scaling the rank-sized activation is cheapest
    out_shape = x.shape[:len(lead)] + b.shape[1:]
    return jnp.dot(h, b.reshape(rank, -1), precision=precision).reshape(out_shape)
  hidden = "".join(c for c in contraction.inputs if c not in geom.contract) + geom.rank
  h = jnp.einsum(f"{contraction.inputs},{geom.a_letters}->{hidden}", x, a, precision=precision)
  h = h * scale
  return jnp.einsum(f"{hidden},{geom.b_letters}->{contraction.outputs}", h, b,
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
    outputs = super().__call__(inputs)
    return self._adapt(dense_contraction(jnp.ndim(inputs)), inputs, outputs, deterministic)


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
    outputs = super().__call__(inputs)
    n_features = len(self.features) if isinstance(self.features, (tuple, list)) else 1
    contraction = dense_general_contraction(jnp.ndim(inputs), self.axis, self.batch_dims, n_features)
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
    outputs = super().__call__(inputs, einsum_str)
    equation = einsum_str if einsum_str is not None else self.einsum_str
    contraction = einsum_contraction(equation, jnp.shape(inputs), self.shape)
    return self._adapt(contraction, inputs, outputs, deterministic)
