"""New adapters from weighted adapters (PEFT's `add_weighted_adapter`), done exactly.

An adapter is the pair `(adapters, config)`: a tree of `lora_a`/`lora_b`
leaves at each adapted layer's path and the `LoRAConfig` it was made with.
Layer by layer, `weighted_adapter` combines what the adapters add to the
kernel, `delta_i = s_i * A_i @ B_i` with each adapter's own scale `s_i`
(rank and alpha patterns and rsLoRA resolved per layer), and returns an
ordinary adapter whose config gives every layer scale 1 (`alpha == rank`,
`use_rslora=False`): nothing of an input config is inherited. (PEFT builds
the new config from the first adapter's, so an rsLoRA first adapter scales
the combination by `sqrt(r)`: PEFT issue #3761.)

Methods (PEFT's names; `w_i` are the weights):

* `cat`: A's and B's concatenated along the rank axis, `w_i * s_i` folded
  into each B block; the ranks add. Exact: delta = sum_i w_i * delta_i.
* `svd`: that exact weighted delta, truncated to `rank` by SVD and split as
  `A = U sqrt(S)`, `B = sqrt(S) Vh`.
* `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: PEFT's
  `merge_utils` functions of the same names on the adapters' deltas (PEFT's
  `ties_svd`, `dare_linear_svd`, ... forms; PEFT's forms without `_svd` prune
  A's and B's instead), then truncated as `svd`.
* `linear`: PEFT's approximation, for adapters of one rank per layer:
  `A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i`, `B = sum_i sqrt|w_i s_i| B_i`.
  One adapter at weight w gives exactly w times its delta; several add the
  cross terms `A_i @ B_j`: this is NOT the weighted sum of their deltas.

Each layer is a batch of matrices: its kernel's shared axes (`nn.scan`/
`nn.vmap` layer axes, `DenseGeneral`'s batch dims) are the batch, its
contracting axes the rows and its output axes the columns. Truncation,
pruning and sign election work on each matrix, as PEFT's on each layer.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoRAConfig
from lora_jax.layout import PLACEHOLDER, Layout, adapter_layouts

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGNS = ("total", "frequency")


class WeightedAdapter(NamedTuple):
  """A combined adapter.

  Attributes:
    adapters: `lora_a`/`lora_b` at every layer some input adapter targets.
    config: selects exactly those layers, each with scale 1.
    energy_kept: per layer path, the fraction of the squared Frobenius norm
      of the method's target delta that the result keeps: 1.0 for `cat` and
      `linear` (their result is their target), the truncation's kept
      fraction for the SVD-based methods (1.0 for a zero target).
  """

  adapters: dict
  config: LoRAConfig
  energy_kept: dict[str, float]


def weighted_adapter(adapters: Sequence[tuple[Mapping, LoRAConfig]], weights: Sequence[float],
                     *, method: str = "cat", rank: int | None = None,
                     density: float | None = None, majority_sign: str = "total", seed: int = 0,
                     layouts: Mapping[str, Layout] | None = None) -> WeightedAdapter:
  """Combines weighted adapters into one (PEFT's `add_weighted_adapter`).

  An adapter adds zero delta to a layer it does not target; the result
  targets every layer some adapter targets. Weights may be negative (`[1, -1]`
  on one adapter gives zero: task negation). Computed in float32, matmuls at
  HIGHEST precision; the result's leaves are plain arrays in the adapters'
  `lora_dtype`, or float32 when their `lora_dtype`s differ.

  Args:
    adapters: `(adapters, config)` pairs: a tree of `lora_a`/`lora_b` only
      (`lora_jax.split(params)[0]`; stacked layers too) and its config.
    weights: one finite number per adapter.
    method: one of `METHODS` (see the module docstring).
    rank: the result's rank for the SVD-based methods (required there,
      refused elsewhere); a layer whose matrices are smaller gets their
      smaller side.
    density: the fraction of each delta's entries kept, in (0, 1], for
      `PRUNING_METHODS` (required there, refused elsewhere).
    majority_sign: `'total'` (sign of the sum) or `'frequency'` (the more
      frequent sign), for `ties` and `dare_ties`.
    seed: DARE's masks: adapter i's at layer `path` is
      `jax.random.bernoulli(fold_in(fold_in(key(seed), crc32(path)), i),
      density)` over the layer's (shared..., fan_in, fan_out) matrices.
    layouts: every layer's `Layout` (`lora_jax.layouts(model, ...)`).
      Without it each is read from the adapters' shapes, and a layer whose
      shapes read two ways that combine differently is refused.

  Returns:
    A `WeightedAdapter`; `lora_jax.combine(result.adapters, base)` runs in
    `lora_jax.inject(model, result.config)`.

  Raises:
    ValueError: naming the problem, for bad arguments, DoRA adapters (their
      delta is not `s * A @ B`), trees holding other leaves, ranks that
      disagree with an adapter's config, layers whose shapes differ between
      adapters, and `linear` on layers of different ranks.

  Example:
    >>> a = {'dense': {'lora_a': jnp.ones((3, 2)), 'lora_b': jnp.ones((2, 4))}}
    >>> b = {'dense': {'lora_a': jnp.ones((3, 1)), 'lora_b': jnp.ones((1, 4))}}
    >>> out = weighted_adapter([(a, LoRAConfig(rank=2, alpha=4)), (b, LoRAConfig(rank=1))],
    ...                        [0.5, -1.0])
    >>> jax.tree.map(jnp.shape, out.adapters), out.config.scale('dense')
    ({'dense': {'lora_a': (3, 3), 'lora_b': (3, 4)}}, 1.0)
  """
  weights = _check_arguments(adapters, weights, method, rank, density, majority_sign, seed,
                             layouts)
  trees = [_layers(tree, i) for i, (tree, _) in enumerate(adapters)]
  dtypes = {config.lora_dtype for _, config in adapters}
  dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
  out, ranks, energy = {}, {}, {}
  for path in dict.fromkeys(p for layers in trees for p in layers):
    present = {i: layers[path] for i, layers in enumerate(trees) if path in layers}
    form = _Form.of(path, present, adapters, layouts)
    if method == "linear" and len({form.layout.rank_of(a.shape)
                                   for _, a, _ in present.values()}) > 1:
      told = ", ".join(f"adapters[{i}]: {form.layout.rank_of(a.shape)}"
                       for i, (_, a, _) in present.items())
      _fail(f"method 'linear' sums A's and B's and needs one rank per layer; layer '{path}' "
            f"has ranks {told}. Use 'cat' (exact) or 'svd'")
    a, b, kept, total = _combine(
        [a for _, a, _ in present.values()], [b for _, _, b in present.values()],
        jnp.asarray([weights[i] for i in present], jnp.float32),
        jnp.asarray([adapters[i][1].scale(path) for i in present], jnp.float32),
        jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode())),
        jnp.asarray(list(present), jnp.uint32), form=form, method=method, rank=rank,
        density=density, majority_sign=majority_sign, dtype=dtype)
    node = out
    for key in next(iter(present.values()))[0]:
      node = node.setdefault(key, {})
    node["lora_a"], node["lora_b"] = a, b
    ranks[path] = form.layout.rank_of(a.shape)
    energy[path] = float(kept) / float(total) if float(total) > 0 else 1.0
  return WeightedAdapter(out, _config(ranks, dtype), energy)


# --- arguments and trees ------------------------------------------------------

def _fail(message: str):
  raise ValueError(f"weighted_adapter: {message}")


def _real(x) -> float | None:
  """`x` as a float if it is a real number (not a bool or a string), else None."""
  if isinstance(x, (bool, str, bytes)):
    return None
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _check_arguments(adapters, weights, method, rank, density, majority_sign, seed, layouts
                     ) -> list[float]:
  if isinstance(adapters, (str, Mapping)) or not isinstance(adapters, Sequence) or not adapters:
    _fail("no adapters given; pass a list of (adapters, config) pairs")
  for i, pair in enumerate(adapters):
    if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], Mapping)
            and isinstance(pair[1], LoRAConfig)):
      _fail(f"adapters[{i}] must be a pair (adapters tree, LoRAConfig), got {type(pair).__name__}")
    if pair[1].use_dora:
      _fail(_dora(i, "its config has use_dora=True"))
  try:  # a list, a tuple, a 1-D array
    weights = None if isinstance(weights, (str, bytes, Mapping)) else list(weights)
  except TypeError:
    weights = None
  if weights is None or len(weights) != len(adapters):
    _fail(f"{'no list of' if weights is None else len(weights)} weights for {len(adapters)} "
          "adapters; give one weight per adapter")
  for i, w in enumerate(weights):
    if _real(w) is None or not math.isfinite(_real(w)):
      _fail(f"weights[{i}]={w!r} must be a finite number")
  if method not in METHODS:
    peft = isinstance(method, str) and method.removesuffix("_svd") in PRUNING_METHODS
    _fail(f"unknown method {method!r}; known methods: {', '.join(METHODS)}" + (
        f"; lora_jax's {method.removesuffix('_svd')!r} is PEFT's {method!r} (on the deltas, "
        "then SVD)" if peft else ""))
  if method in SVD_METHODS and rank is None:
    _fail(f"method {method!r} truncates by SVD and needs rank=")
  if method in SVD_METHODS and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                                or rank < 1):
    _fail(f"rank={rank!r} must be an integer >= 1")
  if method not in SVD_METHODS and rank is not None:
    _fail(f"method {method!r} sets the ranks itself; rank= is only for {', '.join(SVD_METHODS)}")
  if method in PRUNING_METHODS and not 0 < (_real(density) or 0.0) <= 1:
    _fail(f"method {method!r} needs density= in (0, 1], the fraction of entries kept; got "
          f"{density!r}")
  if method not in PRUNING_METHODS and density is not None:
    _fail(f"density= is only for {', '.join(PRUNING_METHODS)}, not {method!r}")
  if majority_sign not in MAJORITY_SIGNS:
    _fail(f"unknown majority_sign {majority_sign!r}; known: {', '.join(MAJORITY_SIGNS)}")
  if majority_sign != "total" and method not in ("ties", "dare_ties"):
    _fail(f"majority_sign is only for ties and dare_ties, not {method!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    _fail(f"seed={seed!r} must be an integer")
  if layouts is not None and not isinstance(layouts, Mapping):
    _fail("layouts must map layer paths to Layouts (lora_jax.layouts(model, ...))")
  return [_real(w) for w in weights]


def _dora(i: int, why: str) -> str:
  return (f"adapters[{i}] is a DoRA adapter ({why}). A DoRA layer computes "
          "m * (W + s*A@B) / ||W + s*A@B||, which depends on the base kernel and is not "
          "W + s*A@B, so combining A's and B's would not combine what the adapters do; merge "
          "each into the base (lora_jax.merge) and combine the kernels instead")


def _layers(tree: Mapping, index: int) -> dict[str, tuple]:
  """path -> (keys, lora_a, lora_b) of every adapted layer of one tree, in tree order."""
  found = {}

  def walk(node: Mapping, keys: tuple):
    path = "/".join(map(str, keys))
    if "lora_magnitude" in node:
      _fail(_dora(index, f"it has lora_magnitude at '{path}'"))
    if ("lora_a" in node) != ("lora_b" in node):
      _fail(f"adapters[{index}] layer '{path}' has "
            f"{'lora_a' if 'lora_a' in node else 'lora_b'} but not the other")
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, keys + (key,))
      elif key not in ("lora_a", "lora_b"):
        _fail(f"adapters[{index}] holds '{'/'.join(map(str, keys + (key,)))}', which is not "
              "an adapter leaf; pass the adapters alone (lora_jax.split(params)[0]; trainable "
              "params are not combined)")
    if "lora_a" in node:
      found[path] = (keys, jnp.asarray(node["lora_a"]), jnp.asarray(node["lora_b"]))

  walk(nn.meta.unbox(tree), ())
  if not found:
    _fail(f"adapters[{index}] holds no adapters (lora_a/lora_b)")
  return found


# --- layouts: each layer as a batch of matrices ---------------------------------

class _Form(NamedTuple):
  """How a layer's stored A and B are matrices (shared..., fan_in, r), (shared..., r, fan_out)."""

  layout: Layout
  sizes: tuple[tuple[str, int], ...]  # (kernel letter, size): hashable, a jit static

  @classmethod
  def of(cls, path: str, present: dict, adapters: Sequence, layouts) -> _Form:
    shapes = [(i, tuple(a.shape), tuple(b.shape)) for i, (_, a, b) in present.items()]
    if layouts is not None and path not in layouts:
      _fail(f"the layouts hold no record of layer '{path}'")
    layout = layouts[path] if layouts is not None else _read(path, shapes, adapters)
    kernels = {}
    for i, a, b in shapes:
      kernels[i] = layout.kernel_shape(a, b)
      if kernels[i] is None:
        _fail(f"adapters[{i}] layer '{path}': lora_a {a} and lora_b {b} are not stored as its "
              f"layout says ({layout})")
      if layout.rank_of(a) != adapters[i][1].rank_for(path):
        _fail(f"adapters[{i}] layer '{path}' has a rank-{layout.rank_of(a)} adapter but its "
              f"config gives rank {adapters[i][1].rank_for(path)}: pass the config the adapter "
              "was made with")
    if len(set(kernels.values())) > 1:
      _fail(f"layer '{path}' has adapters of different layer shapes: " + "; ".join(
          f"adapters[{i}]: lora_a {a}, lora_b {b} (kernel {kernels[i]})" for i, a, b in shapes))
    return cls(layout, tuple(zip(layout.kernel, kernels[shapes[0][0]])))

  def _order(self, which: str) -> str:
    ly = self.layout
    return ly.shared + (ly.contract + ly.rank if which == "a" else ly.rank + ly.free)

  def matrix(self, stored: jax.Array, which: str) -> jax.Array:
    """A stored `lora_a` (`which='a'`) or `lora_b` as a batch of matrices, in float32."""
    ly, sizes = self.layout, dict(self.sizes)
    x = jnp.transpose(ly.squeeze(stored, which).astype(jnp.float32),
                      [ly.letters(which).index(c) for c in self._order(which)])
    side = math.prod(sizes[c] for c in (ly.contract if which == "a" else ly.free))
    return x.reshape(tuple(sizes[c] for c in ly.shared)
                     + ((side, -1) if which == "a" else (-1, side)))

  def stored(self, matrix: jax.Array, which: str) -> jax.Array:
    """The inverse of `matrix`, at the matrix's rank."""
    ly, order = self.layout, self._order(which)
    sizes = dict(self.sizes, **{ly.rank: matrix.shape[-1 if which == "a" else -2]})
    x = jnp.transpose(matrix.reshape(tuple(sizes[c] for c in order)),
                      [order.index(c) for c in ly.letters(which)])
    holes = tuple(i for i, c in enumerate(getattr(ly, which)) if c == PLACEHOLDER)
    return jnp.expand_dims(x, holes)


