"""Merging that can be undone: `merge_reversibly` keeps what `unmerge` needs to take
the adapters out of the merged params again, without the original base."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import ADAPTER_LEAVES, LoRAConfig
from lora_jax.layers import _align, _dora_gain
from lora_jax.layout import Layout, find_layout
from lora_jax.quantize import dequantize
from lora_jax.tree import _plain_dict, _rebox, leaf_paths, merge, split

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
