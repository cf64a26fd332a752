"""Frozen kernels in few bits: NF4 (with double quantization), int4 and int8.

QLoRA's base format. `quantize(kernel, 'nf4')` gives a `QuantizedKernel`, a
small pytree of packed codes and statistics that `dequantize` turns back
into a dense array (inside a jitted step, block by block, in the compute
dtype); `lora_jax.quantized_base` applies it to the selected kernels of a param
tree.

Layout: a kernel is `(..., in, out)` (a Dense kernel, stacked or not); its
blocks run along the input axis, one column at a time, which is torch's
row-major order of the `(out, in)` weight: the same blocks bitsandbytes
quantizes. Codes and statistics keep the kernel's axis order (with the
input axis shortened), so they shard like the kernel.

* `nf4`: QLoRA's 16 NormalFloat levels (`NF4_LEVELS`), blockwise absmax
  over `block` (64) weights, the nearest level with bitsandbytes' ties (a
  value exactly between two levels takes the lower), two codes per byte,
  the first in the high nibble. With `double` (QLoRA's double quantization),
  the float32 absmax values lose their mean (`offset`) and are quantized
  blockwise (256, in bitsandbytes' order: column by column) to 8 bits with
  bitsandbytes' signed dynamic map, rounding as its CPU kernel does (a
  65,536-entry lookup table); one float32 `absmax2` per 256 blocks.
* `int4`: symmetric, `round(w / (absmax / 7))` in [-7, 7] per block, packed
  like NF4.
* `int8`: symmetric per output channel, `round(w / (absmax / 127))`.

>>> import numpy as np
>>> w = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
>>> q = quantize(w, "nf4")
>>> q.codes.shape, q.codes.dtype.name, q.absmax.shape, q.absmax.dtype.name
((64, 8), 'uint8', (2, 8), 'uint8')
>>> bool(np.abs(np.asarray(q.dequantize()) - w).max() < 0.15 * np.abs(w).max())
True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


FORMATS = ("nf4", "int4", "int8")
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
DOUBLE_BLOCK = 256  # QLoRA's block of absmax values


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted float32s.

  Seven decades of a sign, a decimal exponent and a shrinking fraction: the
  code of double quantization. Each decade's fraction edges are
  `linspace(0.1, 1)` rounded once to float32 (torch's float32 `linspace`
  rounds some of them one ulp apart, depending on the CPU's vector width),
  their midpoints and scaled values in float32 as bitsandbytes computes them.
  """
  values = []
  for i in range(7):
    n = 2 ** i + 1
    edges = (0.1 + 0.9 * np.arange(n) / (n - 1)).astype(np.float32)
    means = (edges[:-1] + edges[1:]) / np.float32(2)
    scale = np.float32(10.0 ** (-6 + i))
    values += [scale * means, -scale * means]
  values = np.concatenate(values + [np.float32([0.0, 1.0])])
  return np.sort(np.pad(values, (0, 256 - len(values))).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _dynamic_lut() -> tuple[np.ndarray, np.ndarray]:
  """The map and its lookup table."""
  return _lookup_table(dynamic_map())


def _lookup_table(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bitsandbytes' CPU rounding to a 256-entry map: 65,536 bins of [-1, 1], each bin's
  nearest code (a bin exactly at a midpoint takes the lower), found by the bin index
  `uint16((x + 1) * 0.5 * 65535 + 0.5)` of a value x."""
  middles = np.float32(0.5) * (code[:-1] + code[1:])
  bins = np.float32(-1) + (np.float32(2) * np.arange(65536, dtype=np.float32)) / np.float32(65535)
  return code, np.searchsorted(middles, bins, side="left").astype(np.uint8)


@struct.dataclass
class QuantizedKernel:
  """A frozen kernel stored in few bits; `dequantize()` gives it back dense.

  Attributes:
    codes: uint8 (nf4, int4: two codes a byte along the input axis) or int8
      (int8), shaped like the kernel with the input axis halved (4-bit) or
      kept (int8).
    absmax: per block (nf4, int4: `(..., in // block, out)`) or per output
      channel (int8: `(..., 1, out)`) float32 absmax; with double
      quantization, their uint8 codes.
    absmax2: double quantization's float32 scale per 256 blocks, `(..., n)`.
    offset: double quantization's mean of the absmax values, `(...,)`.
    format: 'nf4', 'int4' or 'int8'.
    dtype: the kernel's dtype name (what `dequantize()` returns by default).
    block: weights per block along the input axis (int8: the whole axis).
  """

  codes: jax.Array
  absmax: jax.Array
  absmax2: jax.Array | None
  offset: jax.Array | None
  format: str = struct.field(pytree_node=False)
  dtype: str = struct.field(pytree_node=False)
  block: int = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    """The kernel's shape (read from the codes, so a layer sliced out of a stack by
    `nn.scan` knows its own)."""
    *lead, n_in, n_out = self.codes.shape
    return (*lead, n_in * (1 if self.format == "int8" else 2), n_out)

  @property
  def double(self) -> bool:
    """Whether the absmax values are double-quantized."""
    return self.absmax2 is not None

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes and every statistic."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in (self.codes, self.absmax, self.absmax2, self.offset) if x is not None)

  @property
  def bits_per_weight(self) -> float:
    """Stored bits over the kernel's weights."""
    return 8 * self.nbytes / int(np.prod(self.shape))

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The dense kernel in `dtype` (default: the kernel's own), computed in float32."""
    return _dequantize(self).astype(dtype or self.dtype)


def _blocks(w: jax.Array, block: int) -> jax.Array:
  """`(..., in, out)` -> `(..., in // block, block, out)`."""
  *lead, n_in, n_out = w.shape
  return w.reshape(*lead, n_in // block, block, n_out)


def _pack(q: jax.Array) -> jax.Array:
  """4-bit codes `(..., in, out)` -> bytes `(..., in // 2, out)`, the first code high."""
  q = q.astype(jnp.uint8)
  return (q[..., 0::2, :] << 4) | q[..., 1::2, :]


def _unpack(codes: jax.Array) -> jax.Array:
  """The inverse of `_pack`."""
  both = jnp.stack([codes >> 4, codes & 15], axis=-2)  # (..., in // 2, 2, out)
  return both.reshape(*codes.shape[:-2], 2 * codes.shape[-2], codes.shape[-1])


def _column_major(x: jax.Array) -> jax.Array:
  """`(..., nb, out)` statistics flattened in torch's order of the `(out, in)` weight."""
  return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)


def _count_above(x: jax.Array, edges: np.ndarray) -> jax.Array:
  """How many `edges` lie strictly below each `x` (elementwise: no `(..., len(edges))`
  intermediate): the index of x's nearest level, a tie taking the lower."""
  return sum((x > np.float32(e)).astype(jnp.uint8) for e in edges)


def _double(absmax: jax.Array, table: tuple[np.ndarray, np.ndarray] | None = None,
            whole: jax.sharding.NamedSharding | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """QLoRA's double quantization of `(..., nb, out)` absmax: uint8 codes, absmax2, offset.

  `whole`, for absmax sharded over devices, gathers the flat absmax (split along
  its leading axes only) first: their mean is then summed in one order however
  the kernel was sharded, so a sharded kernel's statistics equal an unsharded one's.
  """
  _, lut = table or _dynamic_lut()
  flat = _column_major(absmax)                                   # (..., nb * out)
  if whole is not None:
    flat = jax.lax.with_sharding_constraint(flat, whole)
  # Materialized before the mean, so no fusion with what made it changes the sum's order.
  flat = jax.lax.optimization_barrier(flat)
  offset = flat.mean(axis=-1)
  x = flat - offset[..., None]
  n = x.shape[-1]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -n % DOUBLE_BLOCK)])
  groups = padded.reshape(*x.shape[:-1], -1, DOUBLE_BLOCK)
  absmax2 = jnp.abs(groups).max(axis=-1)
  inverse = np.float32(1) / jnp.where(absmax2 == 0, np.float32(1), absmax2)
  scaled = jnp.clip(groups * inverse[..., None], np.float32(-1), np.float32(1))
  index = ((scaled + np.float32(1)) * np.float32(0.5) * np.float32(65535)
           + np.float32(0.5)).astype(jnp.uint16)
  q = jnp.where(absmax2[..., None] == 0, jnp.uint8(0), jnp.asarray(lut)[index])
  q = q.reshape(*x.shape[:-1], -1)[..., :n]
  nb, out = absmax.shape[-2:]
  codes = jnp.swapaxes(q.reshape(*absmax.shape[:-2], out, nb), -1, -2)
  return codes, absmax2, offset