def _read(path: str, shapes: list, adapters: Sequence) -> Layout:
  """The one way (up to what computes the same) that every adapter's shapes at `path` read,
  at its config's rank."""
  common = None
  for i, a, b in shapes:
    rank, readings = adapters[i][1].rank_for(path), adapter_layouts(a, b)
    if not readings:
      _fail(f"adapters[{i}] layer '{path}': lora_a {a} and lora_b {b} fit no adapter layout "
            "(A: [shared] + contracting + (r,), B: [shared] + (r,) + output, or both with "
            "every kernel axis and the rank last; plus axes nn.scan/nn.vmap inserted)")
    found = {ly.roles(a, b): ly for ly in readings if ly.rank_of(a) == rank}
    if not found:
      read = "/".join(map(str, sorted({ly.rank_of(a) for ly in readings})))
      _fail(f"adapters[{i}] layer '{path}' has a rank-{read} adapter but its config gives "
            f"rank {rank}: pass the config the adapter was made with")
    common = found if common is None else {k: v for k, v in common.items() if k in found}
  if len(common) == 1:
    return next(iter(common.values()))
  told = "; ".join(f"adapters[{i}]: lora_a {a}, lora_b {b}" for i, a, b in shapes)
  if not common:
    _fail(f"layer '{path}' has adapters of different layer shapes (no layout fits them all): "
          f"{told}")
  _fail(f"layer '{path}' ({told}) reads {len(common)} ways that combine differently: "
        f"{'; '.join(map(str, common.values()))}. Pass the recorded ones: "
        "layouts=lora_jax.layouts(model, *sample_args)")


