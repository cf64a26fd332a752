"""Random test inputs and adapter values drawn on the host with numpy.

`jax.random` compiles a new program for every shape and dtype it draws (its
threefry hash is slow to compile on a CPU: a second or more each), and tests
that perturb every adapter leaf of a model draw many shapes. Values the tests
only need to be random, not to come from `jax.random`, are drawn here
instead: deterministic per seed, and put on the device without compiling
anything.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def normal(seed: int, shape: tuple[int, ...], dtype: Any = jnp.float32,
           std: float = 1.0) -> jax.Array:
  """Normal values of `shape`, drawn in float32 and cast to `dtype`.

  Args:
    seed: the numpy generator's seed.
    shape: the array's shape.
    dtype: the array's dtype (float32 values rounded to it).
    std: the standard deviation (the mean is 0).

  Returns:
    A device array.
  """
  values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(std)
  return jnp.asarray(values.astype(jnp.dtype(dtype)))


def uniform(seed: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Values uniform in [0, 1) of `shape`, drawn in float32 and cast to `dtype`."""
  values = np.random.default_rng(seed).random(shape, np.float32)
  return jnp.asarray(values.astype(jnp.dtype(dtype)))


def nudge(leaf: jax.Array, seed: int, size: float) -> jax.Array:
  """`leaf + size * N(0, 1)`, computed on the host in float32 and returned in the leaf's dtype."""
  host = np.asarray(leaf, np.float32)
  noise = np.random.default_rng(seed).standard_normal(host.shape).astype(np.float32)
  return jnp.asarray((host + np.float32(size) * noise).astype(leaf.dtype))


def scale(leaf: jax.Array, seed: int, size: float) -> jax.Array:
  """`leaf * (1 + size * U[0, 1))`, computed on the host in float32, in the leaf's dtype."""
  host = np.asarray(leaf, np.float32)
  factor = 1 + np.float32(size) * np.random.default_rng(seed).random(host.shape, np.float32)
  return jnp.asarray((host * factor).astype(leaf.dtype))
