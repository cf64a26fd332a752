"""End-to-end demo: adapt a pretrained MLP to a new task with LoRA.

Run with `python -m lora_jax.demo`. The script

1. pretrains a small MLP of plain `nn.Dense` layers on one regression task,
2. loads those weights unchanged into the same MLP built from `LoRADense`
   layers and checks that it starts out as the pretrained model,
3. fine-tunes only the adapters (`lora_jax.optimizer`) on a shifted task,
   printing the loss, with the base weights bit-identical at the end,
4. merges the adapters into the base weights and checks that the plain MLP
   with merged weights gives the LoRA model's loss.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj


class MLP(nn.Module):
  """Three hidden layers; `dense` picks plain or LoRA layers."""

  width: int = 128
  dense: type = nn.Dense
  lora: dict | None = None

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.gelu(self.dense(self.width, name=f"hidden_{i}", **(self.lora or {}))(x))
    return self.dense(1, name="out", **(self.lora or {}))(x)


def _task(key, n: int, shift: float):
  """y = sin(x . w + shift) on random x: `shift` turns one task into another."""
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, 16))
  w = jax.random.normal(jax.random.key(42), (16,)) / 4.0
  return x, jnp.sin(x @ w + shift)[:, None] + 0.3 * jnp.cos(3 * x[:, :1])


def _fit(loss_fn, params, tx, steps: int, every: int, label: str):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  for i in range(steps):
    params, state, loss = step(params, state)
    if i % every == 0 or i == steps - 1:
      print(f"  {label} step {i:4d}  loss {float(loss):.4g}")
  return params


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(prog="python -m lora_jax.demo", description=__doc__.split("\n")[0])
  parser.add_argument("--pretrain-steps", type=int, default=300)
  parser.add_argument("--steps", type=int, default=300, help="LoRA fine-tuning steps")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  key = jax.random.key(args.seed)
  k_init, k_a, k_b, k_lora = jax.random.split(key, 4)
  xa, ya = _task(k_a, 512, shift=0.0)
  xb, yb = _task(k_b, 512, shift=1.0)

  plain = MLP()
  mse = lambda model, x, y: lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  print(f"1. pretraining a plain MLP on task A ({args.pretrain_steps} steps)")
  base = plain.init(k_init, xa)["params"]
  base = _fit(mse(plain, xa, ya), base, optax.adam(3e-3), args.pretrain_steps,
              max(args.pretrain_steps // 3, 1), "pretrain")

  config = lj.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
  model = MLP(dense=lj.LoRADense, lora={"rank": config.rank, "alpha": config.alpha})
  fresh = model.init(k_lora, xb)["params"]
  adapters, _ = lj.split(fresh)
  params = lj.combine(adapters, base)  # the pretrained weights, unchanged
  before = float(mse(model, xb, yb)(params))
  assert before == float(mse(plain, xb, yb)(base)), "zero-init LoRA must equal the base model"
  print(f"2. LoRA model built on the pretrained weights: task B loss {before:.4g}")
  lj.summary(params, config)

  print(f"3. fine-tuning the adapters only on task B ({args.steps} steps)")
  tx = lj.optimizer(optax.adamw(3e-3), params, config)
  tuned = _fit(mse(model, xb, yb), params, tx, args.steps, max(args.steps // 5, 1), "lora")
  after = float(mse(model, xb, yb)(tuned))
  frozen_equal = all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(lj.split(tuned)[1]), jax.tree.leaves(base)))
  print(f"   task B loss {before:.4g} -> {after:.4g}; base weights unchanged: {frozen_equal}")

  merged = lj.merge(tuned, config)
  merged_loss = float(mse(plain, xb, yb)(merged))
  print(f"4. merged into the plain MLP: task B loss {merged_loss:.4g} "
        f"(LoRA model {after:.4g})")
  print(f"done in {time.perf_counter() - start:.1f}s")
  return {"before": before, "after": after, "merged": merged_loss,
          "frozen_equal": float(frozen_equal)}


if __name__ == "__main__":
  main()