# --- the methods ---------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("form", "method", "rank", "density",
                                             "majority_sign", "dtype"))
def _combine(a_stored, b_stored, weights, scales, key, indices, *, form, method, rank, density,
             majority_sign, dtype):
  """One layer: the result's stored A and B, and the energy kept and in total."""
  a = [form.matrix(x, "a") for x in a_stored]
  b = [form.matrix(x, "b") for x in b_stored]
  kept = total = jnp.ones((), jnp.float32)
  if method == "cat":
    new_a = jnp.concatenate(a, axis=-1)
    new_b = jnp.concatenate([weights[j] * scales[j] * x for j, x in enumerate(b)], axis=-2)
  elif method == "linear":  # PEFT: sqrt|w s| on both sides, the sign on A's side only
    root, sign = jnp.sqrt(jnp.abs(weights * scales)), jnp.where(weights * scales >= 0, 1.0, -1.0)
    new_a = sum(sign[j] * root[j] * x for j, x in enumerate(a))
    new_b = sum(root[j] * x for j, x in enumerate(b))
  else:
    tasks = [scales[j] * jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
             for j, (x, y) in enumerate(zip(a, b))]
    keys = [jax.random.fold_in(key, indices[j]) for j in range(len(tasks))]
    new_a, new_b, kept, total = _truncate(
        _merge_utils(method, tasks, weights, density, majority_sign, keys), rank)
  return form.stored(new_a, "a").astype(dtype), form.stored(new_b, "b").astype(dtype), kept, total