@functools.partial(jax.jit, static_argnames=("format", "block", "double", "whole"))
def _quantize(w: jax.Array, format: str, block: int, double: bool,  # noqa: A002
              whole: jax.sharding.NamedSharding | None = None) -> tuple[jax.Array, ...]:
  """A kernel's `(codes, absmax, absmax2, offset)`, computed in float32 on its devices
  (`whole`: as for `_double`)."""
  w = w.astype(jnp.float32)
  if format == "int8":
    absmax = jnp.abs(w).max(axis=-2, keepdims=True)
    scale = absmax / np.float32(127)
    codes = jnp.round(w / jnp.where(scale == 0, np.float32(1), scale)).astype(jnp.int8)
    return codes, absmax, None, None
  blocks = _blocks(w, block)
  absmax = jnp.abs(blocks).max(axis=-2)                          # (..., nb, out)
  safe = jnp.where(absmax == 0, np.float32(1), absmax)  # a zero block: codes of 0.0
  scaled = jnp.clip(blocks * (np.float32(1) / safe)[..., None, :], np.float32(-1),
                    np.float32(1))
  if format == "nf4":
    q = _count_above(scaled, (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2))
  else:
    q = (jnp.clip(jnp.round(scaled * np.float32(7)), -7, 7) + 8).astype(jnp.uint8)
  codes = _pack(q.reshape(w.shape))
  if format == "nf4" and double:
    return (codes, *_double(absmax, whole=whole))
  return codes, absmax, None, None


