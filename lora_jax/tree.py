"""Pure functions on param trees: labels for optax, split/combine, counts, merge.

Adapter leaves are recognised by name (`lora_a`, `lora_b`, `lora_magnitude`)
wherever they sit, so these functions work on a bare `params` dict, on
`{'params': ...}` variables, on stacked (`nn.scan`) trees and on trees of
`jax.ShapeDtypeStruct`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import ADAPTER_LEAVES, LoRAConfig, join_path, unmatched_error
from lora_jax.layers import merged_kernel
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