def _merge_utils(method: str, tasks, weights, density, majority_sign, keys) -> jax.Array:
  """PEFT's `merge_utils` on the deltas (`tasks`): the target delta of the SVD methods."""
  if method in ("ties", "magnitude_prune"):
    tasks = [_magnitude_prune(t, density) for t in tasks]
  elif method in ("dare_linear", "dare_ties") and density < 1:  # PEFT: rescaled random pruning
    tasks = [t * jax.random.bernoulli(k, density, t.shape) / density for t, k in zip(tasks, keys)]
  tasks = jnp.stack(tasks)
  weights = weights.reshape((len(tasks),) + (1,) * (tasks.ndim - 1))
  if method not in ("ties", "dare_ties"):
    return jnp.sum(tasks * weights, axis=0)
  # TIES: each entry's sign elected from the unweighted tasks; the agreeing ones averaged.
  signs = jnp.sign(tasks)
  votes = jnp.sum(tasks if majority_sign == "total" else signs, axis=0)
  agree = signs == jnp.where(votes >= 0, 1.0, -1.0)[None]
  merged = jnp.sum(jnp.where(agree, tasks * weights, 0.0), axis=0)
  return merged / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(jnp.float32)


def _magnitude_prune(delta: jax.Array, density: float) -> jax.Array:
  """Each matrix's `int(density * size)` largest |entries| kept (PEFT's count)."""
  if density >= 1:
    return delta
  m, n = delta.shape[-2:]
  flat, k = delta.reshape(-1, m * n), int(density * (m * n))
  if k == 0:
    return jnp.zeros_like(delta)
  _, top = jax.lax.top_k(jnp.abs(flat), k)
  keep = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], top].set(True)
  return jnp.where(keep, flat, 0.0).reshape(delta.shape)


