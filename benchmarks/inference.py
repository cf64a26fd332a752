"""Forward latency of base, merged and unmerged LoRA models, and what `lora_jax.merge` costs.

Workers for compare.py (each prints one `@@ {json}` line):

  python inference.py forward SPEC_JSON
      The plain Llama's jitted forward on the base params and on merged params
      (`lora_jax.merge` of a rank-16 adapter), and the injected model's forward
      unmerged at ranks 8, 16 and 64: XLA FLOPs of each compiled forward and the
      median wall time of interleaved warm calls. The adapters are random, A
      and B (as after training), so merging changes the kernels.

  python inference.py merge jit|eager SPEC_JSON
      Merge time and memory of a rank-16 adapter on the model, in a fresh
      process: `jit`: `jax.jit(merge, static_argnums=1, donate_argnums=0)`
      (XLA's memory analysis too); `eager`: `lora_jax.merge(params, config)`.
      `rss_before`: the resident set once the params exist (and the merge is
      compiled); `peak_rss_first`: the peak during the first merge (VmHWM,
      reset just before it).
"""

from __future__ import annotations

import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from contenders import TARGETS, _linen_base, _send, peak_rss_bytes, reset_peak_rss, rss_bytes

RANKS = (8, 16, 64)
MERGE_RANK = 16


def lora_model(llama, rank: int):
  """The injected model and its config (alpha = 2 x rank)."""
  config = lj.LoRAConfig(rank=rank, alpha=2 * rank, targets=list(TARGETS))
  return lj.inject(llama, config), config


def trained_adapters(model, base, ids, rank: int) -> dict:
  """Adapters as after training: A and B random, N(0, 0.02) (a nonzero B: merging changes
  the kernels). Shapes from `init_adapters` on abstract params; values from numpy (no
  compilation)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  shapes = lj.split(lj.init_adapters(model, abstract, jax.random.key(0), ids))[0]
  rng = np.random.default_rng(rank)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(s.dtype)), shapes)


def flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def forward(spec: dict) -> dict:
  llama, base, ids = _linen_base(spec)
  plain = jax.jit(lambda p, x: llama.apply({"params": p}, x))
  calls = {"base": lambda: plain(base, ids)}
  result = {"flops": {"base": flops(plain, base, ids)}, "hlo_equal": {}}
  for rank in RANKS:
    model, config = lora_model(llama, rank)
    params = lj.combine(trained_adapters(model, base, ids, rank), base)
    unmerged = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
    calls[f"unmerged_r{rank}"] = lambda f=unmerged, p=params: f(p, ids)
    result["flops"][f"unmerged_r{rank}"] = flops(unmerged, params, ids)
    if rank == MERGE_RANK:
      merged = jax.jit(lj.merge, static_argnums=1)(params, config)
      calls["merged"] = lambda m=merged: plain(m, ids)
      result["flops"]["merged"] = flops(plain, merged, ids)
      # The merged tree is the plain model's: the same program as the base forward.
      result["hlo_equal"]["merged_vs_base"] = (
          plain.lower(merged, ids).as_text() == plain.lower(base, ids).as_text())
      result["merged_vs_unmerged_max_abs_diff"] = float(
          jnp.max(jnp.abs(plain(merged, ids) - unmerged(params, ids))))
  times = {name: [] for name in calls}
  for name, call in calls.items():  # warm-up: compile
    call().block_until_ready()
  for i in range(spec["forward_reps"]):
    for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
      t0 = time.perf_counter()
      calls[name]().block_until_ready()
      times[name].append(time.perf_counter() - t0)
  result["median_s"] = {k: float(np.median(v)) for k, v in times.items()}
  result["times_s"] = times
  result["reps"] = spec["forward_reps"]
  return result


def merge(spec: dict, mode: str, reps: int = 3) -> dict:
  from contenders import batch_ids
  from lora_jax.models.llama import Llama, LlamaConfig
  llama = Llama(LlamaConfig(**spec["size"]))
  ids = jnp.asarray(batch_ids(spec))
  model, config = lora_model(llama, MERGE_RANK)

  init = jax.jit(lambda k: nn.unbox(llama.init(k, ids)["params"]))
  make = lambda: (lambda base: lj.combine(trained_adapters(model, base, ids, MERGE_RANK), base))(
      init(jax.random.key(0)))

  params = make()  # nothing else is held: RSS from here on is the params and the merge
  out = {"mode": mode, "rank": MERGE_RANK,
         "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}
  if mode == "jit":
    jitted = jax.jit(lj.merge, static_argnums=1, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, config).compile()
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out.update({f"xla_{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes"))
                for f in ("argument", "output", "temp", "alias")})
    run = compiled
  else:  # the first call also compiles each distinct eager op
    run = lambda p: lj.merge(p, config)
  out["rss_before"] = rss_bytes()
  reset_peak_rss()  # the peak of the first merge alone
  times = []
  for i in range(reps):
    if i and mode == "jit":  # the last call consumed (donated) its params
      params = make()
    t0 = time.perf_counter()
    merged = jax.block_until_ready(run(params))
    times.append(time.perf_counter() - t0)
    if i == 0:
      out["peak_rss_first"] = peak_rss_bytes()
      out["rss_after_first"] = rss_bytes()
    del merged
  out["times_s"], out["median_s"] = times, float(np.median(times))
  return out


if __name__ == "__main__":
  what, *mode, spec = sys.argv[1:]
  _send(forward(json.loads(spec)) if what == "forward" else merge(json.loads(spec), *mode))
