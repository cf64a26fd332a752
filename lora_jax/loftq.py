"""LoftQ: a quantized base and adapters that start where the float model was.

Plain QLoRA starts from `Q(W)` with `B = 0`, so the model begins with the
whole quantization error `W - Q(W)`. LoftQ (Li et al. 2023, as PEFT's
`loftq_init` computes it) alternates the two approximations: quantize what
the adapters do not explain, then fit the adapters to what the quantization
lost by a rank-r SVD:

    T = W;  repeat: Q = quantize(T);  A B = SVD_r(W - Q);  T = W - s A B

so that `Q + s A B` approximates `W` better than `Q(W)` alone. Here the
scale `s` (alpha / r, or rsLoRA's) is divided out of the factors, so the
identity holds for the adapter's own scaling (PEFT leaves it to alpha = r).

The base a LoftQ adapter belongs to is its own `Q`, not the float model:
save it (`lora_jax.checkpoint.save_base`) or export a merged model; a PEFT
export of the adapters needs that base too (its dequantized weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoRAConfig, PathRule
from lora_jax.quantize import QuantizedKernel, quantize, stack
from lora_jax.quantized_base import DEFAULT_EXCLUDE


def _low_rank(residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """The best rank-r factors `(in, r) @ (r, out)` of a residual, sqrt(S) on each side."""
  u, s, vh = np.linalg.svd(residual.astype(np.float64), full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vh[:rank]


def loftq(kernel: Any, rank: int, *, scale: float = 1.0, format: str = "nf4",  # noqa: A002
          iters: int = 1, block: int | None = None, double: bool = True, name: str = "kernel"
          ) -> tuple[QuantizedKernel, np.ndarray, np.ndarray]:
  """LoftQ for one `(in, out)` kernel (or a stack of them, `(layers, in, out)`).

  Args:
    kernel: the float kernel.
    rank: the adapter's rank.
    scale: the adapter's scale (`LoRAConfig.scale`): `Q + scale * A @ B ~ W`.
    format, block, double: the quantization (see `lora_jax.quantize.quantize`).
    iters: alternations (PEFT's `loftq_iter`), >= 1.
    name: the kernel's path, for errors.

  Returns:
    `(quantized kernel, lora_a (.., in, rank), lora_b (.., rank, out))`, the
    factors in float32.
  """
  if iters < 1:
    raise ValueError(f"loftq: iters={iters} must be >= 1")
  w = np.asarray(jax.device_get(nn.meta.unbox(kernel)), np.float32)
  if w.ndim == 3:
    parts = [loftq(w[i], rank, scale=scale, format=format, iters=iters, block=block,
                   double=double, name=f"{name}[{i}]") for i in range(w.shape[0])]
    return (stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
            np.stack([p[2] for p in parts]))
  if w.ndim != 2:
    raise ValueError(f"loftq: {name} has shape {w.shape}; only (in, out) kernels and stacks "
                     "of them are supported")
  target = w
  for _ in range(iters):
    q = quantize(target, format, block=block, double=double, name=name)
    left, right = _low_rank(w - np.asarray(q.dequantize(np.float32)), rank)
    target = (w - left @ right).astype(np.float32)
  root = np.sqrt(scale)
  return q, (left / root).astype(np.float32), (right / root).astype(np.float32)


def relative_error(kernel: Any, q: QuantizedKernel, lora_a: Any = None, lora_b: Any = None,
                   scale: float = 1.0) -> float:
  """`||W - (Q + s A @ B)||_F / ||W||_F` (without adapters: of `Q` alone)."""
  w = np.asarray(nn.meta.unbox(kernel), np.float64)
  approx = np.asarray(q.dequantize(np.float32), np.float64)
  if lora_a is not None:
    approx = approx + scale * np.matmul(np.asarray(lora_a, np.float64),
                                        np.asarray(lora_b, np.float64))
  return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def loftq_params(params: Mapping, config: LoRAConfig, format: str = "nf4", *,  # noqa: A002
                 iters: int = 1, exclude: Sequence[str] = DEFAULT_EXCLUDE, block: int | None = None,
                 double: bool = True) -> dict:
  """A LoftQ start for params with fresh adapters (`init_adapters` on the float base).

  Every adapted kernel not in `exclude` gets LoftQ's quantized kernel and
  factors (at the config's scale for its layer); every other kernel not in
  `exclude` is quantized plainly, as `quantize_params` does. Rules are as
  `quantize_params`'s.

  Raises:
    ValueError: for DoRA adapters, params without adapters, or adapters that
      are not `(in, r)` and `(r, out)` pairs of a Dense kernel (stacked or not).
  """
  if config.use_dora:
    raise ValueError("loftq: DoRA adapters are not supported (the magnitude would have to be "
                     "refitted to the quantized kernel); use plain LoRA")
  skip = [PathRule.suffix("exclude", e) for e in exclude]
  found = []

  def walk(tree: Mapping, prefix: str) -> dict:
    out = {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) if isinstance(v, Mapping) else v
           for k, v in tree.items()}
    if "kernel" not in tree or any(rule.matches(prefix) for rule in skip):
      return out
    box = lambda k, v: (tree[k].replace_boxed(v) if isinstance(tree[k], nn.meta.AxisMetadata)
                        else v)
    kernel = nn.meta.unbox(tree["kernel"])
    if "lora_a" not in tree:
      out["kernel"] = box("kernel", quantize(kernel, format, block=block, double=double,
                                             name=f"{prefix}/kernel"))
      return out
    a, b = nn.meta.unbox(tree["lora_a"]), nn.meta.unbox(tree["lora_b"])
    if kernel.ndim not in (2, 3) or a.shape[:-1] != kernel.shape[:-1]:
      raise ValueError(f"loftq: layer '{prefix}' is not a Dense kernel with (in, r) and "
                       f"(r, out) adapters (kernel {kernel.shape}, lora_a {a.shape})")
    q, lora_a, lora_b = loftq(kernel, a.shape[-1], scale=config.scale(prefix), format=format,
                              iters=iters, block=block, double=double, name=f"{prefix}/kernel")
    out["kernel"] = box("kernel", q)
    out["lora_a"] = box("lora_a", jnp.asarray(lora_a, a.dtype))
    out["lora_b"] = box("lora_b", jnp.asarray(lora_b, b.dtype))
    found.append(prefix)
    return out

  started = walk(dict(params), "")
  if not found:
    raise ValueError("loftq: the params hold no adapters outside `exclude`; call "
                     "init_adapters first")
  return started
