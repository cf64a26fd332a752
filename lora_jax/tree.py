"""Pure functions on param trees: labels for optax, split/combine, counts, merge
(and `merge_reversibly`/`unmerge`, which take an adapter out of merged params again).

Adapter leaves are recognised by name (`lora_a`, `lora_b`, `lora_magnitude`)
wherever they sit, so these functions work on a bare `params` dict, on
`{'params': ...}` variables, on stacked (`nn.scan`) trees and on trees of
`jax.ShapeDtypeStruct`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import ADAPTER_LEAVES, LoRAConfig, join_path, unmatched_error
from lora_jax.layers import _align, _dora_gain, merged_kernel
from lora_jax.layout import Layout, find_layout
from lora_jax.quantize import dequantize, is_quantized

LORA, TRAINABLE, FROZEN = "lora", "trainable", "frozen"


def _label(path: str, config: LoRAConfig | None) -> str:
  if path.rsplit("/", 1)[-1] in ADAPTER_LEAVES:
    return LORA
  if config is not None and config.is_trainable(path):
    return TRAINABLE
  return FROZEN


def partition(params: Any, config: LoRAConfig | None = None) -> Any:
  """Labels every leaf `'lora'`, `'trainable'` or `'frozen'`.

  Args:
    params: a param tree.
    config: gives the `trainable` rules; without it nothing but adapters trains.

  Returns:
    A tree with exactly the structure of `params`, for `optax.partition`.

  Example:
    >>> import jax.numpy as jnp
    >>> partition({'dense': {'kernel': jnp.ones((2, 2)), 'lora_a': jnp.ones((2, 1))}})
    {'dense': {'kernel': 'frozen', 'lora_a': 'lora'}}
  """
  return jax.tree_util.tree_map_with_path(lambda kp, _: _label(join_path(kp), config), params)


def check_trainable_rules(params: Any, config: LoRAConfig | None) -> None:
  """Raises `ValueError` for a `trainable` rule that matches no param (a typo trains nothing)."""
  if config is None or not config.trainable:
    return
  paths = leaf_paths(params)
  unused = config.unmatched_rules(params=paths)
  if unused:
    raise unmatched_error(unused[0], [], paths)
  for kp, x in jax.tree_util.tree_leaves_with_path(nn.unbox(params), is_leaf=is_quantized):
    path = join_path(kp)
    if is_quantized(x) and config.is_trainable(path):
      raise ValueError(f"trainable rule {config.trainable_rule(path)!r} selects the quantized "
                       f"kernel '{path}': a quantized base is frozen; narrow the rule, or keep "
                       "that kernel in float (quantize_params' exclude)")


def leaf_paths(tree: Any) -> list[str]:
  """The `/`-joined path of every leaf of `tree`, in leaf order."""
  return [join_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _is_adapter(path: str, config: LoRAConfig | None) -> bool:
  return _label(path, config) != FROZEN


def split(params: Mapping, config: LoRAConfig | None = None) -> tuple[dict, dict]:
  """Splits a param tree into `(adapters, base)`; `combine` is its inverse.

  Args:
    params: nested mappings of leaves.
    config: with it, `trainable` params go with the adapters.

  Returns:
    Two nested dicts holding disjoint leaves; neither holds a dict that the
    split emptied.

  Example:
    >>> adapters, base = split({'dense': {'kernel': 1, 'lora_a': 2, 'lora_b': 3}})
    >>> adapters, base
    ({'dense': {'lora_a': 2, 'lora_b': 3}}, {'dense': {'kernel': 1}})
  """
  def walk(tree: Mapping, prefix: str) -> tuple[dict, dict]:
    adapters, base = {}, {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        sub_adapters, sub_base = walk(value, path)
        if sub_adapters:
          adapters[key] = sub_adapters
        if sub_base or not value:  # keep dicts that were empty to begin with
          base[key] = sub_base
      elif _is_adapter(path, config):
        adapters[key] = value
      else:
        base[key] = value
    return adapters, base

  if not isinstance(params, Mapping):
    raise ValueError(f"split expects nested mappings of params, got {type(params).__name__}")
  return walk(params, "")


def combine(adapters: Mapping, base: Mapping) -> dict:
  """Puts `adapters` back onto `base`: the inverse of `split`.

  Raises:
    ValueError: naming the path where the two trees hold the same leaf or
      disagree about what is a dict.
  """
  def walk(a: Mapping, b: Mapping, prefix: str) -> dict:
    out = {k: _plain_dict(v) for k, v in b.items()}
    for key, value in a.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if key not in out:
        out[key] = _plain_dict(value)
      elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
        out[key] = walk(value, out[key], path)
      else:
        raise ValueError(f"combine: both trees hold '{path}'")
    return out

  return walk(adapters, base, "")


def _plain_dict(tree: Any) -> Any:
  """Nested mappings (e.g. FrozenDict) as nested dicts."""
  if isinstance(tree, Mapping):
    return {k: _plain_dict(v) for k, v in tree.items()}
  return tree


def count(params: Any, config: LoRAConfig | None = None) -> dict[str, int]:
  """Number of parameters per label: `{'lora': n, 'trainable': n, 'frozen': n}`."""
  totals = {LORA: 0, TRAINABLE: 0, FROZEN: 0}
  # A quantized kernel counts its weights, not its stored codes and statistics.
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x)
                        else x, params, is_leaf=is_quantized)
  sizes = jax.tree.map(lambda x: math.prod(jnp.shape(x)), params)
  for label, size in zip(jax.tree.leaves(partition(params, config)), jax.tree.leaves(sizes)):
    totals[label] += size
  return totals


def summary(params: Any, config: LoRAConfig | None = None) -> None:
  """Prints trainable vs all parameters, like PEFT's `print_trainable_parameters`.

  Example:
    >>> import jax.numpy as jnp
    >>> summary({'kernel': jnp.ones((100, 100)), 'lora_a': jnp.ones((100, 4)),
    ...          'lora_b': jnp.ones((4, 100))})
    trainable params: 800 || all params: 10,800 || trainable%: 7.4074
  """
  n = count(params, config)
  trained, total = n[LORA] + n[TRAINABLE], sum(n.values())
  pct = 100 * trained / total if total else 0.0
  print(f"trainable params: {trained:,d} || all params: {total:,d} || trainable%: {pct:.4f}")


def merge(params: Mapping, config: LoRAConfig, *, dtype: Any = None, safe: bool = False,
          layouts: Mapping[str, Layout] | None = None) -> dict:
  """Folds every adapter into its kernel; returns the base model's tree.

  `W' = W + scale * A @ B`, accumulated in float32 and cast once; DoRA:
  `W' = m * (W + scale*A@B) / ||W + scale*A@B||` per output feature. The
  result has exactly the structure of the plain model's params.

  Called eagerly, each layer is merged by its own compiled program, so only
  one layer's `A @ B` is alive at a time. `merge` is also jittable; donate
  its input so the unmerged tree is not kept alongside the merged one:
  `jax.jit(merge, static_argnums=1, donate_argnums=0)(params, config)`.

  Args:
    params: a tree with adapters.
    config: the config the adapters were made with (gives each layer's scale).
    dtype: cast every floating leaf of the result to this dtype (default: each
      kernel keeps its own dtype).
    safe: raise `ValueError` naming the layer when a merged kernel is not
      finite (needs concrete arrays, not tracers).
    layouts: every adapter's layout by layer path, from
      `lora_jax.layouts(model, ...)`; without it each is read from the shapes
      (see `lora_jax.layout.read_layout`).

  Raises:
    ValueError: when `params` hold no adapter, when an adapter's rank or DoRA
      disagrees with `config`, or when an adapter does not fit its kernel.
  """
  found = []

  def walk(tree: Mapping, prefix: str) -> dict:
    if "lora_a" in tree or "lora_b" in tree:
      return merge_layer(tree, prefix)
    out = {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      out[key] = walk(value, path) if isinstance(value, Mapping) else cast(value)
    return out

  def cast(leaf):
    value = nn.meta.unbox(leaf)
    if is_quantized(value):  # the plain model's tree is dense: dequantized, then cast
      return _rebox(leaf, value.dequantize(dtype))
    kind = getattr(value, "dtype", None)
    if dtype is None or kind is None or not jnp.issubdtype(kind, jnp.floating):
      return leaf
    return _rebox(leaf, value.astype(dtype))

  def merge_layer(layer: Mapping, path: str) -> dict:
    missing = [k for k in ("kernel", "lora_a", "lora_b") if k not in layer]
    if missing:
      raise ValueError(f"merge: layer '{path}' has adapters but no {', '.join(missing)}")
    kernel, a, b = (nn.meta.unbox(layer[k]) for k in ("kernel", "lora_a", "lora_b"))
    kernel = dequantize(kernel)  # merging into a quantized base: into its dequantized kernel
    magnitude = nn.meta.unbox(layer["lora_magnitude"]) if "lora_magnitude" in layer else None
    if layouts is not None and path not in layouts:
      raise ValueError(f"merge: the layouts hold no record of layer '{path}'")
    try:
      layout = find_layout(kernel.shape, a.shape, b.shape,
                           None if magnitude is None else magnitude.shape,
                           None if layouts is None else layouts[path])
    except ValueError as e:
      raise ValueError(f"merge: layer '{path}': {e}") from None
    rank = config.rank_for(path)
    if layout.rank_of(a.shape) != rank:
      raise ValueError(
          f"merge: layer '{path}' has a rank-{layout.rank_of(a.shape)} adapter but the config "
          f"gives rank {rank}: pass the config the adapters were trained with")
    if (magnitude is not None) != config.use_dora:
      raise ValueError(
          f"merge: layer '{path}' {'has' if magnitude is not None else 'lacks'} a DoRA "
          f"magnitude but the config has use_dora={config.use_dora}")
    w = _merged_kernel(kernel, a, b, config.scale(path), magnitude, layout)
    if safe:
      if isinstance(w, jax.core.Tracer):
        raise ValueError("merge(safe=True) checks values and cannot run under jit; "
                         "use safe=False inside jit and check the result outside")
      if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"merge: layer '{path}' has non-finite values after merging")
    found.append(path)
    out = {k: walk(v, f"{path}/{k}") if isinstance(v, Mapping) else cast(v)
           for k, v in layer.items() if k not in ADAPTER_LEAVES}
    out["kernel"] = _rebox(layer["kernel"], w.astype(dtype or kernel.dtype))
    return out

  if not isinstance(params, Mapping):
    raise ValueError(f"merge expects nested mappings of params, got {type(params).__name__}")
  merged = walk(params, "")
  if not found:
    raise ValueError("merge: params hold no adapters (lora_a/lora_b): nothing to merge")
  return merged


# One compiled program a layer: called eagerly, `merge` then holds one layer's
# A @ B at a time (a whole-tree jit lets XLA:CPU compute every product before
# the first add); inside a caller's jit it is inlined as before.
_merged_kernel = jax.jit(merged_kernel, static_argnums=(3, 5))


def _rebox(original: Any, value: jax.Array) -> Any:
  """`value` in `original`'s metadata box, if it had one."""
  if isinstance(original, nn.meta.AxisMetadata):
    return original.replace_boxed(value)
  return value


# --- merging that can be undone -------------------------------------------------

# What a merge record holds beside each layer's adapters.
RECORD_LEAVES = ("lora_scale", "lora_norm", "merged_colsum")
# Merged kernels must have the record's column sums to this fraction of their absolute
# sums (float32 sums in another order, e.g. resharded, agree far closer).
_COLSUM_RTOL = 1e-5


def merge_reversibly(params: Mapping, config: LoRAConfig, *,
                     layouts: Mapping[str, Layout] | None = None) -> tuple[dict, dict]:
  """`merge`, and a record from which `unmerge` takes the adapters out again.

  The record is a pytree of arrays (Orbax saves it): `split(params, config)`'s
  adapters (`trainable` params too), and beside each layer's `lora_a`/`lora_b`
  its scale `lora_scale`, the column sums of its merged kernel `merged_colsum`
  (so `unmerge` knows merged params that are not this record's) and, for DoRA,
  `lora_norm`: the per-output-feature norm of `V = W + s*A@B` the merge divided
  by (PEFT caches this `weight_norm` when it merges). Undoing needs no base.
  Jittable as `merge` is (`static_argnums=1`); checks that read values run
  only when called eagerly.

  Args:
    params: a tree with adapters.
    config: the config the adapters were made with.
    layouts: every adapter's layout by layer path (`lora_jax.layouts`).

  Returns:
    `(merge(params, config), record)`.

  Raises:
    ValueError: as `merge`; and (called eagerly) where a DoRA magnitude is 0 on
      a feature whose `V` is not: the merge zeroes that kernel column for good.
  """
  merged = merge(params, config, layouts=layouts)
  record = _plain_dict(nn.unbox(split(params, config)[0]))
  for path, layer in _adapter_layers(record):
    kernel = dequantize(nn.meta.unbox(_at(params, path)["kernel"]))  # DoRA's norms need it
    a, b, m = layer["lora_a"], layer["lora_b"], layer.get("lora_magnitude")
    layout = find_layout(kernel.shape, a.shape, b.shape, None if m is None else m.shape,
                         None if layouts is None else layouts[path])
    layer["lora_scale"] = jnp.float32(config.scale(path))
    layer["merged_colsum"], norm, lost = _record_of(
        nn.meta.unbox(_at(merged, path)["kernel"]), kernel, a, b, layer["lora_scale"], m, layout)
    if m is not None:
      layer["lora_norm"] = norm
      if not isinstance(lost, jax.core.Tracer) and int(lost):
        raise ValueError(
            f"merge_reversibly: layer '{path}': the DoRA magnitude is 0 on {int(lost)} output "
            "feature(s) where W + s*A@B is not, so the merge zeroes those kernel columns and "
            "the base's could not be recovered; merge (irreversibly) instead")
  return merged, record


def unmerge(merged_params: Mapping, record: Mapping, *,
            layouts: Mapping[str, Layout] | None = None) -> dict:
  """Takes the adapters of a `merge_reversibly` record out of its merged params.

  LoRA: `W = W' - s*A@B`; DoRA: `W = W' * ||V|| / m - s*A@B` with the recorded
  `||V||` (where it is 0 the merge kept the column, and so does this). In
  float32, cast once to each merged kernel's dtype: float32 kernels come back
  within float32 round-off; bfloat16 kernels, rounded once by the merge, within
  `2**-8 * (|W| + |V|)` per weight (that rounding and the final one). A base
  that was quantized comes back dense, as the merge made it
  (`requantize_like` quantizes it again). Jittable; checks that read values
  run only when called eagerly.

  Args:
    merged_params: what `merge_reversibly` returned with `record` (it may
      have been saved, restored or resharded since).
    record: its record.
    layouts: every adapter's layout by layer path (`lora_jax.layouts`).

  Returns:
    The params `merge_reversibly` was given: the merged tree with the record's
    adapters beside their kernels again; `split(result, config)[1]` is the base
    (less `trainable` params: their base values were replaced, never merged).

  Raises:
    ValueError: naming the layer, when `merged_params` hold adapters or lack a
      layer of the record, or (eagerly) hold a kernel whose column sums are
      not the record's: merged with another adapter, or another model.
  """
  if not isinstance(merged_params, Mapping) or not isinstance(record, Mapping):
    raise ValueError("unmerge expects the merged params and the record merge_reversibly returned")
  held, layers = _adapter_layers(merged_params), _adapter_layers(record)
  if held:
    raise ValueError(f"unmerge: the merged params hold adapters (at '{held[0][0]}'): pass the "
                     "merged params merge_reversibly returned")
  if not layers:
    raise ValueError("unmerge: the record holds no adapters: pass what merge_reversibly returned")
  kernels = {}
  for path, layer in layers:
    lacks = [k for k in ("lora_a", "lora_b", "lora_scale", "merged_colsum") + (
        ("lora_norm",) if "lora_magnitude" in layer else ()) if k not in layer]
    if lacks:
      raise ValueError(f"unmerge: record layer '{path}' lacks {', '.join(lacks)}: not a record "
                       "of merge_reversibly")
    try:
      raw = _at(merged_params, path)["kernel"]
    except KeyError:
      raise ValueError(f"unmerge: the merged params have no kernel at '{path}', where the record "
                       "has an adapter: the record belongs to another model") from None
    w, a, b, m = dequantize(nn.meta.unbox(raw)), layer["lora_a"], layer["lora_b"], \
        layer.get("lora_magnitude")
    if layouts is not None and path not in layouts:
      raise ValueError(f"unmerge: the layouts hold no record of layer '{path}'")
    try:
      layout = find_layout(w.shape, a.shape, b.shape, None if m is None else m.shape,
                           None if layouts is None else layouts[path])
    except ValueError as e:
      raise ValueError(f"unmerge: layer '{path}': {e}: the record belongs to another "
                       "model") from None
    kernel, mismatch, lost = _unmerged_kernel(w, a, b, layer["lora_scale"], m,
                                              layer.get("lora_norm"), layer["merged_colsum"],
                                              layout)
    if not isinstance(mismatch, jax.core.Tracer) and float(mismatch) > _COLSUM_RTOL:
      raise ValueError(f"unmerge: the kernel at '{path}' is not the one this record merged "
                       f"(column sums differ by up to {float(mismatch):.2g} of their absolute "
                       "sums): the record belongs to another merge (adapter or model)")
    if not isinstance(lost, jax.core.Tracer) and int(lost):
      raise ValueError(f"unmerge: layer '{path}': the DoRA magnitude is 0 on {int(lost)} "
                       "output feature(s) that the merge zeroed: not recoverable")
    kernels[path] = _rebox(raw, kernel.astype(w.dtype))
  for path, x in zip(leaf_paths(record), jax.tree.leaves(record)):
    if path.rsplit("/", 1)[-1] not in ADAPTER_LEAVES + RECORD_LEAVES:  # a `trainable` param
      try:
        there = nn.meta.unbox(_at(merged_params, path))
      except KeyError:
        there = {}
      if isinstance(there, Mapping) or jnp.shape(there) != jnp.shape(x):
        raise ValueError(f"unmerge: the record trained '{path}' fully, and the merged params "
                         "do not hold it (so shaped): the record belongs to another model")

  def walk(tree: Mapping, prefix: str) -> dict:
    out = {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) if isinstance(v, Mapping) else v
           for k, v in tree.items()}
    if prefix in kernels:
      layer = _at(record, prefix)
      out.update({k: layer[k] for k in ADAPTER_LEAVES if k in layer}, kernel=kernels[prefix])
    return out

  return walk(merged_params, "")


