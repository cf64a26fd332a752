"""QLoRA on the shipped model: does a 4-bit base train as well as the float one, and what
does dequantizing it cost per step?

Quality: the default fine-tune (`lora-jax train`, configs/default.yaml: the
shipped `builtin:tiny-kjv` adapted to The Devil's Dictionary) run with
`model.quantize=none` and again with `model.quantize=nf4` (and int8, int4):
same seed, data and steps, through `lora_jax.run.train_run`. Each run's
`eval_before` is its base's eval loss (float vs quantized); `eval_after` is
after training. QLoRA's claim, that LoRA on a 4-bit base matches LoRA on a
16-bit one, is read here as: the quantized run's eval loss after training is
within `--tolerance` nats of the float run's (the float base here is
float32). The gap after training is printed beside the gap before it: whether
the adapters closed, kept or widened what quantization cost the base.

Speed: the run's train step (`lora_jax.train.make_train_step`, the default
config's model, LoRA, batch 16 x 128 and AdamW) compiled once on the float base
and once on the NF4 base, XLA's `cost_analysis()` FLOPs and
`memory_analysis()` of each, then warm steps interleaved (float, NF4, NF4,
float, ...), their medians and the ratio NF4 / float, and the median of each
round's own ratio (robust to load that drifts over the rounds).

Usage (from the repository root):
  python benchmarks/qlora.py                     # 4 runs and the timing: ~7 min on 2 CPU cores
  python benchmarks/qlora.py --formats nf4       # the float and NF4 runs only
  python benchmarks/qlora.py --json benchmarks/results/qlora.json
  python benchmarks/qlora.py --no-quality --timed-steps 1 --set data.seq_len=32 \
      train.batch_size=4                         # the step timing on a small batch: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from contenders import compiled_figures  # benchmarks/contenders.py
from machine import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def load_config(fmt: str, out: str, steps: int | None, extra: list[str] = ()):
  """The default run config with `model.quantize=fmt`, writing into `out`.

  Intermediate evaluations, checkpoints but the last and the merged export are
  off: they take time and change no loss (the steps and the data order do not
  depend on them). `steps` replaces the config's; `extra` are more dotted
  overrides (`--set`, e.g. for smoke tests).
  """
  from lora_jax import recipe
  overrides = [f"model.quantize={fmt}", f"output_dir={out}", "train.eval_every=0",
               "export.merged=false", *extra]
  if steps is not None:
    overrides.append(f"train.steps={steps}")
  cfg = recipe.load(DEFAULT_CONFIG, overrides)
  return recipe.load(DEFAULT_CONFIG, [*overrides, f"train.save_every={cfg.train.steps}"])


def quality(formats: list[str], steps: int | None, workdir: str, extra: list[str]) -> dict:
  """`train_run` per format ('none' first): eval losses before and after, wall time."""
  from lora_jax.run import train_run
  out = {}
  for fmt in ["none", *formats]:
    cfg = load_config(fmt, os.path.join(workdir, fmt), steps, extra)
    t0 = time.perf_counter()
    r = train_run(cfg, progress=False, log=lambda _: None)
    out[fmt] = dict(eval_before=r["eval_before"], eval_after=r["eval_after"], steps=r["steps"],
                    wall_s=time.perf_counter() - t0)
    print(f"  {fmt:>5}: eval loss {r['eval_before']:.4f} -> {r['eval_after']:.4f} "
          f"({r['steps']} steps, {out[fmt]['wall_s']:.0f} s)", flush=True)
  return out


def verdict(q: dict, tolerance: float) -> dict:
  """Gaps to the float run before and after training, per quantized format."""
  ref = q["none"]
  drop = ref["eval_before"] - ref["eval_after"]
  out = {}
  for fmt, r in q.items():
    if fmt == "none":
      continue
    before = r["eval_before"] - ref["eval_before"]
    after = r["eval_after"] - ref["eval_after"]
    out[fmt] = dict(gap_before=before, gap_after=after,
                    gap_after_share_of_float_drop=after / drop if drop else float("nan"),
                    matches=abs(after) <= tolerance)
  return out


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def build_step(fmt: str, workdir: str, extra: list[str]) -> dict:
  """The default run's train step on a base in `fmt`, compiled, with its state and figures."""
  from lora_jax import bases, data, sharding, train
  from lora_jax.inject import init_adapters, inject
  from lora_jax.models.llama import Llama
  from lora_jax.run import corpus_paths

  cfg = load_config(fmt, os.path.join(workdir, f"step_{fmt}"), None, extra)
  t = cfg.train
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  base_model = bases.resolve(cfg.model)
  sample = jnp.zeros((t.batch_size, cfg.data.seq_len), jnp.int32)
  model = inject(Llama(base_model.config), cfg.lora)
  abstract = base_model.abstract_params(model, sample)
  tx = optax.adamw(t.learning_rate, weight_decay=t.weight_decay)
  step = train.make_train_step(train.causal_lm_loss(model), tx, mesh, abstract, cfg.lora)
  _, base_params = base_model.load(mesh)
  params = init_adapters(model, base_params, jax.random.key(t.seed), sample)
  adapters, opt_state, base = step.place(params)
  rows = data.load_dataset(corpus_paths(cfg.data.train), base_model.tokenizer(),
                           cfg.data.seq_len, packing=cfg.data.packing,
                           documents=cfg.data.documents)
  batch = step.shard_batch(next(data.Loader(rows, t.batch_size, seed=t.seed)))
  rng = jax.random.key(t.seed)
  t0 = time.perf_counter()
  compiled = step.step.lower(adapters, opt_state, base, batch, rng).compile()
  figures = dict(compiled_figures(compiled), compile_s=time.perf_counter() - t0,
                 base_bytes=_nbytes(base), adapter_bytes=_nbytes(adapters))
  return dict(compiled=compiled, state=[adapters, opt_state], base=base, batch=batch, rng=rng,
              figures=figures, batch_shape=list(sample.shape))


