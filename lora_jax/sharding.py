"""Meshes, logical-axis rules and shardings, with adapters placed like their kernels.

A mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallel
with params sharded, ZeRO-3 style) and `tensor` (tensor parallelism). Models
name their param axes logically ('embed', 'heads', 'kv', 'mlp', 'vocab',
'layers', ...); rules map those names to mesh axes, in order, first match
wins, as data. Flax's own machinery (`nn.logical_to_mesh_axes`) applies them.

Adapter leaves never get a rule of their own: `lora_a` takes its kernel's
mesh axes on the axes it shares with the kernel (the contracting ones),
`lora_b` and `lora_magnitude` likewise on the output ones, and the rank axis
is replicated. An adapter can then never be sharded inconsistently with its
kernel, nor silently replicated while the kernel is sharded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lora_jax.config import ADAPTER_LEAVES
from lora_jax.layout import Layout, find_layout
from lora_jax.quantize import is_quantized, quantized_sharding

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes the batch dimension is split over

# (logical axis, mesh axes): first match wins. Axes not named stay replicated.
FSDP_RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
)
TENSOR_RULES = (
    ("batch", BATCH),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
# Both: weights sharded over fsdp on their embed axis and over tensor on the
# other. On a mesh whose fsdp or tensor axis has size 1 the rule is a no-op, so
# these defaults serve every mesh shape.
DEFAULT_RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None,
              axis_types: AxisType | tuple[AxisType, ...] = AxisType.Auto) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh over all (or the given) devices.

  Args:
    data: size of the data axis; at most one size may be -1, meaning "the
      devices left over".
    fsdp: size of the fsdp axis (default: the rest).
    tensor: size of the tensor axis.
    devices: defaults to `jax.devices()` (every host's, on a TPU slice);
      `jax.make_mesh` orders them for the slice's topology.
    axis_types: `AxisType.Auto` (default) or `AxisType.Explicit`, or one per
      axis. Shardings from this module work on either.

  Raises:
    ValueError: when the sizes do not multiply to the number of devices.

  Example:
    >>> dict(make_mesh(2, -1, 2, devices=jax.devices()[:8]).shape)
    {'data': 2, 'fsdp': 2, 'tensor': 2}
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  for name, size in zip(AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name}={size!r}: must be an integer >= 1, or -1 for the rest")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {len(devices)} devices do not divide "
                       f"by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but there are {len(devices)}")
  if isinstance(axis_types, AxisType):
    axis_types = (axis_types,) * len(AXES)
  return jax.make_mesh(tuple(sizes), AXES, axis_types=tuple(axis_types), devices=devices)


def _spec_tuple(spec: P | None, ndim: int) -> tuple:
  entries = tuple(spec) if spec is not None else ()
  return entries + (None,) * (ndim - len(entries))


def _check_divisible(path: str, shape, spec: tuple, mesh: Mesh) -> None:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    parts = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if dim % parts:
      raise ValueError(
          f"'{path}' with shape {tuple(shape)} cannot be sharded as {P(*spec)} on mesh "
          f"{dict(mesh.shape)}: {dim} does not divide by {parts}. Change the mesh or the rules.")


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    *, layouts: Mapping[str, Layout] | None = None) -> Any:
  """`NamedSharding`s for every leaf of a param tree.

  Args:
    params: params, or abstract params from `jax.eval_shape(model.init, ...)`,
      whose leaves carry logical axis names (`nn.Partitioned` boxes, as
      `nn.with_logical_partitioning` makes them). Leaves without names are
      replicated; adapters follow their kernel whatever their own names.
    mesh: the device mesh.
    rules: ordered (logical axis, mesh axes) pairs.
    layouts: every adapter's layout by layer path (`lora_jax.layouts`);
      without it each is read from the shapes.

  Returns:
    A tree of `NamedSharding` with the structure of `nn.unbox(params)`.

  Raises:
    ValueError: naming the param when a sharded dimension does not divide
      by its mesh axes.
  """
  def walk(tree: Mapping, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        out[key] = walk(value, path)
      elif key not in ADAPTER_LEAVES:
        if isinstance(value, nn.LogicallyPartitioned):
          spec = nn.logical_to_mesh_axes(value.names, rules)
        elif isinstance(value, nn.Partitioned):  # `nn.with_partitioning`: mesh axes already
          spec = P(*value.names)
        else:
          spec = None
        out[key] = _spec_tuple(spec, len(nn.meta.unbox(value).shape))
    for key in ADAPTER_LEAVES:  # after the kernel, whose spec they copy
      if key in tree:
        out[key] = _adapter_spec(tree, key, out, prefix, layouts)
    return out

  if not isinstance(params, Mapping):
    raise ValueError(f"param_shardings expects nested mappings, got {type(params).__name__}")
  specs = walk(params, "")

  def finish(path, spec, value):
    path = "/".join(str(k.key) for k in path)
    if is_quantized(value):  # codes and statistics, from the kernel's spec
      return quantized_sharding(value, NamedSharding(mesh, P(*spec)), path)
    _check_divisible(path, value.shape, spec, mesh)
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(finish, specs, nn.unbox(params),
                                          is_leaf=lambda x: isinstance(x, tuple))


def _adapter_spec(layer: Mapping, key: str, specs: Mapping, prefix: str,
                  layouts: Mapping[str, Layout] | None) -> tuple:
  """A `lora_*` leaf's spec from its kernel's: its kernel axes keep their mesh axes."""
  shape = lambda k: nn.meta.unbox(layer[k]).shape
  if not all(k in layer for k in ("kernel", "lora_a", "lora_b")):
    raise ValueError(f"'{prefix}' holds {key} without a kernel, lora_a and lora_b")
  if layouts is not None and prefix not in layouts:
    raise ValueError(f"the layouts hold no record of layer '{prefix}'")
  try:
    layout = find_layout(shape("kernel"), shape("lora_a"), shape("lora_b"),
                         shape("lora_magnitude") if "lora_magnitude" in layer else None,
                         None if layouts is None else layouts[prefix])
  except ValueError as e:
    raise ValueError(f"'{prefix}': {e}") from None
  mesh_axes = dict(zip(layout.kernel, specs["kernel"]))
  which = {"lora_a": "a", "lora_b": "b", "lora_magnitude": "m"}[key]
  return tuple(mesh_axes.get(c) for c in layout.stored_axes(which))


def follow_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose leaves mirror params, e.g. optimizer state.

  A leaf whose path ends with a param's path and has that param's shape (Adam's
  `mu` and `nu`, say) takes the param's sharding; any other leaf (a step
  count) is replicated.
  """
  dict_keys = lambda kp: tuple(str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey))
  known = {dict_keys(kp): (leaf.shape, sharding) for (kp, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings))}

  def pick(kp, leaf):
    keys = dict_keys(kp)
    for i in range(len(keys)):
      shape, sharding = known.get(keys[i:], (None, None))
      if shape == tuple(leaf.shape):
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Inputs of shape (batch, ...): the batch split over `data` and `fsdp`."""
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


_COLLECTIVE = re.compile(
    r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\(")
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(compiled: Any) -> dict[str, int]:
  """Bytes each kind of collective produces per device, from compiled HLO.

  Args:
    compiled: `jax.jit(f).lower(...).compile()`, or its HLO text.

  Returns:
    `{'all-reduce': n, 'all-gather': n, ...}` summed over the program (a
    collective inside a loop counts once).
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  totals: dict[str, int] = {}
  for shape, kind, start in _COLLECTIVE.findall(text):
    arrays = _ARRAY.findall(shape)
    if start and len(arrays) > 1:  # async: (operand, result, ...): the result is what moves
      arrays = arrays[1:2]
    size = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in arrays)
    totals[kind] = totals.get(kind, 0) + size
  return totals