def _truncate(target: jax.Array, rank: int):
  """Each matrix's best rank-`rank` factors, sqrt(S) on each side; energy kept and total."""
  k = min(rank, *target.shape[-2:])
  u, s, vh = jnp.linalg.svd(target, full_matrices=False)
  root = jnp.sqrt(s[..., :k])
  a, b = u[..., :, :k] * root[..., None, :], root[..., :, None] * vh[..., :k, :]
  return a, b, jnp.sum(jnp.square(s[..., :k])), jnp.sum(jnp.square(s))


# --- the result's config ---------------------------------------------------------

def _config(ranks: dict[str, int], dtype: str) -> LoRAConfig:
  """Selects exactly `ranks`' layers (one regex of their paths), each at its rank with
  alpha == rank (scale 1); every other field at its default."""
  exact = lambda path: re.escape(path) if path else "^$"
  counts = list(ranks.values())
  default = max(dict.fromkeys(counts), key=counts.count)  # the most common, first on ties
  # A pattern key matches a trailing run of components: longer paths first, so each
  # layer meets its own key before any key that is a suffix of its path.
  odd = sorted((p for p, r in ranks.items() if r != default), key=len, reverse=True)
  return LoRAConfig(rank=default, alpha=default, targets="|".join(map(exact, ranks)),
                    rank_pattern=[(exact(p), ranks[p]) for p in odd],
                    alpha_pattern=[(exact(p), ranks[p]) for p in odd], lora_dtype=dtype)