def run_step(s: dict) -> float:
  """One step of a `build_step` result (its adapters and optimizer state donated and
  replaced); the wall time until its loss is on the host."""
  t0 = time.perf_counter()
  adapters, opt_state, metrics = s["compiled"](*s["state"], s["base"], s["batch"], s["rng"])
  float(metrics["loss"])
  s["state"] = [adapters, opt_state]
  return time.perf_counter() - t0


def speed(workdir: str, timed: int, extra: list[str], warmup: int = 2) -> dict:
  """Compiled figures of the float and NF4 steps and their interleaved wall times."""
  steps = {fmt: build_step(fmt, workdir, extra) for fmt in ("none", "nf4")}
  for s in steps.values():
    for _ in range(warmup):
      run_step(s)
  times = {fmt: [] for fmt in steps}
  order = list(steps)
  for i in range(timed):
    for fmt in (order if i % 2 == 0 else order[::-1]):
      times[fmt].append(run_step(steps[fmt]))
  out = {fmt: dict(s["figures"], step_times_s=times[fmt],
                   median_s=statistics.median(times[fmt])) for fmt, s in steps.items()}
  out["batch_shape"] = steps["none"]["batch_shape"]
  out["flop_ratio"] = out["nf4"]["flops"] / out["none"]["flops"]
  out["time_ratio"] = out["nf4"]["median_s"] / out["none"]["median_s"]
  # Each round's two steps ran back to back: their ratio cancels load that drifts over the
  # rounds (another process starting or stopping), which the ratio of medians does not.
  out["time_ratio_paired"] = statistics.median(
      b / a for a, b in zip(times["none"], times["nf4"]))
  out["base_bytes_ratio"] = out["nf4"]["base_bytes"] / out["none"]["base_bytes"]
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--formats", default="nf4,int8,int4",
                 help="quantized bases to train on besides the float one (comma-separated)")
  p.add_argument("--steps", type=int, help="train steps per run (default: the config's, 300)")
  p.add_argument("--timed-steps", type=int, default=20, help="timed steps per base (speed)")
  p.add_argument("--tolerance", type=float, default=0.02,
                 help="nats: the largest eval-loss gap after training that counts as a match")
  p.add_argument("--no-quality", dest="quality", action="store_false",
                 help="skip the training runs")
  p.add_argument("--no-speed", dest="speed", action="store_false",
                 help="skip the step timing")
  p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                 help="more overrides of the default config for every run (the figures are "
                      "then not the default run's)")
  p.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
  a = p.parse_args()
  formats = [f for f in a.formats.split(",") if f]
  env = machine()
  print("\n".join(f"{k:>10}: {v}" for k, v in env.items()))
  result = dict(env, config=str(DEFAULT_CONFIG.relative_to(ROOT)), overrides=a.set,
                formats=formats, tolerance=a.tolerance)
  with tempfile.TemporaryDirectory(prefix="qlora_") as workdir:
    if a.quality:
      print(f"quality: the default fine-tune on each base ({', '.join(['none', *formats])}):",
            flush=True)
      result["quality"] = quality(formats, a.steps, workdir, a.set)
      result["verdict"] = verdict(result["quality"], a.tolerance)
    if a.speed:
      print(f"speed: one train step, float vs NF4 base, {a.timed_steps} interleaved steps each",
            flush=True)
      result["speed"] = speed(workdir, a.timed_steps, a.set)
  print(report(result))
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
  return 0


