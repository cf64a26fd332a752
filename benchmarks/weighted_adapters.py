"""Combining weighted adapters: PEFT's `add_weighted_adapter` against lora_jax's
`weighted_adapter`, measured against the exact weighted delta.

A tiny random transformers `LlamaForCausalLM` gets two PEFT LoRA adapters of
one rank (so that `linear` applies), with random A and B
(`init_lora_weights=False`) and different targets:

* `rs`: rsLoRA, `lora_alpha` 16, on q_proj, v_proj and down_proj;
* `plain`: plain LoRA, `lora_alpha` 32, on q_proj, k_proj and down_proj.

Both are saved with `save_pretrained` and read into lora_jax with
`lora_jax.hf.import_peft`, so both tools combine the same weights. For each
combination type (`cat`; `svd` at the adapters' rank, which truncates, and at
twice it, which covers both; `linear`) and for both orders of the adapters
(PEFT builds the new adapter's config from the first one), the script takes
each tool's combined delta of every layer (PEFT: `get_delta_weight` of the new
adapter, what its forward adds; lora_jax: `config.scale(path) * A @ B` of the
result) and reports its relative Frobenius error over all layers,
`||D - D*|| / ||D*||`, against the exact weighted delta
`D* = sum_i w_i * get_delta_weight(adapter_i)` (each adapter as PEFT runs it).
For `svd` it also reports the least error any rank-r adapter can have,
`sqrt(1 - energy kept)` from lora_jax's `energy_kept`.

`linear` is an approximation in both tools (it sums A's and B's, so cross
terms appear); the interesting figure there is how far lora_jax's and PEFT's
results are from each other (`linear_tools_apart`).

Writes `benchmarks/results/weighted_adapters.json`.

Usage (from the repository root):
  python benchmarks/weighted_adapters.py             # hidden 128, 2 layers, rank 8
  python benchmarks/weighted_adapters.py --tiny      # hidden 32, 1 layer, rank 4: a smoke test
  python benchmarks/weighted_adapters.py --out PATH  # the JSON elsewhere
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from machine import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"rs": 1.0, "plain": -0.6}  # each adapter keeps its weight in both orders
TARGETS = {"rs": ["q_proj", "v_proj", "down_proj"], "plain": ["q_proj", "k_proj", "down_proj"]}
ALPHAS = {"rs": 16, "plain": 32}


def peft_model(size: dict, rank: int):
  """A random Llama with the two adapters, each saved into its own directory."""
  import torch
  import transformers
  from peft import LoraConfig, get_peft_model

  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**size)).eval()
  configs = {name: LoraConfig(r=rank, lora_alpha=ALPHAS[name], target_modules=TARGETS[name],
                              use_rslora=name == "rs", init_lora_weights=False)
             for name in TARGETS}
  model = get_peft_model(base, configs["rs"], adapter_name="rs")
  model.add_adapter("plain", configs["plain"])
  saved = Path(tempfile.mkdtemp())
  model.save_pretrained(saved)  # adapters other than "default" go into subdirectories
  return model, {name: saved / name for name in TARGETS}


def lora_layers(model) -> dict:
  """PEFT module name (as lora_jax.hf names it) -> its LoRA layer."""
  return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
          if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")}


def peft_deltas(model, adapter: str) -> dict:
  """name -> (out, in) delta of `adapter` where it has one, as PEFT's forward adds it."""
  import torch

  with torch.no_grad():
    return {name: module.get_delta_weight(adapter).double().numpy()
            for name, module in lora_layers(model).items() if adapter in module.lora_A}


