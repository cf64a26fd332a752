"""Where an adapter's axes sit relative to its kernel's: its `Layout`.

Every linear layer is described by how it contracts its input with its kernel,
as einsum letters (a `Contraction`). From that follows where the adapter's A
and B live:

* contracting axes of the kernel (summed with the input) belong to A,
* output axes of the kernel belong to B,
* shared axes (in the input, the kernel and the output: `DenseGeneral`'s
  `batch_dims`) belong to both.

When the kernel is laid out as shared, contracting, then output axes (every
`Dense` and `DenseGeneral`, most einsums) A and B are *compact*:
`A: shared + contracting + (r,)`, `B: shared + (r,) + output`. Otherwise (e.g.
Gemma's `'BTD,NDH->BTNH'`, kernel `(N, D, H)`) both keep every kernel axis, with
size 1 where the axis is not theirs, and the rank last: `A: (1, D, 1, r)`,
`B: (N, 1, H, r)`.

Lifted transforms (`nn.scan`, `nn.vmap` with `variable_axes`) then insert an
axis at the same index of every param of the layer; `Layout.add_axis` follows
them exactly. A `Layout` names each stored axis of A, B and the DoRA magnitude
by the kernel axis it spans. `lora_jax.layouts(model, ...)` records every
adapter's layout by tracing the model (flax tells each param where its lifted
transforms insert axes), and `merge`, `param_shardings` and `load_adapter`
take that record. Without one, `read_layout` finds the layouts that fit the
shapes of a layer's arrays and refuses, naming them, when two of them would
compute different things.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import opt_einsum

PLACEHOLDER = "_"  # a stored axis of size 1 that spans no kernel axis


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
class Layout:
  """Which kernel axis each stored axis of an adapter's arrays spans.

  Letters name axes: one per kernel axis, `rank` for the adapter's own axis,
  `'_'` for a size-1 placeholder.

  Attributes:
    kernel: the kernel's axes, in order.
    contract: the kernel axes summed with the input (A's alone).
    rank: the letter of the rank axis.
    a: the stored axes of `lora_a`.
    b: the stored axes of `lora_b`.
    m: the stored axes of the DoRA magnitude `lora_magnitude`.
    stack: for several adapters stacked in one array (`lora_jax.stack`), the
      letter of their axis; A, B and the magnitude carry it, the kernel does not.
  """

  kernel: str
  contract: str
  rank: str
  a: str
  b: str
  m: str
  stack: str = ""

  @property
  def shared(self) -> str:
    """Kernel axes that A and B both carry (batch dims, lifted axes)."""
    return "".join(c for c in self.kernel if c in self.a and c in self.b)

  @property
  def free(self) -> str:
    """Kernel axes of the output (B's alone)."""
    return "".join(c for c in self.kernel if c not in self.contract + self.shared)

  def add_axis(self, index: int) -> Layout:
    """The layout after a lifted transform inserts an axis at `index` of every
    param (a negative index counts from the end of each, as `jnp.expand_dims`)."""
    new = next(c for c in string.ascii_letters if c not in self.kernel + self.rank + self.stack)
    at = lambda s: index if index >= 0 else len(s) + 1 + index
    insert = lambda s: s[:at(s)] + new + s[at(s):]
    return Layout(insert(self.kernel), self.contract, self.rank, insert(self.a),
                  insert(self.b), insert(self.m), self.stack)

  def remove_axis(self, index: int) -> Layout:
    """The inverse of `add_axis`."""
    at = lambda s: index if index >= 0 else len(s) + index
    drop = lambda s: s[:at(s)] + s[at(s) + 1:]
    return Layout(drop(self.kernel), self.contract, self.rank, drop(self.a), drop(self.b),
                  drop(self.m), self.stack)

  def stacked(self) -> Layout:
    """The layout of adapters stacked along a new first axis of A, B and the magnitude."""
    if self.stack:
      raise ValueError(f"the layout is stacked already ({self})")
    new = next(c for c in string.ascii_letters if c not in self.kernel + self.rank)
    return Layout(self.kernel, self.contract, self.rank, new + self.a, new + self.b,
                  new + self.m, new)

  def member(self) -> Layout:
    """One adapter of a stack: the layout without the stack axis."""
    drop = lambda s: s.replace(self.stack, "") if self.stack else s
    return Layout(self.kernel, self.contract, self.rank, drop(self.a), drop(self.b),
                  drop(self.m))

  def stack_axis(self, which: str) -> int:
    """The index of the stack axis in the stored `'a'`, `'b'` or `'m'`."""
    if not self.stack:
      raise ValueError(f"the layout is not stacked ({self})")
    return getattr(self, which).index(self.stack)

  def count_of(self, a_shape) -> int:
    """The number of stacked adapters in a `lora_a` of this shape (1 unstacked)."""
    return a_shape[self.a.index(self.stack)] if self.stack else 1

  def rank_of(self, a_shape) -> int:
    """The rank of an adapter whose `lora_a` has this shape."""
    return a_shape[self.a.index(self.rank)]

  def check_fits(self, kernel_shape, a_shape, b_shape, m_shape=None) -> None:
    """Raises `ValueError` unless arrays of these shapes are stored in this layout."""
    rank, count = ((self.rank_of(a_shape), self.count_of(a_shape))
                   if len(a_shape) == len(self.a) else (0, 0))
    expected = (self.shapes(kernel_shape, rank, count) if len(kernel_shape) == len(self.kernel)
                else None)
    got = (tuple(a_shape), tuple(b_shape), None if m_shape is None else tuple(m_shape))
    if expected is None or expected[:2] != got[:2] or got[2] not in (None, expected[2]):
      raise ValueError(f"lora_a {got[0]}, lora_b {got[1]} and kernel {tuple(kernel_shape)} are "
                       f"not stored as the recorded layout says ({self})")

  def stored_axes(self, which: str) -> tuple[str | None, ...]:
    """The kernel letter (or rank) of each stored axis of `'a'`, `'b'` or `'m'`;
    `None` for a placeholder."""
    return tuple(None if c == PLACEHOLDER else c for c in getattr(self, which))

  def _sizes(self, kernel_shape, rank: int = 1, count: int = 1) -> dict[str, int]:
    sizes = dict(zip(self.kernel, kernel_shape), **{self.rank: rank, PLACEHOLDER: 1})
    if self.stack:
      sizes[self.stack] = count
    return sizes

  def shapes(self, kernel_shape, rank: int, count: int = 1) -> tuple[tuple[int, ...], ...]:
    """Stored shapes of A, B and the magnitude for a kernel of that shape (`count`
    adapters, for a stacked layout)."""
    size = self._sizes(kernel_shape, rank, count)
    return tuple(tuple(size[c] for c in getattr(self, w)) for w in "abm")

  def axis_names(self, which: str, kernel_names) -> tuple[str | None, ...]:
    """Logical axis names of A, B or the magnitude, from the kernel's names.

    Each adapter axis takes the name of the kernel axis it spans; the rank
    axis, a stack's axis and placeholders get `None` (replicated).
    """
    name = dict(zip(self.kernel, kernel_names))
    return tuple(name.get(c) for c in self.stored_axes(which))

  def letters(self, which: str) -> str:
    """The axes of `'a'`, `'b'` or `'m'` once `squeeze` dropped the placeholders."""
    return getattr(self, which).replace(PLACEHOLDER, "")

  def squeeze(self, array: jax.Array, which: str) -> jax.Array:
    """`array` (stored as `'a'`, `'b'` or `'m'`) without its placeholder axes."""
    axes = tuple(i for i, c in enumerate(getattr(self, which)) if c == PLACEHOLDER)
    return jnp.squeeze(array, axes) if axes else array

  def delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B in the kernel's layout (squeezed A and B)."""
    return jnp.einsum(f"{self.letters('a')},{self.letters('b')}->{self.kernel}", a, b,
                      precision=jax.lax.Precision.HIGHEST)  # TPUs default to bf16 passes

  def column_norm(self, w: jax.Array) -> jax.Array:
    """||w|| per output feature (over the contracting axes), as `letters('m')`."""
    axes = tuple(i for i, c in enumerate(self.kernel) if c in self.contract)
    norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes))
    kept = "".join(c for c in self.kernel if c not in self.contract)
    return jnp.transpose(norm, [kept.index(c) for c in self.letters("m")])

  def kernel_shape(self, a_shape, b_shape) -> tuple[int, ...] | None:
    """The kernel shape that an adapter with arrays of these shapes fits in this
    layout (unstacked), or None when it fits none."""
    a, b = tuple(a_shape), tuple(b_shape)
    if len(a) != len(self.a) or len(b) != len(self.b):
      return None
    kernel = tuple(a[self.a.index(c)] if c in self.a else b[self.b.index(c)]
                   for c in self.kernel)
    return kernel if self.shapes(kernel, self.rank_of(a))[:2] == (a, b) else None

  def roles(self, a_shape, b_shape) -> tuple:
    """What A and B of these shapes are in this layout, whatever its letters or the
    kernel: each stored axis is the rank, contracting (`'in'`), output (`'out'`) or
    shared with an axis of the other array; size-1 axes are the same in any role."""
    def roles(mine: str, theirs: str, shape, alone: str) -> tuple:
      return tuple("r" if c == self.rank else None if size == 1 else
                   ("s", theirs.index(c)) if c in theirs else alone
                   for c, size in zip(mine, shape))
    return roles(self.a, self.b, a_shape, "in"), roles(self.b, self.a, b_shape, "out")

  def fan_in(self, kernel_shape) -> int:
    size = self._sizes(kernel_shape)
    return math.prod(size[c] for c in self.contract)

  def _meaning(self, kernel_shape) -> tuple:
    """What the layout computes: every stored axis as a kernel position, rank
    or nothing; size-1 kernel axes count as nothing (any role gives the same sums)."""
    size = self._sizes(kernel_shape)
    def axis(c):
      if c == self.rank:
        return "r"
      if c == self.stack:
        return "s"
      return None if size[c] == 1 else self.kernel.index(c)
    return tuple(tuple(map(axis, getattr(self, w))) for w in "abm")

  def __str__(self) -> str:
    stack = f", stacked along {self.stack}" if self.stack else ""
    return (f"kernel {self.kernel}: A {self.a}, B {self.b}, magnitude {self.m} "
            f"(rank {self.rank}{stack})")