def quantize(kernel: Any, format: str = "nf4", *, block: int | None = None,  # noqa: A002
             double: bool = True, name: str = "kernel",
             sharding: jax.sharding.NamedSharding | None = None) -> QuantizedKernel:
  """Quantizes a `(..., in, out)` kernel where it lies (jitted; abstract kernels give
  abstract results under `jax.eval_shape`).

  Args:
    kernel: the dense kernel (any float dtype; it is read as float32).
    format: 'nf4', 'int4' or 'int8'.
    block: weights per block along the input axis: 64 by default for nf4
      and int4 (int4 also takes 128); int8 is per output channel.
    double: double-quantize the absmax values (nf4 only: QLoRA's default).
    name: the kernel's path, for errors.
    sharding: the dense kernel's sharding: each device then quantizes its own
      slice and keeps its slice of the codes and statistics
      (`quantized_sharding`); statistics that span shards (double
      quantization's mean and its groups of 256 blocks) are reduced across them.

  Raises:
    ValueError: for an unknown format, a kernel that is already quantized or
      not at least 2-D, a block that does not divide the input axis, or (with
      `sharding`) blocks that would straddle shards.
  """
  kernel = nn.meta.unbox(kernel)
  if isinstance(kernel, QuantizedKernel):
    raise ValueError(f"{name} is already quantized ({kernel.format})")
  if format not in FORMATS:
    raise ValueError(f"unknown quantization format {format!r}; expected one of {FORMATS}")
  shape, dtype = tuple(kernel.shape), jnp.dtype(kernel.dtype).name
  if len(shape) < 2:
    raise ValueError(f"{name} has shape {shape}: only kernels of 2 or more axes quantize")
  if format == "int8":
    block = shape[-2]
  else:
    block = 64 if block is None else block
    if block < 2 or block % 2 or shape[-2] % block:
      raise ValueError(f"{name}: a block of {block} weights does not divide its input axis "
                       f"of {shape[-2]} (shape {shape}); choose a block that does (even, "
                       "e.g. 64 or 32)")
  double = double and format == "nf4"
  if not isinstance(kernel, (jax.Array, jax.ShapeDtypeStruct, jax.core.Tracer)):
    kernel = np.asarray(kernel)
  make = lambda arrays: QuantizedKernel(*arrays, format, dtype, block)
  if sharding is None:
    return make(_quantize(kernel, format, block, double))
  abstract = make(jax.eval_shape(functools.partial(_quantize, format=format, block=block,
                                                   double=double), kernel))
  placed = quantized_sharding(abstract, sharding, name)
  out = (placed.codes, placed.absmax, placed.absmax2, placed.offset)
  return make(_sharded_quantizer(format, block, double, out)(kernel))


