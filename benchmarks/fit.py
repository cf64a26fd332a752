"""Will it fit? Per-device memory of a sharded LoRA vs full fine-tuning step, from shapes only.

Builds a preset of any family (default `llama-3.1-8b`, scanned layers, full remat, bf16
params and compute), injects LoRA (rank 16, alpha 32, all linear layers, fp32
adapters) and compiles `lora_jax.train.make_train_step`'s step for abstract,
sharded arguments (`jax.ShapeDtypeStruct`s with shardings): no weight is ever
allocated. For comparison it compiles full fine-tuning of the plain model
(`LoRAConfig(trainable=['.*'])`: every param trains, AdamW state for all, in
the params' dtype) on the same mesh and batch.

QLoRA: with `--quantize nf4|int4|int8` (and `--quantize-block`) the frozen
base's linear kernels (all but `lm_head`) are quantized as `lora-jax train`
quantizes them (`lora_jax.quantized_base.quantize_params` under `jax.eval_shape` on
the boxed abstract params, so codes and statistics keep the kernels' logical
axes and shard like them), and the LoRA step is compiled on that base. Full
fine-tuning of a quantized base is not possible; the comparison is then the
LoRA step on the bf16 base. The script also prints what the stored base
weighs: the quantized kernels' bytes (codes and statistics) over their
weights (bits per weight), and the whole frozen base against bf16.

It prints, per device, XLA's memory analysis of each compiled step (argument,
output, temp, alias and generated-code bytes) and

    total = argument + temp + output - alias

(donated inputs that the step reuses for its outputs are counted once), set
against the HBM of one TPU chip: v5e 16 GiB, v4 32 GiB, v5p 95 GiB. Also the
FLOPs and collective bytes per device and the LoRA/full ratios.

By default it compiles for simulated CPU devices
(`--xla_force_host_platform_device_count`, set before jax is imported unless
XLA_FLAGS already holds a device count; `JAX_PLATFORMS` defaults to cpu).
The CPU compiler is not the TPU compiler: fusion, layout, rematerialisation
and buffer assignment differ (and the CPU backend computes some bf16 ops in
f32), so the figures approximate TPU memory only roughly. On a TPU VM,
`JAX_PLATFORMS=tpu python benchmarks/fit.py` compiles for the real chips and
gives the compiler's own figures.

FLOPs: XLA's `cost_analysis()` counts the body of a while loop once, and with
`scan_layers=True` the layers are one while loop, so its figure misses
(num_layers - 1) layers. The script therefore also counts matmul (dot) FLOPs
itself from the compiled HLO, multiplying each loop body by its known trip
count ("loop-aware"); the LoRA/full FLOP ratio uses that figure.
`lora_jax.sharding.collective_bytes` also counts a loop body once; the
loop-aware collective bytes are printed beside it.

Activations: `make_train_step`'s step traces (and runs) under
`jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, so the model's
`nn.with_logical_constraint` annotations place them (split over the batch).

For a per-buffer breakdown, add XLA's dump flags, e.g.
`XLA_FLAGS=--xla_dump_to=/tmp/dump python benchmarks/fit.py`, and read
`*train_step*memory-usage-report.txt` (the device count is appended).

Usage:
  python benchmarks/fit.py                                  # llama-3.1-8b, fsdp=8, batch 8 x 2048
  python benchmarks/fit.py --preset tiny --batch 8 --seq 16 # seconds, for smoke tests
  python benchmarks/fit.py --json benchmarks/results/fit_llama-3.1-8b.json
  python benchmarks/fit.py --quantize nf4 --devices 1 --fsdp 1 --batch 2  # QLoRA, one chip
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# Before jax is imported anywhere: simulate --devices CPU devices.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _devices_from_argv(argv: list[str]) -> int:
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 8


if __name__ == "__main__":
  if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" {_DEVICE_FLAG}={_devices_from_argv(sys.argv[1:])}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import quantize, recipe, sharding, train  # noqa: E402
from lora_jax import models  # noqa: E402
from lora_jax.models import blocks  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py)

GiB = 1 << 30
HBM_PER_CHIP = {"v5e": 16 * GiB, "v4": 32 * GiB, "v5p": 95 * GiB}
MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")


# ----------------------------------------------------------------------------
# Loop-aware figures from compiled HLO text.

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? ([a-z][a-z0-9-]*)\((.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                     r"(%[\w.-]+(?:, %[\w.-]+)*)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = re.compile(r"^([a-z]+\d*)\[([\d,]*)\]$")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """HLO text -> ({computation name: its instruction lines}, entry name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _dims(shape: str) -> list[int] | None:
  m = _DIMS.match(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else None


def hlo_loop_aware(text: str) -> dict:
  """Matmul FLOPs and collective bytes of one device's program, loop bodies times their trips.

  Walks the call graph from ENTRY: a while body counts `known_trip_count`
  times (once, and flagged, when XLA does not know it), fusions, calls and
  each conditional branch once. A dot's FLOPs are 2 x output elements x
  contracted elements. Collectives are counted with
  `lora_jax.sharding.collective_bytes` on each computation's own text.

  Returns:
    `{'dot_flops': n, 'collective_bytes': {kind: n}, 'loops': [(body, trips)],
    'unknown_trip_counts': n}`.
  """
  comps, entry = _computations(text)
  loops, unknown = [], 0
  own, edges = {}, {}
  for name, lines in comps.items():
    shapes, flops, calls = {}, 0, []
    for line in lines:
      m = _INSTR.match(line)
      if m:
        inst, shape, op, rest = m.groups()
        shapes[inst] = _dims(shape)
        if op == "parameter":
          continue
        if op == "dot":
          out = _dims(shape)
          lhs = re.search(r"%([\w.-]+)", rest)
          contract = _CONTRACT.search(rest)
          lhs_dims = shapes.get(lhs.group(1)) if lhs else None
          if out is not None and lhs_dims is not None and contract:
            k = math.prod(lhs_dims[int(i)] for i in contract.group(1).split(",") if i)
            flops += 2 * math.prod(out) * k
      trips = None
      if " while(" in line:
        t = _TRIP.search(line)
        trips = int(t.group(1)) if t else None
      for kind, names in _CALLEE.findall(line):
        for callee in names.split(", "):
          callee = callee.lstrip("%")
          factor = 1
          if kind == "body":
            factor = trips if trips is not None else 1
            loops.append((callee, trips))
            unknown += trips is None
          calls.append((callee, factor))
      for names in _BRANCHES.findall(line):
        calls += [(c.strip().lstrip("%"), 1) for c in names.split(",") if c.strip()]
    body = "\n".join(lines)
    own[name] = (flops, sharding.collective_bytes(body) if body else {})
    edges[name] = calls

  memo: dict[str, tuple[int, dict]] = {}

  def total(name: str, depth: int = 0) -> tuple[int, dict]:
    if name in memo:
      return memo[name]
    if name not in own or depth > 200:
      return 0, {}
    flops, coll = own[name][0], dict(own[name][1])
    for callee, factor in edges[name]:
      f, c = total(callee, depth + 1)
      flops += factor * f
      for k, v in c.items():
        coll[k] = coll.get(k, 0) + factor * v
    memo[name] = (flops, coll)
    return memo[name]

  flops, coll = total(entry)
  return {"dot_flops": flops, "collective_bytes": dict(sorted(coll.items())),
          "loops": loops, "unknown_trip_counts": unknown}


# ----------------------------------------------------------------------------
# Abstract arguments and compilation.


def abstract_args(tree, shardings):
  """`ShapeDtypeStruct`s carrying their sharding: arguments with no memory behind them."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def per_device_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf (sharded `ShapeDtypeStruct`s)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def global_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def quantized_kernels(tree) -> list:
  """The `QuantizedKernel` leaves of a (plain) param tree."""
  return [x for x in jax.tree.leaves(tree, is_leaf=quantize.is_quantized)
          if quantize.is_quantized(x)]


def base_storage(base, float_base) -> dict:
  """What the stored frozen base weighs (whole tree, all devices), against its float self.

  Args:
    base: the frozen base as the step takes it (abstract, quantized kernels
      as `QuantizedKernel`s of `ShapeDtypeStruct`s).
    float_base: the same base before quantization (bf16 here).

  Returns:
    Quantized kernels: their count, weights, stored bytes (codes and
    statistics), bytes in their own float dtype and stored bits per weight;
    the whole base (embeddings, norms, `lm_head` included): stored bytes,
    float bytes, weights and bits per weight.
  """
  kernels = quantized_kernels(base)
  weights = sum(math.prod(k.shape) for k in kernels)
  stored = sum(k.nbytes for k in kernels)
  base_bytes = sum(k.nbytes if quantize.is_quantized(k) else
                   math.prod(k.shape) * jnp.dtype(k.dtype).itemsize
                   for k in jax.tree.leaves(base, is_leaf=quantize.is_quantized))
  base_weights = sum(math.prod(x.shape) for x in jax.tree.leaves(float_base))
  return {
      "format": kernels[0].format,
      "block": kernels[0].block,
      "double": kernels[0].double,
      "kernels": len(kernels),
      "kernel_weights": weights,
      "kernel_bytes": stored,
      "kernel_float_bytes": sum(math.prod(k.shape) * jnp.dtype(k.dtype).itemsize
                                for k in kernels),
      "kernel_bits_per_weight": 8 * stored / weights,
      "base_bytes": base_bytes,
      "base_float_bytes": global_bytes(float_base),
      "base_weights": base_weights,
      "base_bits_per_weight": 8 * base_bytes / base_weights,
  }


def analyse_step(model: nn.Module, config: lora_jax.LoRAConfig, mesh, a,
                 quantize_format: str | None = None, quantize_block: int | None = None) -> dict:
  """Compiles one train step for abstract sharded arguments and reads XLA's figures.

  `ts.step.lower` traces under the step's mesh and logical axis rules, so the
  model's activation annotations take effect. With `quantize_format` the
  frozen base's kernels are quantized first (abstractly, boxes kept) and the
  figures gain a `quantization` entry (`base_storage`).
  """
  t0 = time.perf_counter()
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract_params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  float_base = lora_jax.split(nn.unbox(abstract_params), config)[1]
  if quantize_format is not None:
    abstract_params = jax.eval_shape(
        functools.partial(lora_jax.quantize_params, format=quantize_format,
                          block=quantize_block), abstract_params)
  tx = optax.adamw(1e-4)
  ts = train.make_train_step(train.causal_lm_loss(model), tx, mesh, abstract_params, config,
                             accum_steps=a.accum_steps)
  adapters, base = lora_jax.split(nn.unbox(abstract_params), config)
  opt_state = jax.eval_shape(tx.init, adapters)
  args = (
      abstract_args(adapters, ts.adapter_shardings),
      abstract_args(opt_state, ts.opt_shardings),
      abstract_args(base, ts.base_shardings),
      {"input_ids": jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32,
                                         sharding=ts.batch_sharding)},
      jax.random.key(0),
  )
  lowered = ts.step.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  mem = compiled.memory_analysis()
  figures = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
  figures["total_bytes"] = (figures["argument_bytes"] + figures["temp_bytes"] +
                            figures["output_bytes"] - figures["alias_bytes"])
  figures["total_gib"] = figures["total_bytes"] / GiB
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax
  text = compiled.as_text()
  hlo = hlo_loop_aware(text)
  counts = lora_jax.count(nn.unbox(abstract_params), config)
  figures.update(
      fits={chip: figures["total_bytes"] <= hbm for chip, hbm in HBM_PER_CHIP.items()},
      flops_loop_aware_dots=int(hlo["dot_flops"]),
      flops_xla_cost_analysis=float(cost.get("flops", float("nan"))),
      collective_bytes=sharding.collective_bytes(text),
      collective_bytes_loop_aware=hlo["collective_bytes"],
      loops=[{"body": b, "trip_count": n} for b, n in hlo["loops"]],
      unknown_trip_counts=hlo["unknown_trip_counts"],
      params_trained=counts["lora"] + counts["trainable"],
      params_total=sum(counts.values()),
      # What the arguments hold, per device, from their shapes and shardings.
      trained_params_bytes=per_device_bytes(args[0]),
      opt_state_bytes=per_device_bytes(args[1]),
      frozen_base_bytes=per_device_bytes(args[2]),
      batch_bytes=per_device_bytes(args[3]),
      trained_params_global_bytes=global_bytes(args[0]),
      frozen_base_global_bytes=global_bytes(args[2]),
      trace_lower_s=round(t1 - t0, 2),
      compile_s=round(t2 - t1, 2),
      peak_rss_bytes_after=_peak_rss(),
  )
  if quantize_format is not None:
    figures["quantization"] = base_storage(base, float_base)
  return figures


def _peak_rss() -> int:
  """This process's peak resident set so far (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# ----------------------------------------------------------------------------
# Report.


def _gib(n: float) -> str:
  return f"{n / GiB:,.2f} GiB"


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.3f}" if b else "-"


def labels(a) -> dict:
  """Column titles of the steps `main` compiles."""
  fmt = a.quantize
  return {"lora": "LoRA" if fmt == "none" else f"QLoRA ({fmt})",
          "lora_float": "LoRA (bf16 base)", "full": "full FT"}


def print_storage(q: dict) -> None:
  """The stored frozen base: quantized kernels, and the whole base against bf16."""
  block = "per output channel" if q["format"] == "int8" else f"block {q['block']}"
  double = ", double-quantized absmax" if q["double"] else ""
  print(f"\nfrozen base, stored (all devices): {q['format']}, {block}{double}")
  print(f"  {q['kernels']} quantized kernels, {q['kernel_weights']:,} weights: "
        f"{q['kernel_bytes']:,} bytes ({_gib(q['kernel_bytes'])}; bf16 "
        f"{_gib(q['kernel_float_bytes'])}), {q['kernel_bits_per_weight']:.3f} bits/weight")
  print(f"  whole base (other leaves in bf16): {q['base_bytes']:,} bytes "
        f"({_gib(q['base_bytes'])}) vs bf16 {q['base_float_bytes']:,} "
        f"({_gib(q['base_float_bytes'])}): {_ratio(q['base_bytes'], q['base_float_bytes'])}, "
        f"{q['base_bits_per_weight']:.3f} bits/weight over {q['base_weights']:,} weights")


def print_report(env: dict, a, steps: dict, platform_name: str) -> None:
  for k, v in env.items():
    print(f"{k:>10}: {v}")
  mesh = f"data={a.data} fsdp={a.fsdp} tensor={a.tensor}"
  print(f"model: {a.preset}, scan_layers, remat={a.remat}, bf16 params and compute; "
        f"mesh {mesh}; batch {a.batch} x seq {a.seq}"
        f"{f' in {a.accum_steps} micro-batches' if a.accum_steps > 1 else ''}; AdamW")
  compared = ("; full FT: every param trains, AdamW state in the params' dtype"
              if "full" in steps else "")
  dropout = f", dropout {a.dropout}" if a.dropout else ""
  print(f"LoRA: rank {a.rank}, alpha {2 * a.rank}, all-linear{dropout}, fp32 adapters{compared}")
  if a.quantize != "none":
    print(f"QLoRA: the frozen base's linear kernels but lm_head in {a.quantize}, dequantized "
          "to bf16 layer by layer inside the step")
  print("activations: constrained by the model's logical axis annotations "
        "(make_train_step traces under the mesh and rules)")
  names = list(steps)
  lora = steps["lora"]
  other = next((n for n in names if n != "lora"), None)
  width = 20
  label = labels(a)
  ratio_title = f"{label['lora'].split()[0]}/{label[other].split()[0]}" if other else ""
  print(f"\n{'per device':34}" + "".join(f"{label[n]:>{width}}" for n in names) +
        (f"{ratio_title:>11}" if other else ""))

  def row(title, key, fmt="{:,}", ratio=True):
    cells = "".join(f"{fmt.format(steps[n][key]):>{width}}" for n in names)
    extra = f"{_ratio(lora[key], steps[other][key]):>11}" if other and ratio else ""
    print(f"{title:34}{cells}{extra}")

  print("  arguments (what they hold):")
  row("    trained params", "trained_params_bytes")
  row("    optimizer state", "opt_state_bytes")
  row("    frozen base", "frozen_base_bytes")
  row("    batch", "batch_bytes")
  print("  XLA memory_analysis, bytes:")
  for f in MEMORY_FIELDS:
    row(f"    {f}", f"{f}_bytes")
  row("  total = arg + temp + out - alias", "total_bytes")
  row("  total, GiB", "total_gib", "{:,.2f}")
  for chip, hbm in HBM_PER_CHIP.items():
    cells = "".join(f"{'fits' if steps[n]['fits'][chip] else 'does not fit':>{width}}"
                    for n in names)
    print(f"{'  ' + chip + ' (' + str(hbm // GiB) + ' GiB HBM/chip)':34}{cells}")
  print("  FLOPs per device:")
  row("    matmul, loop-aware (HLO)", "flops_loop_aware_dots", "{:,.4g}")
  row("    cost_analysis (loop body 1x)", "flops_xla_cost_analysis", "{:,.4g}")
  print("  collective bytes per device, loop-aware (lora_jax.sharding.collective_bytes"
        " counts a loop body once):")
  kinds = sorted({k for n in names for k in steps[n]["collective_bytes_loop_aware"]})
  for k in kinds:
    cells = "".join(
        f"{steps[n]['collective_bytes_loop_aware'].get(k, 0):>{width},}" for n in names)
    once = ", ".join(f"{steps[n]['collective_bytes'].get(k, 0):,}" for n in names)
    print(f"{'    ' + k:34}{cells}   (loop body once: {once})")
  row("  params trained", "params_trained")
  row("  params total", "params_total")
  row("  trace + lower, s", "trace_lower_s", "{:.1f}", ratio=False)
  row("  compile, s", "compile_s", "{:.1f}", ratio=False)
  if "quantization" in lora:
    print_storage(lora["quantization"])
  print(f"\npeak RSS of this process: {_gib(_peak_rss())}")
  for n in names:
    if steps[n]["unknown_trip_counts"]:
      print(f"WARNING: {label[n]}: {steps[n]['unknown_trip_counts']} loop(s) without a known trip "
            f"count, counted once: the loop-aware figures are lower bounds")
  if other:
    base = steps[other]
    print(f"{ratio_title}: memory (total) {_ratio(lora['total_bytes'], base['total_bytes'])}, "
          f"matmul FLOPs {_ratio(lora['flops_loop_aware_dots'], base['flops_loop_aware_dots'])}")
  for n in names:
    s = steps[n]
    verdict = ", ".join(f"{chip} {'fits' if ok else 'does NOT fit'}"
                        for chip, ok in s["fits"].items())
    print(f"{label[n]}: {_gib(s['total_bytes'])} per device: {verdict}")
  if platform_name == "cpu":
    print("CAVEAT: compiled by the CPU backend for simulated devices. TPU's compiler fuses, lays "
          "out, rematerialises and assigns buffers differently (and the CPU backend computes some "
          "bf16 ops in f32): read these figures as rough estimates of TPU HBM, not as the "
          "TPU's own. XLA also reserves some HBM, so usable memory is a little below the chip's.")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(models.PRESETS),
                 help="any family's preset (Llama, Mistral, Qwen, Gemma)")
  p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
  p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout rate")
  p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
  p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
  p.add_argument("--accum-steps", type=int, default=1,
                 help="gradient accumulation: micro-batches of batch / accum-steps sequences")
  p.add_argument("--data", type=int, default=1)
  p.add_argument("--fsdp", type=int, default=8)
  p.add_argument("--tensor", type=int, default=1)
  p.add_argument("--remat", default="full", choices=["none", *sorted(blocks.REMAT_POLICIES)])
  p.add_argument("--devices", type=int, default=8,
                 help="simulated CPU devices (ignored when XLA_FLAGS already sets a count)")
  p.add_argument("--quantize", default="none", choices=["none", *quantize.FORMATS],
                 help="store the frozen base's linear kernels (all but lm_head) in this format")
  p.add_argument("--quantize-block", type=int, default=None,
                 help="weights per quantization block (nf4, int4; default 64)")
  p.add_argument("--no-full", action="store_true",
                 help="skip the comparison step (full fine-tuning; with --quantize, the LoRA "
                      "step on the bf16 base)")
  p.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
  a = p.parse_args(argv)
  try:
    recipe.check_quantize(a.quantize, a.quantize_block, "--")
  except ValueError as e:
    p.error(str(e).replace("quantize_block", "quantize-block"))
  return a