def _adapter_layers(tree: Mapping, prefix: str = "") -> list[tuple[str, Mapping]]:
  """`(path, layer)` of every dict holding `lora_a` or `lora_b`, in order."""
  if "lora_a" in tree or "lora_b" in tree:
    return [(prefix, tree)]
  return [found for key, value in tree.items() if isinstance(value, Mapping)
          for found in _adapter_layers(value, f"{prefix}/{key}" if prefix else str(key))]


def _at(tree: Mapping, path: str) -> Any:
  """The node at a `/`-joined path (`''`: the tree); `KeyError` if missing."""
  for key in path.split("/") if path else ():
    if not isinstance(tree, Mapping):
      raise KeyError(path)
    tree = tree[key]
  return tree


def _column_sums(w: jax.Array, layout: Layout) -> jax.Array:
  axes = tuple(i for i, c in enumerate(layout.kernel) if c in layout.contract)
  return jnp.sum(w.astype(jnp.float32), axis=axes)


def _v(kernel, a, b, scale, layout: Layout) -> jax.Array:
  """`W + s*A@B` in float32."""
  return kernel.astype(jnp.float32) + scale * layout.delta(
      layout.squeeze(a, "a").astype(jnp.float32), layout.squeeze(b, "b").astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=6)
def _record_of(merged, kernel, a, b, scale, m, layout: Layout):
  """The merged kernel's column sums; with DoRA's `m`, `||V||` per output feature
  and how many features the merge zeroed (gain 0)."""
  if m is None:
    return _column_sums(merged, layout), None, None
  norm = layout.column_norm(_v(kernel, a, b, scale, layout))
  return (_column_sums(merged, layout), norm,
          jnp.sum(_dora_gain(layout.squeeze(m, "m"), norm) == 0))


@functools.partial(jax.jit, static_argnums=7)
def _unmerged_kernel(w, a, b, scale, m, norm, colsum, layout: Layout):
  """`W' / gain - s*A@B` in float32; the largest relative difference of `W'`'s
  column sums from the record's; how many DoRA features have gain 0."""
  sums = _column_sums(w, layout)
  mismatch = (jnp.max(jnp.abs(sums - colsum) / (_column_sums(jnp.abs(w), layout) + 1e-30))
              if sums.shape == colsum.shape else jnp.float32(jnp.inf))
  v, lost = w.astype(jnp.float32), jnp.int32(0)
  if m is not None:
    gain = _dora_gain(layout.squeeze(m, "m"), norm)
    v, lost = v / _align(gain, layout.letters("m"), layout.kernel), jnp.sum(gain == 0)
  return _v(v, a, b, -scale, layout), mismatch, lost
