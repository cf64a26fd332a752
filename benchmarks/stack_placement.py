"""Where an adapter stack's adapter axis goes on a mesh: replicated, or split over devices.

lora_jax places a stack's A and B like their kernel (the kernel's axes keep
their mesh axes, here fsdp) and replicates the adapter axis (K). The
alternative splits K over the mesh's data axis, where the adapters are
otherwise copies, so each device holds K / data adapters. This compiles both,
for abstract arguments (no weights allocated), on a simulated 8-device mesh
(data=2, fsdp=4; `--xla_force_host_platform_device_count=8`, set here before
jax is imported), with K rank-16 adapters on every linear layer:

  serve  the mixed forward (logits) of a batch of 16 rows of 64 tokens, each
         row with its adapter id;
  train  one AdamW step of the K adapters (`lora_jax.train.MixedLoss`).

and reads, per device, from XLA: the memory plan, the adapters' (and
optimizer state's) bytes, and the bytes of each kind of collective
(`lora_jax.sharding.collective_bytes`; the scanned layers' loop body counts
once, so collectives inside it are per layer). Models: compare.py's `small`
Llama (20.2M params, 4 layers unscanned) and the `llama-3.1-8b` preset
(scanned); `--tiny`: the `tiny` preset, the smoke test. CPU-compiled plans
are estimates of what XLA:TPU would do, not TPU measurements.

Usage (from the repository root):
  python benchmarks/stack_placement.py                  # writes results/stack_placement.json
  python benchmarks/stack_placement.py --tiny --out DIR
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import lora_jax as lj  # noqa: E402
from fit import abstract_args, per_device_bytes  # noqa: E402  (benchmarks/fit.py)
from lora_jax import sharding, train  # noqa: E402
from lora_jax.models.llama import Llama, LlamaConfig, config_for  # noqa: E402
from machine import machine, write_results  # noqa: E402  (benchmarks/machine.py)
from mixed import _cost  # noqa: E402  (benchmarks/mixed.py)

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMALL = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4,
                    num_heads=8, num_kv_heads=4, max_position_embeddings=2048)
MODELS = {"small": SMALL, "llama-3.1-8b": config_for("llama-3.1-8b", scan_layers=True)}
ADAPTER_LEAVES = {"lora_a": "a", "lora_b": "b", "lora_magnitude": "m"}


def abstract_stack(model, k: int, rank: int):
  """The shapes of a stack of k rank-`rank` adapters on every linear layer (nothing
  allocated), and the injected model."""
  config = lj.LoRAConfig(rank=rank, alpha=2.0 * rank, targets=list(TARGETS))
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lj.inject(model, config).init, jax.random.key(0), ids)["params"]
  adapters = lj.split(nn.unbox(shapes), config)[0]
  stack = jax.eval_shape(lambda a: lj.stack_adapters(
      model, {f"a{i}": (a, config) for i in range(k)}, ids), adapters)
  return stack, lj.inject(model, stack.spec)


def placed(mesh, abstract_params, layouts, split: bool):
  """lora_jax's shardings; with `split`, each stacked leaf's adapter axis over data."""
  shardings = sharding.param_shardings(abstract_params, mesh, layouts=layouts)
  if not split:
    return shardings

  def move(path, s):
    keys = [str(p.key) for p in path]
    which = ADAPTER_LEAVES.get(keys[-1])
    layout = layouts.get("/".join(keys[:-1]))
    if which is None or layout is None or not layout.stack:
      return s
    spec = list(s.spec) + [None] * (len(getattr(layout, which)) - len(s.spec))
    spec[getattr(layout, which).index(layout.stack)] = "data"
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(move, shardings)


def _figures(compiled, **bytes_of) -> dict:
  return dict(_cost(compiled), collective_bytes=sharding.collective_bytes(compiled.as_text()),
              **{f"{k}_bytes": per_device_bytes(v) for k, v in bytes_of.items()})


def compile_both(model_config: LlamaConfig, k: int, rank: int, batch: int, seq: int) -> dict:
  """Serve and train programs of a K-adapter stack, the adapter axis replicated or split."""
  devices = jax.devices()
  mesh = sharding.make_mesh(2, len(devices) // 2, 1)
  mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
  llama = Llama(model_config)
  stack, mixed = abstract_stack(llama, k, rank)
  layouts = dict(stack.layouts)
  ids = jnp.zeros((batch, seq), jnp.int32)
  abstract_params = jax.eval_shape(mixed.init, jax.random.key(0), ids)["params"]
  loss = train.MixedLoss(mixed, k, dropout=False)
  tx = optax.adamw(1e-4)
  batch_sh = sharding.batch_sharding(mesh)
  batch_args = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sh),
                "adapter_ids": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh)}

  def serve(adapters, base, batch):
    return mixed.apply({"params": lj.combine(adapters, base)}, batch["input_ids"],
                       adapter_ids=batch["adapter_ids"])

  def step(adapters, opt_state, base, batch):
    batch = {**batch, "example_weight": loss.example_weights(batch)}
    (_, _), grads = jax.value_and_grad(
        lambda a: loss(lj.combine(a, base), batch, None), has_aux=True)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  out = {}
  for name, split in (("replicated", False), ("split", True)):
    adapter_sh, base_sh = lj.split(placed(mesh, abstract_params, layouts, split))
    abstract_adapters, abstract_base = lj.split(nn.unbox(abstract_params))
    opt = jax.eval_shape(tx.init, abstract_adapters)
    opt_sh = sharding.follow_params(opt, abstract_adapters, adapter_sh, mesh)
    adapters = abstract_args(abstract_adapters, adapter_sh)
    opt_args = abstract_args(opt, opt_sh)
    base = abstract_args(abstract_base, base_sh)
    figures = {}
    t0 = time.perf_counter()
    fn = train.InMesh(jax.jit(serve, in_shardings=(adapter_sh, base_sh, batch_sh)), mesh,
                      sharding.DEFAULT_RULES)
    figures["serve"] = _figures(fn.lower(adapters, base, batch_args).compile(),
                                adapters=adapters)
    fn = train.InMesh(jax.jit(step, in_shardings=(adapter_sh, opt_sh, base_sh, batch_sh),
                              out_shardings=(adapter_sh, opt_sh), donate_argnums=(0, 1)),
                      mesh, sharding.DEFAULT_RULES)
    figures["train"] = _figures(fn.lower(adapters, opt_args, base, batch_args).compile(),
                                adapters=adapters, opt_state=opt_args)
    figures["compile_s"] = time.perf_counter() - t0
    out[name] = figures
  return dict(devices=len(devices), mesh=dict(mesh.shape), k=k, rank=rank, batch=batch,
              seq=seq, scan_layers=model_config.scan_layers, by_placement=out)


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f}"


def markdown(r: dict) -> str:
  lines = ["| model | K | program | placement | adapters MiB | opt state MiB | temp MiB | "
           "total MiB | all-gather MiB | all-reduce MiB | reduce-scatter MiB |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for model, by_k in r["models"].items():
    for k, c in by_k.items():
      for program in ("serve", "train"):
        for placement, f in c["by_placement"].items():
          f = f[program]
          coll = f["collective_bytes"]
          lines.append(
              f"| {model} | {k} | {program} | {placement} | {_mib(f['adapters_bytes'])} | "
              f"{_mib(f.get('opt_state_bytes', 0))} | {_mib(f['temp_bytes'])} | "
              f"{_mib(f['total_bytes'])} | {_mib(coll.get('all-gather', 0))} | "
              f"{_mib(coll.get('all-reduce', 0))} | {_mib(coll.get('reduce-scatter', 0))} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="the tiny preset, K=2: a smoke test")
  p.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON and MD")
  a = p.parse_args(argv)
  t0 = time.perf_counter()
  if a.tiny:
    runs = {"tiny": (config_for("tiny"), (8,), 4, 8, 16)}
  else:
    runs = {"small": (SMALL, (8, 16), 16, 16, 64),
            "llama-3.1-8b": (MODELS["llama-3.1-8b"], (8,), 16, 16, 512)}
  result = dict(machine=machine(), models={})
  for model, (config, ks, rank, batch, seq) in runs.items():
    result["models"][model] = {str(k): compile_both(config, k, rank, batch, seq) for k in ks}
    print(f"{model}: done", flush=True)
  result["wall_s"] = time.perf_counter() - t0
  text = markdown(result)
  print(text)
  write_results(a.out, "stack_placement", result, text)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