def relative_error(got: dict, want: dict) -> float:
  import numpy as np

  missing = set(want) ^ set(got)
  if missing:
    raise ValueError(f"layers differ between the result and the exact delta: {sorted(missing)}")
  num = sum(float(np.sum((got[n] - want[n]) ** 2)) for n in want)
  return math.sqrt(num / sum(float(np.sum(want[n] ** 2)) for n in want))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="hidden 32, 1 layer, rank 4")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "weighted_adapters.json"))
  args = p.parse_args(argv)

  import numpy as np

  from lora_jax import hf
  from lora_jax.arithmetic import weighted_adapter

  rank = 4 if args.tiny else 8
  # --tiny: every projection (32, 32), so lora_jax compiles one program a method.
  size = dict(vocab_size=64, hidden_size=32 if args.tiny else 128,
              intermediate_size=32 if args.tiny else 256, num_hidden_layers=1 if args.tiny else 2,
              num_attention_heads=4, num_key_value_heads=4 if args.tiny else 2)
  model, saved = peft_model(size, rank)
  each = {name: peft_deltas(model, name) for name in TARGETS}
  imported = {name: hf.import_peft(saved[name]) for name in TARGETS}

  methods = [("cat", None), ("svd", rank), ("svd", 2 * rank), ("linear", None)]
  import peft
  import torch
  import transformers
  versions = {"torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__}
  result = {"machine": {**machine(), **versions}, "model": size, "rank": rank, "weights": WEIGHTS,
            "adapters": {n: {"r": rank, "lora_alpha": ALPHAS[n], "use_rslora": n == "rs",
                             "target_modules": TARGETS[n]} for n in TARGETS},
            "orders": {}}
  for order in (("rs", "plain"), ("plain", "rs")):
    exact = {}
    weights = [WEIGHTS[name] for name in order]
    for name, w in zip(order, weights):
      for layer, d in each[name].items():
        exact[layer] = exact.get(layer, 0) + w * d
    rows = {}
    for method, svd_rank in methods:
      label = method if svd_rank is None else f"{method}_r{svd_rank}"
      combined = f"{'_'.join(order)}_{label}"
      model.add_weighted_adapter(list(order), weights, combined, combination_type=method,
                                 svd_rank=svd_rank)
      ours = weighted_adapter([imported[n] for n in order], weights, method=method, rank=svd_rank)
      jax_deltas = {}
      for path, layer in _layers(ours.adapters):
        a, b = (np.asarray(layer[k], np.float64) for k in ("lora_a", "lora_b"))
        jax_deltas[hf.hf_module(path)] = ours.config.scale(path) * (a @ b).T
      peft = peft_deltas(model, combined)
      model.delete_adapter(combined)
      rows[label] = {"peft": relative_error(peft, exact),
                     "lora_jax": relative_error(jax_deltas, exact)}
      if method == "svd":
        energy = ours.energy_kept
        lost = sum((1 - energy[p]) * float(np.sum(exact[hf.hf_module(p)] ** 2)) for p in energy)
        rows[label]["best_possible"] = math.sqrt(
            max(lost, 0.0) / sum(float(np.sum(d ** 2)) for d in exact.values()))
        rows[label]["lora_jax_energy_kept_min"] = min(energy.values())
      if method == "linear":
        rows[label]["linear_tools_apart"] = relative_error(jax_deltas, peft)
    result["orders"][f"{order[0]}_first"] = rows

  _print(result)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  return result


def _layers(tree, prefix=""):
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if "lora_a" in value:
      yield path, value
    else:
      yield from _layers(value, path)


def _print(result: dict) -> None:
  for key, value in result["machine"].items():
    print(f"{key:>12}: {value}")
  size = result["model"]
  print(f"model: LlamaForCausalLM hidden {size['hidden_size']}, {size['num_hidden_layers']} "
        f"layer(s); adapters rank {result['rank']}: rs (rsLoRA, alpha 16: q, v, down) and "
        f"plain (alpha 32: q, k, down); weights {result['weights']}")
  print("relative Frobenius error of the combined delta against the exact weighted delta")
  for order, rows in result["orders"].items():
    print(f"\n{order.replace('_', ' ')} (PEFT takes its config from the first adapter)")
    print(f"{'method':<12}{'PEFT':>12}{'lora_jax':>12}{'best rank-r':>14}")
    for label, row in rows.items():
      best = f"{row['best_possible']:.3e}" if "best_possible" in row else ""
      print(f"{label:<12}{row['peft']:>12.3e}{row['lora_jax']:>12.3e}{best:>14}")
    if "linear" in rows:
      apart = rows["linear"]["linear_tools_apart"]
      print(f"linear: lora_jax's and PEFT's results apart by {apart:.3e}")


if __name__ == "__main__":
  sys.exit(main() and 0)