def layout_of(contraction: Contraction) -> Layout:
  """The adapter layout of a layer, from its contraction."""
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
  free = "".join(c for c in k if c not in contract + shared)
  if k == shared + contract + free:
    return Layout(k, contract, rank, shared + contract + rank, shared + rank + free,
                  shared + free)
  hole = lambda drop: "".join(PLACEHOLDER if c in drop else c for c in k)
  return Layout(k, contract, rank, hole(free) + rank, hole(contract) + rank, hole(contract))


def read_layout(kernel_shape, a_shape, b_shape, m_shape=None) -> Layout:
  """The layout of an adapter whose arrays have these shapes, where no record says it.

  Every layout the library makes fits: compact or full, with axes inserted by
  lifted transforms at any index.

  Raises:
    ValueError: when no layout fits, or when layouts that compute different
      things fit (shapes that coincide, say a layer axis as long as the rank).
  """
  shapes = tuple(tuple(s) for s in (kernel_shape, a_shape, b_shape)) + (
      None if m_shape is None else tuple(m_shape),)
  found = _readings(*shapes)  # one layout per meaning
  if len(found) == 1:
    return found[0]
  what = (f"lora_a {shapes[1]} and lora_b {shapes[2]}"
          + ("" if m_shape is None else f" and lora_magnitude {shapes[3]}"))
  if not found:
    raise ValueError(
        f"{what} do not fit kernel {shapes[0]} in any adapter layout (A: [shared] + "
        "contracting + (r,), B: [shared] + (r,) + output, or both with every kernel axis "
        "and the rank last; plus axes that nn.scan/nn.vmap inserted)")
  raise ValueError(f"{what} fit kernel {shapes[0]} in {len(found)} layouts that compute "
                   f"different things: {'; '.join(map(str, found))}. Pass the "
                   "recorded ones: layouts=lora_jax.layouts(model, *sample_args)")


