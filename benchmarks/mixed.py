"""Mixed batches of K adapters: generation, the per-example layer, training and hot swaps.

One model (compare.py's `small` Llama: 20.2M params, fp32; `--tiny`: one
layer of the `tiny` preset), rank-16 adapters (alpha 32) on every linear layer
(q/k/v/o/gate/up/down), A and B random as after training. In one run:

1. **Generation.** `lora_jax.models.llama.generate` (KV cache, greedy) of a
   batch of 16 prompts of 64 tokens, 32 new tokens, through
   * `merged`: the plain model on `lora_jax.merge`d params;
   * `single`: one adapter, `inject(llama, config)` (the unmerged model);
   * `K=k`: an `AdapterStack` of k adapters (`lora_jax.stack_adapters`),
     `inject(llama, stack.spec)` with `adapter_ids` spread evenly over the
     batch (sorted: rows 0-1 adapter 0, rows 2-3 adapter 1, ... for K=8).
   Timed interleaved (the order reversed every other round); tokens/s counts
   new tokens. Ratios are to `single`: of the medians, and the median of each
   round's own ratio. Beside each: the bytes of base + adapters, XLA's
   `cost_analysis()` and `memory_analysis()` of the compiled generate
   program (the jitted `_generate`; XLA counts its decode loop's body once,
   so its FLOPs are the prefill plus one decode step), and of one decode step
   alone (the model's `apply(decode=True)` on one token a row), also timed.
   From each compiled program's HLO: the per-example copies of the adapters
   that `jnp.take` makes (gathers, or broadcasts for one adapter), inside the
   decode loop's body or outside it, and their bytes.
2. **The layer.** Three ways to give each example of a batch sorted by adapter
   its own adapter in a Dense layer (the model's gate_proj, 512 -> 1408, rank
   16): `weighed`, what lora_jax does (every example through all K A's at
   once, weighed by a one-hot of its id, then all K B's at once: no copies),
   `gather` (`jnp.take` of A and B per example, then batched einsums: what
   lora_jax did before) and `grouped` (`jax.lax.ragged_dot` over the sorted
   tokens with each adapter's group size), for K = 1..16 and 16 examples of
   1, 16 and 64 tokens; with the base matmul and one adapter's `x @ A @ B`
   for scale. Wall time and XLA's FLOPs. These are CPU figures: XLA:CPU and
   the TPU compiler lower `ragged_dot` differently.
3. **Training.** One AdamW step of K stacked adapters
   (`lora_jax.train.MixedLoss`), each on its 16/K examples of the batch of 16
   x 64 tokens, against K steps of the single-adapter model
   (`causal_lm_loss`), one per adapter on its own examples: wall time (the
   K steps back to back) and compiled FLOPs and memory, K = 2, 4, 8.
4. **Hot swap.** `stack.swap(...)` on the K=8 stack (an adapter of the same
   config, then a rank-8 adapter of other targets: padded) and the next
   generate call: the jit cache must not grow (asserted). Against it, a
   fresh trace, lower and compile of the same program (after
   `jax.clear_caches()`).

CPU figures are CPU estimates: XLA:CPU is not the TPU compiler, and on a TPU
the decode steps are memory-bound where here they are not only that.

Writes `benchmarks/results/mixed.json` (every figure, every time) and
`mixed.md` (the tables).

Usage (from the repository root):
  python benchmarks/mixed.py                   # ~11 min on 2 busy CPU cores (--reps 7: 13-16)
  python benchmarks/mixed.py --tiny --out DIR  # a tiny model, 1 rep: the smoke test, < 1 min
  python benchmarks/mixed.py --report benchmarks/results/mixed.json  # re-render mixed.md
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--tiny" in sys.argv[1:]:
  # Before jax is imported: compile faster (LLVM unoptimised); --tiny's timings mean nothing.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax import sharding, train  # noqa: E402
from lora_jax.models import generation as generation_lib, llama as llama_lib  # noqa: E402
from machine import machine, write_results  # noqa: E402  (benchmarks/machine.py)

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS = {
    # compare.py's small Llama: 20.2M params.
    "full": dict(model=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                            num_layers=4, num_heads=8, num_kv_heads=4,
                            max_position_embeddings=2048),
                 rank=16, batch=16, prompt=64, new=32, ks=(1, 2, 4, 8, 16), train_ks=(2, 4, 8),
                 train_seq=64, layer=(512, 1408), layer_tokens=(1, 16, 64),
                 layer_ks=(1, 2, 4, 8, 16), reps=5, layer_reps=20),
    # One layer of the `tiny` preset; as few programs as cover every section.
    "tiny": dict(model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=128),
                 rank=4, batch=4, prompt=8, new=4, ks=(2,), train_ks=(2,), train_seq=8,
                 layer=(64, 128), layer_tokens=(2,), layer_ks=(1, 2), reps=1, layer_reps=2),
}


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _cost(compiled) -> dict:
  """XLA's FLOPs, bytes accessed and memory plan of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes"))
         for f in ("argument", "output", "temp", "alias")}
  out["total_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                        - out["alias_bytes"])
  return dict(flops=float(cost.get("flops", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", 0.0)), **out)


_TAKE = re.compile(r"= (\w+)\[([\d,]*)\]\S* (gather|broadcast)\(.*op_name=\"([^\"]*_proj/"
                   r"jit\(_take\)/gather)\"")
_ITEMSIZE = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1}


def adapter_gathers(hlo: str) -> dict:
  """The adapters' per-example copies in compiled HLO text: the ops that `jnp.take` of a
  `..._proj` layer's stacked A, B and scales compiled to (a gather; a broadcast when the
  stack holds one adapter). How many sit in a while loop's body (run every decode step)
  and how many outside it (once a call), and the bytes of the copies they write."""
  out = dict(in_loop=0, in_loop_bytes=0, outside=0, outside_bytes=0)
  for dtype, dims, _, name in _TAKE.findall(hlo):
    where = "in_loop" if "/while/body/" in name else "outside"
    out[where] += 1
    out[f"{where}_bytes"] += math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[dtype]
  return out


def interleaved(calls: dict, reps: int, warm: tuple = ()) -> dict:
  """Wall times of each call, `reps` rounds, the order reversed every other round.

  Each call must block until its result is ready. A first call of each (but
  those named in `warm`), before the rounds, warms it up (compiles) and is not
  counted.
  """
  for name, call in calls.items():
    if name not in warm:
      call()
  times = {name: [] for name in calls}
  for i in range(reps):
    for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
      t0 = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def _paired(times: list, ref: list) -> float:
  """Median over rounds of each round's ratio: load drifting over the rounds cancels."""
  return statistics.median(a / b for a, b in zip(times, ref))


def adapter_shapes(model, base, sample) -> dict:
  """The adapter leaves of an injected model, abstract (`init_adapters` on abstract params)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  return lj.split(lj.init_adapters(model, abstract, jax.random.key(0), sample))[0]


def random_adapters(shapes, seed: int) -> dict:
  """Adapters as after training: A and B drawn from N(0, 0.02), so every B is nonzero.
  Values from numpy (no compiling)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(s.dtype)),
                      shapes)


def even_ids(batch: int, k: int) -> np.ndarray:
  """Adapter ids spread evenly over a batch, sorted: batch / k rows each."""
  return (np.arange(batch) * k // batch).astype(np.int32)


def _generate_args(model, params, prompt, kwargs) -> tuple:
  """What `generate` passes to the jitted `_generate` (greedy, no stop ids)."""
  return (model, params, prompt, jnp.ones(prompt.shape, jnp.bool_), jax.random.key(0),
          jnp.float32(0.0), jnp.float32(1.0), jnp.zeros((0,), jnp.int32),
          jnp.int32(model.config.vocab_size), dict(kwargs))


class Setup:
  """The model, its base params, the prompts and K adapters of one config."""

  def __init__(self, s: dict):
    self.s = s
    self.llama = llama_lib.Llama(llama_lib.LlamaConfig(**s["model"]))
    rng = np.random.default_rng(0)
    vocab = s["model"]["vocab_size"]
    self.prompt = jnp.asarray(rng.integers(0, vocab, (s["batch"], s["prompt"])), jnp.int32)
    self.train_ids = jnp.asarray(rng.integers(0, vocab, (s["batch"], s["train_seq"])), jnp.int32)
    self.base = jax.jit(lambda k: nn.unbox(self.llama.init(k, self.prompt)["params"]))(
        jax.random.key(0))
    self.config = lj.LoRAConfig(rank=s["rank"], alpha=2 * s["rank"], targets=list(TARGETS))
    self.single = lj.inject(self.llama, self.config)
    self.shapes = adapter_shapes(self.single, self.base, self.prompt)
    self.adapters = [random_adapters(self.shapes, seed)
                     for seed in range(max(s["ks"] + s["train_ks"]))]
    self.stacks, self.build_s, self.mixed = {}, {}, {}

  def stack(self, k: int):
    if k not in self.stacks:
      t0 = time.perf_counter()
      s = lj.stack_adapters(self.llama, {f"a{i}": (self.adapters[i], self.config)
                                         for i in range(k)}, self.prompt)
      jax.block_until_ready(s.params)
      self.build_s[k] = time.perf_counter() - t0
      self.stacks[k] = s
      self.mixed[k] = lj.inject(self.llama, s.spec)  # one model object: one jit cache entry
    return self.stacks[k]


# ----------------------------------------------------------------------------
# 1. Generation.


def generation(u: Setup) -> dict:
  s, llama, base, prompt = u.s, u.llama, u.base, u.prompt
  new = s["new"]
  variants = {"merged": (llama, lj.merge(lj.combine(u.adapters[0], base), u.config), {}),
              "single": (u.single, lj.combine(u.adapters[0], base), {})}
  for k in s["ks"]:
    st = u.stack(k)
    variants[f"K={k}"] = (u.mixed[k], lj.combine(st.params, base),
                          {"adapter_ids": jnp.asarray(even_ids(s["batch"], k))})
  out = {"variants": {}}
  calls, steps, outputs = {}, {}, {}
  for name, (model, params, kwargs) in variants.items():
    run = lambda m=model, p=params, kw=kwargs: llama_lib.generate(
        m, p, prompt, max_new_tokens=new, model_kwargs=kw).block_until_ready()
    t0 = time.perf_counter()
    outputs[name] = np.asarray(run())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = generation_lib._generate.lower(*_generate_args(model, params, prompt, kwargs),
                                         max_new_tokens=new, greedy=True).compile()
    lookup = time.perf_counter() - t0  # the jit call compiled it: a cache hit, not a compile
    step, step_args = decode_step(model, params, prompt.shape[0], s["prompt"] + new, kwargs)
    step_compiled = step.lower(*step_args).compile()
    cache = [step_args[1]]

    def one_step(step=step, args=step_args, cache=cache):
      logits, cache[0] = step(args[0], cache[0], *args[2:])
      logits.block_until_ready()

    calls[name], steps[f"{name}/step"] = run, one_step
    out["variants"][name] = dict(
        first_call_s=first, aot_lookup_s=lookup, generate=_cost(compiled),
        generate_gathers=adapter_gathers(compiled.as_text()),
        decode_step=_cost(step_compiled),
        decode_step_gathers=adapter_gathers(step_compiled.as_text()),
        param_bytes=_nbytes(params),
        adapter_bytes=_nbytes(params) - _nbytes(base) if name != "merged" else 0,
        ids=np.asarray(kwargs["adapter_ids"]).tolist() if kwargs else None)
  times = interleaved({**calls, **steps}, s["reps"], warm=tuple(calls))
  ref = times["single"]
  for name, v in out["variants"].items():
    t, st = times[name], times[f"{name}/step"]
    v.update(times_s=t, median_s=statistics.median(t),
             tokens_per_s=s["batch"] * new / statistics.median(t),
             ratio_to_single=statistics.median(t) / statistics.median(ref),
             ratio_to_single_paired=_paired(t, ref),
             decode_step_times_s=st, decode_step_median_s=statistics.median(st))
    # Rows running adapter 0 must continue as the single-adapter model does.
    rows = (np.arange(prompt.shape[0]) if v["ids"] is None
            else np.flatnonzero(np.asarray(v["ids"]) == 0))
    v["rows_equal_single"] = float(np.mean(
        (outputs[name][rows] == outputs["single"][rows]).all(axis=1)))
  out["base_bytes"] = _nbytes(base)
  out["stack_build_s"] = {str(k): t for k, t in u.build_s.items()}
  return out


def decode_step(model, params, batch: int, length: int, kwargs):
  """One decode step (one token a row, on a cache of `length` slots), jitted with the
  cache donated, and its arguments. Attention reads every slot of the cache, so the
  cost does not depend on how many are filled."""
  cache = llama_lib.init_cache(model, batch, length)
  token = jnp.zeros((batch, 1), jnp.int32)

  def step(params, cache, token, kwargs):
    logits, variables = model.apply({"params": params, "cache": cache}, token,
                                    jnp.ones(token.shape, jnp.bool_), decode=True,
                                    mutable=["cache"], **kwargs)
    return logits, variables["cache"]

  return jax.jit(step, donate_argnums=1), (params, cache, token, dict(kwargs))


# ----------------------------------------------------------------------------
# 2. The layer: gather vs grouped (ragged_dot).


def layer(u: Setup) -> dict:
  s = u.s
  d_in, d_out = s["layer"]
  r, examples = s["rank"], s["batch"]
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.normal(0, 0.02, shape).astype(np.float32))
  kernel = normal(d_in, d_out)
  A, B = normal(max(s["layer_ks"]), d_in, r), normal(max(s["layer_ks"]), r, d_out)

  def weighed(x, a, b, ids):  # lora_jax.mixed: all K adapters at once, one-hot weights
    h = jnp.einsum("eti,kir->etkr", x, a) * jax.nn.one_hot(ids, a.shape[0])[:, None, :, None]
    return jnp.einsum("etkr,kro->eto", h, b)

  def gather(x, a, b, ids):  # per-example copies of each example's A and B, batched einsums
    h = jnp.einsum("eti,eir->etr", x, jnp.take(a, ids, axis=0))
    return jnp.einsum("etr,ero->eto", h, jnp.take(b, ids, axis=0))

  def grouped(x, a, b, sizes):  # sorted tokens, one group of rows per adapter
    flat = x.reshape(-1, x.shape[-1])
    h = jax.lax.ragged_dot(flat, a, sizes)
    return jax.lax.ragged_dot(h, b, sizes).reshape(x.shape[:2] + (b.shape[-1],))

  base_fn = lambda x, w: x @ w
  single_fn = lambda x, a, b: (x @ a) @ b
  rows = []
  for t in s["layer_tokens"]:
    x = normal(examples, t, d_in)
    refs = {"base": (jax.jit(base_fn), (x, kernel)),
            "single": (jax.jit(single_fn), (x, A[0], B[0]))}
    calls, figures = {}, {}
    for name, (f, args) in refs.items():
      compiled = f.lower(*args).compile()
      calls[name] = lambda c=compiled, a=args: c(*a).block_until_ready()
      figures[name] = _cost(compiled)
    max_err = 0.0
    for k in s["layer_ks"]:
      ids = even_ids(examples, k)
      sizes = jnp.asarray(np.bincount(ids, minlength=k) * t, jnp.int32)
      a, b = A[:k], B[:k]
      g = jax.jit(gather).lower(x, a, b, jnp.asarray(ids)).compile()
      w = jax.jit(weighed).lower(x, a, b, jnp.asarray(ids)).compile()
      q = jax.jit(grouped).lower(x, a, b, sizes).compile()
      ga, qa = (x, a, b, jnp.asarray(ids)), (x, a, b, sizes)
      max_err = max(max_err, float(jnp.max(jnp.abs(g(*ga) - q(*qa)))),
                    float(jnp.max(jnp.abs(w(*ga) - q(*qa)))))
      calls[f"gather/K={k}"] = lambda c=g, a=ga: c(*a).block_until_ready()
      calls[f"weighed/K={k}"] = lambda c=w, a=ga: c(*a).block_until_ready()
      calls[f"grouped/K={k}"] = lambda c=q, a=qa: c(*a).block_until_ready()
      figures[f"gather/K={k}"], figures[f"grouped/K={k}"] = _cost(g), _cost(q)
      figures[f"weighed/K={k}"] = _cost(w)
    times = interleaved(calls, s["layer_reps"])
    row = dict(tokens=examples * t, tokens_per_example=t, max_abs_diff=max_err,
               base_ms=1e3 * statistics.median(times["base"]),
               single_ms=1e3 * statistics.median(times["single"]),
               base_flops=figures["base"]["flops"], single_flops=figures["single"]["flops"],
               by_k={})
    for k in s["layer_ks"]:
      gt, qt, wt = times[f"gather/K={k}"], times[f"grouped/K={k}"], times[f"weighed/K={k}"]
      row["by_k"][str(k)] = dict(
          gather_ms=1e3 * statistics.median(gt), grouped_ms=1e3 * statistics.median(qt),
          weighed_ms=1e3 * statistics.median(wt), grouped_over_gather=_paired(qt, gt),
          weighed_over_gather=_paired(wt, gt),
          weighed_flops=figures[f"weighed/K={k}"]["flops"],
          gather_flops=figures[f"gather/K={k}"]["flops"],
          grouped_flops=figures[f"grouped/K={k}"]["flops"],
          gather_bytes_accessed=figures[f"gather/K={k}"]["bytes_accessed"],
          grouped_bytes_accessed=figures[f"grouped/K={k}"]["bytes_accessed"])
    rows.append(row)
  return dict(d_in=d_in, d_out=d_out, rank=r, examples=examples, rows=rows)


# ----------------------------------------------------------------------------
# 3. Training K adapters in one step vs K single-adapter steps.


def training(u: Setup) -> dict:
  s, base, ids = u.s, u.base, u.train_ids
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = optax.adamw(1e-4, weight_decay=0.01)
  rng = jax.random.key(0)
  out = {}
  for k in s["train_ks"]:
    st = u.stack(k)
    adapter_ids = even_ids(s["batch"], k)
    mixed = u.mixed[k]
    abstract = jax.eval_shape(mixed.init, jax.random.key(0), ids)["params"]
    m_step = train.make_train_step(train.MixedLoss(mixed, k), tx, mesh, abstract,
                                   layouts=dict(st.layouts))
    trained, opt, frozen = m_step.place(lj.combine(st.params, base))
    batch = m_step.shard_batch({"input_ids": ids, "adapter_ids": jnp.asarray(adapter_ids)})
    m_fig = _cost(m_step.step.lower(trained, opt, frozen, batch, rng).compile())
    m_state = [trained, opt]

    def run_mixed(state=m_state, step=m_step, frozen=frozen, batch=batch):
      trained, opt, metrics = step.step(*state, frozen, batch, rng)
      state[:] = [trained, opt]
      float(metrics["loss"])

    rows = s["batch"] // k
    one = ids[:rows]
    abstract1 = jax.eval_shape(u.single.init, jax.random.key(0), one)["params"]
    s_step = train.make_train_step(train.causal_lm_loss(u.single), tx, mesh, abstract1,
                                   u.config)
    states, batches = [], []
    for i in range(k):
      trained, opt, frozen1 = s_step.place(lj.combine(u.adapters[i], base))
      states.append([trained, opt])
      batches.append(s_step.shard_batch({"input_ids": ids[adapter_ids == i]}))
    s_fig = _cost(s_step.step.lower(*states[0], frozen1, batches[0], rng).compile())

    def run_sequential(states=states, step=s_step, frozen=frozen1, batches=batches):
      losses = []
      for state, b in zip(states, batches):
        trained, opt, metrics = step.step(*state, frozen, b, rng)
        state[:] = [trained, opt]
        losses.append(metrics["loss"])
      [float(x) for x in losses]

    times = interleaved({"mixed": run_mixed, "sequential": run_sequential}, s["reps"])
    mt, qt = times["mixed"], times["sequential"]
    out[str(k)] = dict(
        examples_per_adapter=rows, mixed=dict(m_fig, times_s=mt, median_s=statistics.median(mt)),
        single=dict(s_fig, times_s=qt, median_s=statistics.median(qt)),
        sequential_flops=k * s_fig["flops"],
        time_ratio=statistics.median(mt) / statistics.median(qt),
        time_ratio_paired=_paired(mt, qt),
        flop_ratio=m_fig["flops"] / (k * s_fig["flops"]))
  return dict(batch=[s["batch"], s["train_seq"]], optimizer="adamw(1e-4, weight_decay=0.01)",
              by_k=out)


# ----------------------------------------------------------------------------
# 4. Hot swap.


def hot_swap(u: Setup) -> dict:
  s, llama, base, prompt = u.s, u.llama, u.base, u.prompt
  k = 8 if 8 in s["ks"] else max(s["ks"])
  st = u.stack(k)
  model = u.mixed[k]
  ids = jnp.asarray(even_ids(s["batch"], k))
  gen = lambda params: llama_lib.generate(
      model, params, prompt, max_new_tokens=s["new"],
      model_kwargs={"adapter_ids": ids}).block_until_ready()
  gen(lj.combine(st.params, base))  # compiled already by generation(); else here
  before = generation_lib._generate._cache_size()
  other = lj.LoRAConfig(rank=max(1, s["rank"] // 2), alpha=s["rank"],
                        targets=["q_proj", "v_proj", "down_proj"])
  narrow = adapter_shapes(lj.inject(llama, other), base, prompt)
  swaps = [(1, random_adapters(u.shapes, 100), u.config, "new0"),
           (k - 1, random_adapters(narrow, 101), other, "narrow"),
           (k // 2, random_adapters(u.shapes, 102), u.config, "new1"),
           (1, random_adapters(u.shapes, 103), u.config, "new2")]
  rows, current = [], st
  for slot, adapters, config, name in swaps:
    t0 = time.perf_counter()
    current = current.swap(slot, adapters, config, name=name)
    jax.block_until_ready(current.params)
    t_swap = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = np.asarray(gen(lj.combine(current.params, base)))
    t_gen = time.perf_counter() - t0
    rows.append(dict(slot=slot, name=name, rank=config.rank, targets=list(config.targets),
                     swap_s=t_swap, generate_s=t_gen,
                     cache_size=generation_lib._generate._cache_size()))
  after = generation_lib._generate._cache_size()
  assert after == before, f"hot swap recompiled: jit cache {before} -> {after}"
  # The swapped-in adapter's rows continue as that adapter alone does (same config).
  slot = current.slot("new2")
  alone = np.asarray(llama_lib.generate(u.single, lj.combine(swaps[-1][1], base), prompt,
                                        max_new_tokens=s["new"]))
  sel = np.asarray(ids) == slot
  rows_equal = float(np.mean((tokens[sel] == alone[sel]).all(axis=1)))
  # The same program compiled afresh: what another adapter config costs without a stack.
  params = lj.combine(current.params, base)
  jax.clear_caches()
  t0 = time.perf_counter()
  lowered = generation_lib._generate.lower(*_generate_args(model, params, prompt,
                                                      {"adapter_ids": ids}),
                                      max_new_tokens=s["new"], greedy=True)
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered.compile()
  t_compile = time.perf_counter() - t0
  warm = [r["swap_s"] + r["generate_s"] for r in rows[1:]]
  return dict(k=k, swaps=rows, jit_cache_before=before, jit_cache_after=after,
              swapped_rows_equal_alone=rows_equal, fresh_lower_s=t_lower,
              swap_median_s=statistics.median(r["swap_s"] for r in rows[1:]),
              fresh_compile_s=t_compile, swap_and_generate_median_s=statistics.median(warm),
              fresh_over_swap=(t_lower + t_compile) / statistics.median(warm))


# ----------------------------------------------------------------------------
# Report.


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f}"


def markdown(r: dict) -> str:
  s = r["settings"]
  env = r["machine"]
  kind = "tiny: timings mean nothing" if r["tiny"] else "CPU estimates"
  lines = [f"# Mixed batches of K adapters ({kind})", "",
           f"{env['machine']}, {env['cpu_count']} cores, {env['devices']}; jax {env['jax']}, "
           f"flax {env['flax']}, optax {env['optax']}; {env['date']}; {r['wall_s']:.0f} s in all.",
           "",
           f"Model: Llama {s['model']['hidden_size']} hidden, {s['model']['num_layers']} layers, "
           f"vocab {s['model']['vocab_size']} ({r['params']:,} params, fp32); adapters rank "
           f"{s['rank']}, alpha {2 * s['rank']}, on {', '.join(TARGETS)}.", ""]
  g = r["generation"]
  single = g["variants"]["single"]
  lines += [f"## Generation: batch {s['batch']}, prompt {s['prompt']}, {s['new']} new tokens "
            f"(greedy), median of {s['reps']} interleaved calls", "",
            "| variant | tokens/s | generate s | vs single | vs single, by round "
            "| base + adapters MiB | stack build s | XLA generate arg / temp MiB "
            "| per-example copies: in loop / before it (MiB) | rows = single |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, v in g["variants"].items():
    gen, ga = v["generate"], v["generate_gathers"]
    build = g["stack_build_s"].get(name[2:]) if name.startswith("K=") else None
    lines.append(
        f"| {name} | {v['tokens_per_s']:,.1f} | {v['median_s']:.3f} | {v['ratio_to_single']:.2f} "
        f"| {v['ratio_to_single_paired']:.2f} "
        f"| {_mib(g['base_bytes'])} + {_mib(v['adapter_bytes'])} "
        f"| {'' if build is None else f'{build:.1f}'} "
        f"| {_mib(gen['argument_bytes'])} / {_mib(gen['temp_bytes'])} "
        f"| {ga['in_loop']} / {ga['outside']} ({_mib(ga['outside_bytes'])}) "
        f"| {v['rows_equal_single']:.0%} |")
  k8 = g["variants"].get("K=8")
  if k8:
    worst = max(k8["ratio_to_single"], k8["ratio_to_single_paired"])
    lines += ["", f"Goal: K=8 costs <= 1.3x a single adapter: {k8['ratio_to_single']:.2f}x "
              f"(by round {k8['ratio_to_single_paired']:.2f}x): "
              f"{'met' if worst <= 1.3 else 'NOT met'}."]
  lines += ["", "One decode step alone (jitted `apply(decode=True)`, one token a row, the cache "
            "donated): what a serving loop that calls one step at a time pays.", "",
            "| variant | step ms | vs single | by round | GFLOP | MB accessed "
            "| per-example copies (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for name, v in g["variants"].items():
    d, ga = v["decode_step"], v["decode_step_gathers"]
    lines.append(
        f"| {name} | {1e3 * v['decode_step_median_s']:.1f} "
        f"| {v['decode_step_median_s'] / single['decode_step_median_s']:.2f} "
        f"| {_paired(v['decode_step_times_s'], single['decode_step_times_s']):.2f} "
        f"| {d['flops'] / 1e9:.3f} | {d['bytes_accessed'] / 1e6:,.1f} "
        f"| {ga['outside'] + ga['in_loop']} "
        f"({_mib(ga['outside_bytes'] + ga['in_loop_bytes'])}) |")
  L = r["layer"]
  lines += ["", f"## Layer: {L['d_in']} -> {L['d_out']}, rank {L['rank']}, {L['examples']} "
            "examples sorted by adapter; weighed (lora_jax), gather (per-example copies), "
            "grouped (`ragged_dot`)", "",
            "| tokens | K | weighed ms | gather ms | grouped ms | weighed / gather "
            "| grouped / gather | weighed MFLOP | gather MFLOP | grouped MFLOP "
            "| base matmul ms | one adapter ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in L["rows"]:
    for k, v in row["by_k"].items():
      weighed = ((f"{v['weighed_ms']:.3f}", f"{v['weighed_over_gather']:.2f}",
                  f"{v['weighed_flops'] / 1e6:.1f}") if "weighed_ms" in v else ("",) * 3)
      lines.append(f"| {row['tokens']} | {k} | {weighed[0]} | {v['gather_ms']:.3f} "
                   f"| {v['grouped_ms']:.3f} | {weighed[1]} | {v['grouped_over_gather']:.2f} "
                   f"| {weighed[2]} | {v['gather_flops'] / 1e6:.1f} "
                   f"| {v['grouped_flops'] / 1e6:.1f} | {row['base_ms']:.3f} "
                   f"| {row['single_ms']:.3f} |")
  t = r["training"]
  lines += ["", f"## Training: one AdamW step, batch {t['batch'][0]} x {t['batch'][1]} tokens",
            "", "| K | examples each | mixed step ms | K single steps ms | time ratio | by round "
            "| mixed GFLOP | K x single GFLOP | FLOP ratio | mixed / single temp MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for k, v in t["by_k"].items():
    lines.append(
        f"| {k} | {v['examples_per_adapter']} | {1e3 * v['mixed']['median_s']:.1f} "
        f"| {1e3 * v['single']['median_s']:.1f} | {v['time_ratio']:.2f} "
        f"| {v['time_ratio_paired']:.2f} | {v['mixed']['flops'] / 1e9:.2f} "
        f"| {v['sequential_flops'] / 1e9:.2f} | {v['flop_ratio']:.3f} "
        f"| {_mib(v['mixed']['temp_bytes'])} / {_mib(v['single']['temp_bytes'])} |")
  h = r["hot_swap"]
  lines += ["", f"## Hot swap (K={h['k']} stack)", "",
            "| slot | new adapter | rank | swap s | next generate s | jit cache |",
            "|---|---|---:|---:|---:|---:|"]
  for row in h["swaps"]:
    lines.append(f"| {row['slot']} | {row['name']} ({', '.join(row['targets'])}) | {row['rank']} "
                 f"| {row['swap_s']:.3f} | {row['generate_s']:.3f} | {row['cache_size']} |")
  lines += ["", f"jit cache of `_generate`: {h['jit_cache_before']} before, "
            f"{h['jit_cache_after']} after (no recompile); swapped-in rows equal the adapter "
            f"alone: {h['swapped_rows_equal_alone']:.0%}. Fresh trace + lower "
            f"{h['fresh_lower_s']:.2f} s, compile {h['fresh_compile_s']:.2f} s: "
            f"{h['fresh_over_swap']:.1f}x a warm swap + generate "
            f"({h['swap_and_generate_median_s']:.3f} s), "
            f"{(h['fresh_lower_s'] + h['fresh_compile_s']) / h['swap_median_s']:.0f}x a warm swap "
            f"alone ({h['swap_median_s']:.3f} s)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="the tiny preset, 1 rep: a smoke test")
  p.add_argument("--reps", type=int, help="interleaved rounds of generate and train calls")
  p.add_argument("--out", default=str(HERE / "results"), help="directory for mixed.json/.md")
  p.add_argument("--report", metavar="JSON", help="only re-render mixed.md from a mixed.json")
  a = p.parse_args(argv)
  if a.report:
    result = json.loads(Path(a.report).read_text())
    Path(a.report).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result
  t_start = time.perf_counter()
  s = dict(SETTINGS["tiny" if a.tiny else "full"])
  if a.reps:
    s["reps"] = a.reps
  env = machine()
  print("\n".join(f"{k:>10}: {v}" for k, v in env.items()), flush=True)
  u = Setup(s)
  result = dict(machine=env, tiny=a.tiny, settings=s, params=sum(
      x.size for x in jax.tree.leaves(u.base)))
  for name, fn in (("generation", generation), ("layer", layer), ("training", training),
                   ("hot_swap", hot_swap)):
    t0 = time.perf_counter()
    print(f"[{name}]", flush=True)
    result[name] = fn(u)
    result[name]["section_s"] = time.perf_counter() - t0
  result["wall_s"] = time.perf_counter() - t_start
  text = markdown(result)
  print(text)
  write_results(a.out, "mixed", result, text)
  print(f"wrote {Path(a.out) / 'mixed.json'}, {Path(a.out) / 'mixed.md'}")
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
