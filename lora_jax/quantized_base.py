"""A frozen base of quantized kernels: which kernels of a param tree quantize,
the tree quantized and dequantized, what it stores, its kernels quantized again
after a merge, and where their codes lie on a mesh.

One kernel's format (`QuantizedKernel`, `quantize`, `dequantize`) is
`lora_jax.quantize`'s; this module applies it to param trees. A train step
holds unboxed params, so it tells the layers each quantized kernel's logical
axes with `kernel_axes` (from `quantized_axes`); a layer reads them with
`axes_of` and gathers 4 or 8 bits a weight over `fsdp`, not the dequantized
kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import PathRule, join_path
from lora_jax.quantize import dequantize, is_quantized, quantize, quantized_sharding

DEFAULT_EXCLUDE = ("lm_head",)  # the output head stays in its dtype


def selector(paths: Sequence[str], targets: Sequence[str] = (".*",),
             exclude: Sequence[str] = DEFAULT_EXCLUDE) -> Callable[[str], bool]:
  """Which of the param `paths` are kernels to quantize: `kernel` leaves whose module
  path has a trailing run matching a `targets` regex and none of `exclude`'s.

  Raises:
    ValueError: for a rule that selects no kernel among `paths`.
  """
  take = [PathRule.suffix("targets", t) for t in targets]
  skip = [PathRule.suffix("exclude", e) for e in exclude]
  modules = [p.rsplit("/", 1)[0] for p in paths if p.endswith("/kernel")]
  # The default exclusion may match nothing: models with tied embeddings have no head.
  for rule in take + (skip if tuple(exclude) != DEFAULT_EXCLUDE else []):
    if not any(rule.matches(m) for m in modules):
      raise ValueError(f"quantize {rule} matches no kernel; kernels: {modules[:8]}")

  def selected(path: str) -> bool:
    module = path.rsplit("/", 1)[0]
    return (path.endswith("/kernel") and any(r.matches(module) for r in take)
            and not any(r.matches(module) for r in skip))

  return selected


def quantize_params(params: Mapping, format: str = "nf4", *,  # noqa: A002
                    targets: Sequence[str] = (".*",), exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    block: int | None = None, double: bool = True,
                    shardings: Any = None) -> dict:
  """The param tree with its selected kernels quantized (a frozen QLoRA base).

  Only `kernel` leaves are candidates: embeddings, norms and biases keep
  their dtype. A kernel's metadata box (its logical axis names) now holds
  its `QuantizedKernel`, so `lora_jax.param_shardings` shards it. Rules are
  regexes over a trailing run of a kernel's module path (as
  `LoRAConfig.trainable`'s), `exclude` winning; by default every kernel but
  the output head. Works on abstract params too (`jax.eval_shape`).

  Args:
    shardings: the float params' shardings (a tree like the unboxed params):
      each kernel is quantized where it lies, into codes and statistics
      sharded like it (see `quantize`).

  Raises:
    ValueError: for a tree that already holds quantized kernels, a rule that
      selects no kernel, or a kernel `quantize` refuses (naming it).
  """
  plain = nn.unbox(params)
  leaves = jax.tree_util.tree_leaves_with_path(plain, is_leaf=is_quantized)
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata) or is_quantized(x)
  done = [join_path(kp) for kp, x in leaves if is_quantized(x)]
  if done:
    raise ValueError(f"the params are already quantized (e.g. {done[0]}); quantize the float "
                     "base once")
  selected = selector([join_path(kp) for kp, _ in leaves], targets, exclude)
  placement = {} if shardings is None else {
      join_path(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(shardings)}

  def one(kp, x):
    path = join_path(kp)
    if not selected(path):
      return x
    quantized = quantize(x, format, block=block, double=double, name=path,
                         sharding=placement.get(path))
    # A kernel's logical axis names stay on it: its codes and statistics shard by them.
    return x.replace_boxed(quantized) if isinstance(x, nn.meta.AxisMetadata) else quantized

  return jax.tree_util.tree_map_with_path(one, dict(params), is_leaf=boxed)


def footprint(params: Any) -> dict[str, int]:
  """What a param tree stores (arrays or `jax.ShapeDtypeStruct`s): `bytes` and `weights` in
  all, and `quantized_bytes` and `quantized_weights` of its quantized kernels."""
  out = dict.fromkeys(("bytes", "weights", "quantized_bytes", "quantized_weights"), 0)
  for x in jax.tree.leaves(nn.unbox(params), is_leaf=is_quantized):
    weights = int(np.prod(x.shape))
    stored = x.nbytes if is_quantized(x) else weights * np.dtype(x.dtype).itemsize
    out["bytes"] += stored
    out["weights"] += weights
    if is_quantized(x):
      out["quantized_bytes"] += stored
      out["quantized_weights"] += weights
  return out


def requantize_like(params: Mapping, like: Mapping) -> tuple[dict, dict[str, float]]:
  """Merge path (b): the kernels of a dense tree (e.g. `lora_jax.merge` of adapters on a
  quantized base) quantized again wherever `like` (that base) holds a `QuantizedKernel`, in
  its format, block and double quantization (where each kernel lies).

  Returns:
    `(params, errors)`: the tree, and per requantized kernel the error requantizing
    added, `||Q(M) - M||_F / ||M||_F` of the merged kernel M.

  Raises:
    ValueError: when a quantized kernel of `like` is missing from `params`.
  """
  reference = {join_path(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(
      nn.unbox(like), is_leaf=is_quantized) if is_quantized(x)}
  plain = nn.unbox(params)
  present = {join_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(plain)}
  missing = sorted(reference.keys() - present)
  if missing:
    raise ValueError(f"requantize_like: the params lack quantized kernels of the base, e.g. "
                     f"'{missing[0]}'")
  errors = {}

  def one(kp, x):
    path = join_path(kp)
    if path not in reference:
      return x
    ref, where = reference[path], getattr(x, "sharding", None)
    q = quantize(x, ref.format, block=ref.block, double=ref.double, name=path,
                 sharding=where if isinstance(where, jax.sharding.NamedSharding) else None)
    x32 = jnp.asarray(x, jnp.float32)
    errors[path] = float(jnp.linalg.norm(q.dequantize(jnp.float32) - x32)
                         / jnp.maximum(jnp.linalg.norm(x32), 1e-30))
    return q

  return jax.tree_util.tree_map_with_path(one, plain), errors


def dequantize_params(params: Mapping, dtype: Any = None) -> dict:
  """Every `QuantizedKernel` of a tree dense again (for inspection and merging)."""
  return jax.tree.map(lambda x: dequantize(x, dtype), nn.unbox(params), is_leaf=is_quantized)


def quantized_shardings(params: Any, shardings: Any) -> Any:
  """`shardings` of the float params (`lora_jax.param_shardings`) made to fit `params`
  where they hold quantized kernels: codes and block absmax shard like their kernel, the
  double-quantization statistics follow its stacked (layer) axes only.

  Raises:
    ValueError: naming the kernel and mesh axis where a block would straddle shards.
  """
  def one(kp, x, s):
    return quantized_sharding(x, s, join_path(kp)) if is_quantized(x) else s

  return jax.tree_util.tree_map_with_path(one, nn.unbox(params), shardings,
                                          is_leaf=is_quantized)


_KERNEL_AXES: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "quantized_kernel_axes", default=None)


def quantized_axes(params: Any) -> dict[str, tuple | None]:
  """Module path -> logical axis names of each quantized kernel of boxed `params`."""
  names = {}
  for kp, x in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)):
    if isinstance(x, nn.meta.AxisMetadata) and is_quantized(getattr(x, "value", None)):
      names[join_path(kp).rsplit("/", 1)[0]] = getattr(x, "names", None)
  return names


@contextlib.contextmanager
def kernel_axes(names: dict[str, tuple | None]) -> Iterator[None]:
  """Within: the layers that run on quantized kernels know their logical axis names
  (`quantized_axes`; read with `axes_of`).

  A train step holds unboxed params; with the names, a layer gathers its kernel's codes
  over the `fsdp` mesh axis before dequantizing, as FSDP gathers a float kernel, so 4 or 8
  bits a weight cross the wire instead of the compute dtype.
  """
  token = _KERNEL_AXES.set(names)
  try:
    yield
  finally:
    _KERNEL_AXES.reset(token)


def axes_of(module_path: str) -> tuple | None:
  """The logical axis names of the quantized kernel at `module_path` (see `kernel_axes`)."""
  return (_KERNEL_AXES.get() or {}).get(module_path)