def find_layout(kernel_shape, a_shape, b_shape, m_shape=None, record: Layout | None = None
                ) -> Layout:
  """The recorded layout, checked against the shapes; without a record, `read_layout`."""
  if record is None:
    return read_layout(kernel_shape, a_shape, b_shape, m_shape)
  record.check_fits(kernel_shape, a_shape, b_shape, m_shape)
  return record


@functools.lru_cache(maxsize=4096)
def _readings(kernel, a, b, m) -> tuple[Layout, ...]:
  """Every layout that fits the shapes, one per meaning."""
  found = [layout for layout in adapter_layouts(a, b) if layout.kernel_shape(a, b) == kernel
           and (m is None or layout.shapes(kernel, layout.rank_of(a))[2] == m)]
  unique = {layout._meaning(kernel): layout for layout in found}  # lifts found several ways
  return tuple(unique.values())


@functools.lru_cache(maxsize=4096)
def adapter_layouts(a_shape, b_shape) -> tuple[Layout, ...]:
  """Every layout the library makes that A and B of these shapes fit, the kernel unknown.

  Compact (`A: shared + contracting + (r,)`, `B: shared + (r,) + output`) or
  full (every kernel axis, size 1 where not theirs, rank last), plus axes that
  lifted transforms inserted at one index of every param. Each layout's
  `kernel_shape` says the kernel it implies.
  """
  a, b = tuple(a_shape), tuple(b_shape)
  found = []
  for s in range(len(a) - 1):  # compact, s shared axes
    if s < len(b) and a[:s] == b[:s] and b[s] == a[-1]:
      k = len(a) + len(b) - s - 2
      letters, rank = string.ascii_letters[:k], string.ascii_letters[k]
      shared, contract, free = letters[:s], letters[s:len(a) - 1], letters[len(a) - 1:]
      found.append(Layout(letters, contract, rank, shared + contract + rank,
                          shared + rank + free, shared + free))
  if len(a) == len(b) >= 2 and a[-1] == b[-1]:  # full
    letters, rank = string.ascii_letters[:len(a) - 1], string.ascii_letters[len(a) - 1]
    la = lb = contract = ""
    for c, x, y in zip(letters, a, b):
      if x == y > 1:  # shared
        la, lb = la + c, lb + c
      elif y == 1:  # contracting (or a size-1 axis: any role computes the same)
        la, lb, contract = la + c, lb + PLACEHOLDER, contract + c
      elif x == 1:  # output
        la, lb = la + PLACEHOLDER, lb + c
      else:
        break
    else:
      if contract:
        m = "".join(PLACEHOLDER if c in contract else c for c in letters)
        found.append(Layout(letters, contract, rank, la + rank, lb + rank, m))
  for p in [*range(min(len(a), len(b))), -1]:  # an axis lifted at index p of every param
    if min(len(a), len(b)) > 1 and a[p] == b[p]:
      drop = (lambda s: s[:p] + s[p + 1:]) if p >= 0 else (lambda s: s[:-1])
      found += [inner.add_axis(p) for inner in adapter_layouts(drop(a), drop(b))]
  return tuple(ly for ly in found if ly.kernel_shape(a, b) is not None)
