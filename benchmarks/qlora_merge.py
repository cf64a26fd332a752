"""Merging a QLoRA adapter: into the dequantized base (a), requantized (b), or into the float base.

Trains the default fine-tune of the shipped model on an NF4 base (`lora-jax
train model.quantize=nf4`, `--steps` steps), then merges its adapter three
ways and measures each against what was trained (the adapter on the NF4 base,
unmerged) on the held-out rows:

* (a) `lora_jax.merge` on the quantized base: dequantize, merge in float32,
  a dense model (what `lora-jax merge --quantize nf4` writes);
* (b) (a) requantized to NF4 in the base's block and double quantization
  (`lora_jax.requantize_like`), with the relative kernel error it adds;
* merging the same adapter into the original float base instead (the
  adapter learned to correct the quantized kernels, not these).

For each: eval loss, and the largest and mean absolute logit difference
from the trained model. Writes `benchmarks/results/qlora_merge.json`.

Usage:
  python benchmarks/qlora_merge.py [--steps 300] [--format nf4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--format", default="nf4", choices=["nf4", "int4", "int8"])
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_merge.json"))
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import lora_jax as lj
  from lora_jax import bases, run, serve, train
  from lora_jax.recipe import RunConfig, load

  out = Path(tempfile.mkdtemp()) / "run"
  cfg = load(None, [f"model.quantize={args.format}", f"train.steps={args.steps}",
                    "train.eval_every=0", f"output_dir={out}"])
  trained = run.train_run(cfg, progress=False, log=lambda _: None)
  float_cfg = RunConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                              "quantize": "none"}})
  llama, quantized = bases.resolve(cfg.model).load()
  _, dense = bases.resolve(float_cfg.model).load()
  adapters, config = serve.load_adapter(str(out / "adapter"), quantized)

  tokenizer = bases.resolve(cfg.model).tokenizer()
  _, eval_rows = run._datasets(cfg, tokenizer)
  batches = [dict((k, jnp.asarray(v[i:i + 16])) for k, v in eval_rows.items())
             for i in range(0, min(len(eval_rows["input_ids"]), 64), 16)]

  def measure(model, params) -> tuple[float, np.ndarray]:
    loss_fn = jax.jit(lambda p, b: train.causal_lm_loss(model, dropout=False)(p, b, None))
    apply = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    total = weight = 0.0
    logits = []
    for batch in batches:
      s, w = loss_fn(params, batch)
      total, weight = total + float(s), weight + float(w)
      logits.append(np.asarray(apply(params, batch["input_ids"])))
    return total / weight, np.concatenate(logits)

  reference_loss, reference = measure(lj.inject(llama, config), lj.combine(adapters, quantized))
  merged = lj.merge(lj.combine(adapters, quantized), config)
  requantized, errors = lj.requantize_like(merged, quantized)
  into_float = lj.merge(lj.combine(adapters, dense), config)
  plain = lj.quantized_model(llama)
  result = {"format": args.format, "steps": args.steps, "eval_before": trained["eval_before"],
            "trained_on_quantized_base": {"eval_loss": reference_loss}}
  for name, params in (("a_dequantized_merge", merged), ("b_requantized", requantized),
                       ("merged_into_float_base", into_float)):
    loss, logits = measure(plain, params)
    result[name] = {"eval_loss": loss, "max_logit_diff": float(np.abs(logits - reference).max()),
                    "mean_logit_diff": float(np.abs(logits - reference).mean())}
  result["b_requantized"]["added_kernel_error_mean"] = float(np.mean(list(errors.values())))
  result["b_requantized"]["added_kernel_error_max"] = float(max(errors.values()))
  print(json.dumps(result, indent=2))
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