def main(argv=None):
  a = parse_args(argv)
  n = a.data * a.fsdp * a.tensor
  devices = jax.devices()
  if len(devices) < n:
    sys.exit(f"mesh data={a.data} fsdp={a.fsdp} tensor={a.tensor} needs {n} devices; there are "
             f"{len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
  mesh = sharding.make_mesh(a.data, a.fsdp, a.tensor, devices=devices[:n])
  base_model = models.model_for(models.config_for(
      a.preset, scan_layers=True, remat=a.remat, dtype="bfloat16", param_dtype="bfloat16"))
  lora_config = lora_jax.LoRAConfig(rank=a.rank, alpha=2 * a.rank, dropout_rate=a.dropout)

  lora_model = lora_jax.inject(base_model, lora_config)
  fmt = None if a.quantize == "none" else a.quantize
  label = labels(a)
  steps = {}

  def compiled(name):
    print(f"[{label[name]} step compiled in {steps[name]['compile_s']:.1f} s]", file=sys.stderr,
          flush=True)

  steps["lora"] = analyse_step(lora_model, lora_config, mesh, a, fmt, a.quantize_block)
  compiled("lora")
  if not a.no_full and fmt is not None:  # a quantized base cannot train fully
    steps["lora_float"] = analyse_step(lora_model, lora_config, mesh, a)
    compiled("lora_float")
  elif not a.no_full:
    steps["full"] = analyse_step(base_model, lora_jax.LoRAConfig(trainable=[".*"]), mesh, a)
    compiled("full")

  env = machine()
  print_report(env, a, steps, devices[0].platform)
  report = dict(env, config=vars(a), hbm_per_chip_bytes=HBM_PER_CHIP,
                total_formula="argument + temp + output - alias", peak_rss_bytes=_peak_rss(),
                caveat="CPU compilation approximates TPU memory only roughly"
                if devices[0].platform == "cpu" else None, **steps)
  if "lora" in steps and "full" in steps:
    report["ratio_lora_full"] = {
        "total_bytes": steps["lora"]["total_bytes"] / steps["full"]["total_bytes"],
        "flops_loop_aware_dots": (steps["lora"]["flops_loop_aware_dots"] /
                                  steps["full"]["flops_loop_aware_dots"]),
    }
  if "lora_float" in steps:
    report["ratio_qlora_lora"] = {
        "total_bytes": steps["lora"]["total_bytes"] / steps["lora_float"]["total_bytes"],
        "frozen_base_bytes": (steps["lora"]["frozen_base_bytes"] /
                              steps["lora_float"]["frozen_base_bytes"]),
    }
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