def report(r: dict) -> str:
  """The figures as plain text."""
  lines = []
  if "quality" in r:
    q, v = r["quality"], r["verdict"]
    lines += ["", "eval loss (nats per byte, held-out Devil's Dictionary):",
              f"{'base':>6} {'before':>8} {'after':>8} {'gap before':>11} {'gap after':>10}",]
    for fmt, x in q.items():
      gaps = (f"{v[fmt]['gap_before']:+11.4f} {v[fmt]['gap_after']:+10.4f}" if fmt in v
              else f"{'':>11} {'':>10}")
      lines.append(f"{fmt:>6} {x['eval_before']:8.4f} {x['eval_after']:8.4f} {gaps}")
    drop = q["none"]["eval_before"] - q["none"]["eval_after"]
    for fmt, x in v.items():
      trend = ("narrower than" if abs(x["gap_after"]) < abs(x["gap_before"]) else
               "no narrower than")
      lines.append(
          f"{fmt}: LoRA on the {fmt} base {'matches' if x['matches'] else 'does NOT match'} "
          f"LoRA on the float base (|gap after| {abs(x['gap_after']):.4f} "
          f"{'<=' if x['matches'] else '>'} {r['tolerance']} nats; "
          f"{100 * abs(x['gap_after_share_of_float_drop']):.1f}% of the float run's drop of "
          f"{drop:.4f}); "
          f"the gap after training is {trend} the base's gap before it "
          f"({x['gap_before']:+.4f})")
  if "speed" in r:
    s = r["speed"]
    lines += ["", f"train step, batch {s['batch_shape'][0]} x {s['batch_shape'][1]} "
              "(compiled once each; medians of interleaved warm steps):",
              f"{'':>16} {'float base':>14} {'NF4 base':>14} {'NF4 / float':>12}"]
    rows = [("flops", "{:14.4e}"), ("base_bytes", "{:14,}"), ("argument_bytes", "{:14,}"),
            ("temp_bytes", "{:14,}"), ("total_bytes", "{:14,}")]
    for key, fmt in rows:
      a, b = s["none"][key], s["nf4"][key]
      lines.append(f"{key:>16} {fmt.format(a)} {fmt.format(b)} {b / a:12.3f}")
    a, b = s["none"]["median_s"], s["nf4"]["median_s"]
    lines.append(f"{'step ms':>16} {a * 1e3:14.1f} {b * 1e3:14.1f} {b / a:12.3f}")
    lines.append(f"step time NF4 / float, median of the rounds' ratios: "
                 f"{s['time_ratio_paired']:.3f}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