@functools.lru_cache(maxsize=None)
def _sharded_quantizer(format: str, block: int, double: bool, out: tuple) -> Any:  # noqa: A002
  return jax.jit(functools.partial(_quantize, format=format, block=block, double=double,
                                   whole=out[2]), out_shardings=out)


def _absmax(q: QuantizedKernel) -> jax.Array:
  """The float32 absmax values, `(..., nb, out)`."""
  if not q.double:
    return q.absmax
  code, _ = _dynamic_lut()
  lead, (nb, out) = q.absmax.shape[:-2], q.absmax.shape[-2:]
  values = jnp.asarray(code)[jnp.swapaxes(q.absmax, -1, -2).reshape(*lead, -1)]
  n = nb * out
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, -n % DOUBLE_BLOCK)])
  values = values.reshape(*lead, -1, DOUBLE_BLOCK) * q.absmax2[..., None]
  values = values.reshape(*lead, -1)[..., :n] + q.offset[..., None]
  return jnp.swapaxes(values.reshape(*lead, out, nb), -1, -2)


def _dequantize(q: QuantizedKernel) -> jax.Array:
  if q.format == "int8":
    return q.codes.astype(jnp.float32) * (q.absmax / 127)
  codes = _unpack(q.codes).astype(jnp.int32)
  values = (jnp.asarray(NF4_LEVELS)[codes] if q.format == "nf4"
            else (codes - 8).astype(jnp.float32) / 7)
  *lead, n_in, n_out = q.shape
  values = values.reshape(*lead, n_in // q.block, q.block, n_out)
  return (values * _absmax(q)[..., None, :]).reshape(q.shape)


def dequantize(x: Any, dtype: Any = None) -> Any:
  """A dense array from a `QuantizedKernel` (other arrays pass through)."""
  return x.dequantize(dtype) if isinstance(x, QuantizedKernel) else x


def is_quantized(x: Any) -> bool:
  """Whether `x` is a `QuantizedKernel` (a leaf for tree maps with `is_leaf`)."""
  return isinstance(x, QuantizedKernel)


def stack(parts: Sequence[QuantizedKernel], sharding: QuantizedKernel | None = None
          ) -> QuantizedKernel:
  """Quantized kernels of equal shape and format as one stacked (layers-first) kernel,
  placed by `sharding` (from `quantized_sharding`) if given."""
  fields = ("codes", "absmax", "absmax2", "offset")
  arrays = [tuple(getattr(p, k) for k in fields) for p in parts]
  out = None if sharding is None else tuple(getattr(sharding, k) for k in fields)
  stacked = jax.jit(lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs),
                    out_shardings=out)(*arrays)
  return parts[0].replace(**dict(zip(fields, stacked)))


def quantized_sharding(q: QuantizedKernel, kernel: jax.sharding.NamedSharding,
                       name: str = "kernel") -> QuantizedKernel:
  """Shardings for a quantized kernel's arrays from its dense kernel's sharding.

  Raises:
    ValueError: naming the kernel and mesh axis where a block would straddle shards.
  """
  spec = tuple(kernel.spec) + (None,) * (len(q.shape) - len(kernel.spec))
  mesh = kernel.mesh
  size = lambda axes: int(np.prod([mesh.shape[a] for a in
                                   ((axes,) if isinstance(axes, str) else axes or ())]))
  absmax_spec = spec if q.format != "int8" else (*spec[:-2], None, spec[-1])  # one per column
  for arr, what, arr_spec in ((q.codes, "codes", spec), (q.absmax, "absmax", absmax_spec)):
    for dim, axes in zip(arr.shape, arr_spec):
      if dim % size(axes):
        raise ValueError(
            f"{name}: its {what} {arr.shape} (blocks of {q.block}) cannot be split over mesh "
            f"axis {axes!r} of size {size(axes)}: a block would straddle two shards; choose a "
            "smaller block or leave that axis unsharded")
  named = lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  lead = spec[:len(q.shape) - 2]
  return q.replace(
      codes=named(spec), absmax=named(absmax_spec),
      absmax2=None if q.absmax2 is None else named((*lead, None)),
      offset=None if q.offset is None else named(lead))
