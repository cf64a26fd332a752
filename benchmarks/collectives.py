"""Collective bytes per train step on a simulated 8-device mesh: LoRA vs the frozen base.

Worker for compare.py: `python collectives.py SPEC_JSON` (compare.py sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8`). Compiles
`lora_jax.train.make_train_step`'s step for abstract sharded arguments (no
weights allocated, via fit.py's `analyse_step`) on a `make_mesh(1, 8, 1)`
(fsdp=8) mesh, batch 8 x seq, two ways:

  lora    the injected model, adapters trained (rank, alpha, the 7 projections)
  frozen  the plain model with only `layers_0/input_layernorm` trained: the same
          forward and backward through the frozen base, without adapters

and prints `lora_jax.sharding.collective_bytes` of both (per device, per step;
no scanned layers, so no loop body is undercounted) with XLA's per-device
memory analysis.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

import lora_jax as lj
from contenders import TARGETS, _send
from fit import analyse_step  # benchmarks/fit.py
from lora_jax import sharding
from lora_jax.models.llama import Llama, LlamaConfig

KEEP = ("collective_bytes", "total_bytes", "argument_bytes", "temp_bytes", "output_bytes",
        "alias_bytes", "flops_loop_aware_dots", "params_trained", "compile_s")


def main() -> None:
  spec = json.loads(sys.argv[1])
  devices = len(jax.devices())
  mesh = sharding.make_mesh(1, devices, 1)
  llama = Llama(LlamaConfig(**spec["size"]))
  lora = lj.LoRAConfig(rank=spec["rank"], alpha=spec["alpha"], targets=list(TARGETS))
  steps = {
      "lora": (lj.inject(llama, lora), lora),
      "frozen": (llama, lj.LoRAConfig(trainable=["layers_0/input_layernorm"])),
  }
  shape = argparse.Namespace(batch=devices, seq=spec["seq"], accum_steps=1)
  out = {"devices": devices, "mesh": dict(mesh.shape), "batch": devices, "seq": spec["seq"]}
  for name, (model, config) in steps.items():
    figures = analyse_step(model, config, mesh, shape)
    out[name] = {k: figures[k] for k in KEEP}
  _send(out)


if __name__ == "__main__":
  main()
