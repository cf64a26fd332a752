"""Does a jitted LoRA train step avoid paying for the frozen base?

Compiles one AdamW train step of an MLP twice: full fine-tuning (`nn.Dense`,
every param trained) and LoRA (`lora_jax.LoRADense`, only the adapters
trained, the base passed in as a plain argument). Reports XLA's FLOP count and
memory analysis of each compiled step, and optionally their wall time.

Per layer, full fine-tuning pays three matmuls (forward, input gradient,
weight gradient; the first layer needs no input gradient), LoRA only the first
two plus rank-r terms: for L layers the FLOP ratio tends to (2L-1)/(3L-1),
7/11 = 0.64 for L = 4 (target <= 0.70). The LoRA step must also not return
the base: its output bytes are asserted to be smaller than the base's bytes
(which presumes adapters + Adam state are smaller than the base, i.e. roughly
rank < width / 6; true for the defaults and for `--width 64 --batch 8`).

Usage: python benchmarks/step_cost.py [--width 64 --batch 8] [--no-time] [--json PATH]
"""

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from machine import machine  # benchmarks/machine.py

FLOP_RATIO_TARGET = 0.70


class MLP(nn.Module):
  """`layers` square linear layers of size `width`, tanh between them."""

  width: int
  layers: int
  rank: int | None = None  # None: nn.Dense; else LoRADense of this rank

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      if self.rank is None:
        x = nn.Dense(self.width)(x)
      else:
        x = lora_jax.LoRADense(self.width, rank=self.rank, alpha=16)(x)
      x = jnp.tanh(x) if i < self.layers - 1 else x
    return x


def nbytes(tree) -> int:
  """Total bytes of the arrays in `tree`."""
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def analyse(step, args, donate):
  """Lowers and compiles `step` for concrete `args` (which stay valid).

  Returns:
    `(figures, compiled)`: XLA's FLOP count and memory analysis, and the executable.
  """
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction needs it
    compiled = jax.jit(step, donate_argnums=donate).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax
  mem = compiled.memory_analysis()
  fields = ("argument", "output", "temp", "alias", "generated_code")
  out = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes")) for f in fields}
  return dict(flops=float(cost["flops"]), **out), compiled


def wall_time(compiled, state, rest, steps: int = 10) -> float:
  """Median seconds of `steps` warm calls; the donated `state` (a copy) is fed back."""
  state = jax.block_until_ready(compiled(*jax.tree.map(jnp.copy, state), *rest)[:2])  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    *state, loss = compiled(*state, *rest)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times))

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--time", action=argparse.BooleanOptionalAction, default=True,
                 help="time 10 warm steps of each (noisy wall time)")
  p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
  a = p.parse_args()

  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (a.batch, a.width), jnp.float32)
  y = jax.random.normal(ky, (a.batch, a.width), jnp.float32)
  tx = optax.adamw(1e-4)
  full_model, lora_model = MLP(a.width, a.layers), MLP(a.width, a.layers, a.rank)

  def full_step(params, opt_state, x, y):
    loss_fn = lambda p: jnp.mean((full_model.apply({"params": p}, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def lora_step(adapters, opt_state, base, x, y):
    def loss_fn(adapters):
      out = lora_model.apply({"params": lora_jax.combine(adapters, base)}, x)
      return jnp.mean((out - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(adapters)  # grads w.r.t. adapters only
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  params = full_model.init(kp, x)["params"]
  adapters, base = lora_jax.split(lora_model.init(kp, x)["params"])
  full_args = (params, tx.init(params), x, y)
  lora_args = (adapters, tx.init(adapters), base, x, y)
  full, full_exe = analyse(full_step, full_args, donate=(0, 1))
  lora, lora_exe = analyse(lora_step, lora_args, donate=(0, 1))
  sizes = dict(trained_state_bytes=nbytes(lora_args[:2]), frozen_base_bytes=nbytes(base))
  ratio = lora["flops"] / full["flops"]
  env = machine()
  report = dict(env, config=vars(a), full=full, lora=lora, flop_ratio=ratio,
                flop_ratio_target=FLOP_RATIO_TARGET, **sizes)

  for k, v in env.items():
    print(f"{k:>10}: {v}")
  print(f"model: {a.layers} x Dense({a.width}), batch {a.batch}, fp32, AdamW; "
        f"LoRA rank {a.rank}, alpha 16")
  print(f"\n{'':22}{'full FT':>16}{'LoRA':>16}")
  for key in full:
    print(f"{key:22}{full[key]:>16,.0f}{lora[key]:>16,.0f}")
  met = "met" if ratio <= FLOP_RATIO_TARGET else "NOT met"
  print(f"\nFLOP ratio LoRA/full: {ratio:.3f} (target <= {FLOP_RATIO_TARGET:.2f}: {met})")
  copies_base = lora["output_bytes"] >= sizes["frozen_base_bytes"]
  print(f"LoRA output bytes {lora['output_bytes']:,} vs adapters + opt state "
        f"{sizes['trained_state_bytes']:,} vs frozen base {sizes['frozen_base_bytes']:,}: "
        f"{'FAIL' if copies_base else 'ok, no copy of the base is returned'}")

  if a.time:
    t_full = wall_time(full_exe, full_args[:2], full_args[2:])
    t_lora = wall_time(lora_exe, lora_args[:2], lora_args[2:])
    report.update(wall_full_s=t_full, wall_lora_s=t_lora, wall_ratio=t_lora / t_full)
    print(f"wall time (noisy, median of 10 warm steps): full {t_full * 1e3:.2f} ms, "
          f"LoRA {t_lora * 1e3:.2f} ms, ratio {t_lora / t_full:.3f}")

  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(report, f, indent=2)
  if copies_base:
    sys.exit(f"FAIL: the LoRA step outputs {lora['output_bytes']:,} bytes, not less than the "
             f"frozen base's {sizes['frozen_base_bytes']:,}: the compiled step returns the base")


if __name__ == "__main__":
  main()
