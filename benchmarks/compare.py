"""lora_jax against the libraries users would pick instead, side by side, from one command.

Same model (the reference Llama, `lora_jax.models.llama.Llama`, same
weights), same batch of token ids, loss, AdamW, fp32, LoRA rank/alpha on
q/k/v/o/gate/up/down for every contender (contenders.py):

1. Train-step wall time of lora_jax, flax.nnx.LoRA (an NNX port, nnx_llama.py),
   qwix LoRA, Hugging Face PEFT (torch CPU) and full fine-tuning (JAX): one
   worker process per contender, warm steps interleaved across the workers
   (A B C D E, E D C B A, ...), the median per contender, as a ratio to lora_jax.
   Each worker's peak RSS is its own (`ru_maxrss`).
2. XLA FLOPs and memory of the compiled lora_jax LoRA step vs the full
   fine-tuning step (also with `remat='full'`, compiled only).
3. Forward latency and FLOPs: base vs merged (`lora_jax.merge`) vs unmerged
   LoRA at ranks 8, 16, 64 (inference.py).
4. Merge time and memory, jitted with donation and eager (inference.py).
5. Collective bytes per step on a simulated 8-device fsdp mesh, LoRA vs the
   frozen base vs full fine-tuning (collectives.py).

Writes `compare_<size>.json` per size, `compare.md` and `compare.png` into
`--out` (default benchmarks/results/).

Usage:
  python benchmarks/compare.py                      # small and large, ~10 min on 2 CPU cores
  python benchmarks/compare.py --size small --steps 10
  python benchmarks/compare.py --tiny --out /tmp/c  # a tiny model, 2 steps: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata

import numpy as np

from workers import HERE, Worker, interleave, run_once

# LlamaConfig fields. small: 20.2M params, large: 124.7M (both untied, GQA 2:1 / 3:1).
SIZES = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4,
                  num_heads=8, num_kv_heads=4, max_position_embeddings=2048),
    "large": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                  num_heads=12, num_kv_heads=4, max_position_embeddings=2048),
}
CONTENDERS = ("lora_jax", "nnx", "qwix", "peft", "full")
TARGETS = dict(flop_ratio=0.70, memory_ratio=0.40)


def prepare(spec: dict) -> int:
  """Writes the reference logits and the weights in HF's layout into the workdir.

  Returns the number of params. The weights are the linen model's `init` with
  key 0 on the batch, which every JAX worker recomputes (bit for bit: each
  checks its logits against these).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from contenders import batch_ids
  from lora_jax.models.llama import Llama, LlamaConfig

  llama = Llama(LlamaConfig(**spec["size"]))
  ids = jnp.asarray(batch_ids(spec))
  params = jax.jit(lambda k: nn.unbox(llama.init(k, ids)["params"]))(jax.random.key(0))
  np.save(os.path.join(spec["workdir"], "ref_logits.npy"),
          np.asarray(llama.apply({"params": params}, ids)))
  hf = {}  # transformers' LlamaForCausalLM names; kernels transposed to (out, in)
  for path, x in traverse_util.flatten_dict(params).items():
    parts = [p.replace("layers_", "layers.") for p in path[:-1]]
    name = ".".join(parts) + ".weight"
    hf[name if parts[0] == "lm_head" else "model." + name] = np.ascontiguousarray(
        np.asarray(x).T if path[-1] == "kernel" else np.asarray(x))
  np.savez(os.path.join(spec["workdir"], "hf_params.npz"), **hf)
  return sum(x.size for x in jax.tree.leaves(params))


def train_steps(spec: dict, names, steps: int, pause: float, log) -> dict:
  """Starts every contender's worker (set-up runs concurrently), then times interleaved steps."""
  arg = json.dumps(spec)
  workers = {n: Worker("contenders.py", n, arg, log=log) for n in names}
  try:
    ready = {n: w.read() for n, w in workers.items()}
    # Compiled-only remat variants of the two steps whose memory is compared.
    remat = dict(spec, remat="full", figures_only=True)
    for n in ("lora_jax", "full"):
      if n in names:
        ready[n]["remat_full"] = run_once("contenders.py", n, json.dumps(remat), log=log)
    rounds = interleave(workers, steps, pause)
    final = {n: w.ask("done") for n, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  out = {}
  for n in names:
    times = [r["t"] for r in rounds[n]]
    out[n] = dict(ready[n], **final[n], step_times_s=times, median_s=float(np.median(times)),
                  losses=[r["loss"] for r in rounds[n]])
  ref = out.get("lora_jax", out[names[0]])["median_s"]
  for n in names:
    out[n]["ratio_to_lora_jax"] = out[n]["median_s"] / ref
  return out


def summarise(r: dict) -> dict:
  """The headline ratios and the targets, met or not."""
  t = r["train"]
  s = {}
  if "lora_jax" in t and "full" in t:
    lj, full = t["lora_jax"], t["full"]
    s["flop_ratio"] = lj["flops"] / full["flops"]
    s["memory_ratio"] = lj["total_bytes"] / full["total_bytes"]
    if "remat_full" in lj:
      s["memory_ratio_remat"] = (lj["remat_full"]["total_bytes"] /
                                 full["remat_full"]["total_bytes"])
      s["flop_ratio_remat"] = lj["remat_full"]["flops"] / full["remat_full"]["flops"]
  jax_peers = [n for n in ("nnx", "qwix") if n in t]
  met = {
      "step no slower than any JAX peer": all(t[n]["ratio_to_lora_jax"] >= 1 for n in jax_peers),
      "step faster than PEFT": t.get("peft", {}).get("ratio_to_lora_jax", 0) > 1,
      f"LoRA/full FLOPs <= {TARGETS['flop_ratio']}": s.get("flop_ratio", 9) <= TARGETS["flop_ratio"],
      f"LoRA/full compiled memory <= {TARGETS['memory_ratio']}":
          s.get("memory_ratio", 9) <= TARGETS["memory_ratio"],
  }
  if "forward" in r:
    met["merged forward FLOPs == base"] = (r["forward"]["flops"]["merged"] ==
                                           r["forward"]["flops"]["base"])
  s["targets"] = met
  return s


def environment(torch_threads: int) -> dict:
  from machine import machine
  env = machine()
  for lib in ("qwix", "torch", "transformers", "peft", "numpy"):
    env[lib] = metadata.version(lib)
  env["torch_threads"] = torch_threads
  env["xla_cpu_threads"] = "all cores (XLA's default)"
  return env


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", choices=("small", "large", "both"), default="both")
  p.add_argument("--tiny", action="store_true", help="a tiny model, for smoke tests")
  p.add_argument("--steps", type=int, help="timed steps per contender (default 10; tiny 2)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, help="sequence length (default 128; tiny 16)")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, help="default 2 x rank")
  p.add_argument("--forward-reps", type=int, help="timed forwards each (default 20; tiny 3)")
  p.add_argument("--pause", type=float, help="seconds between steps (default 0.2; tiny 0)")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                 help="torch intra-op threads (default: every core, as XLA uses)")
  p.add_argument("--contenders", default=",".join(CONTENDERS),
                 help="comma-separated subset of " + ",".join(CONTENDERS))
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  p.add_argument("--keep-workdir", action="store_true")
  a = p.parse_args()
  tiny = a.tiny
  sizes = ["tiny"] if tiny else (["small", "large"] if a.size == "both" else [a.size])
  names = [n for n in a.contenders.split(",") if n]
  if unknown := set(names) - set(CONTENDERS):
    p.error(f"unknown contenders {sorted(unknown)}")
  pick = lambda value, full, small: value if value is not None else (small if tiny else full)
  steps, seq = pick(a.steps, 10, 2), pick(a.seq, 128, 16)
  reps, pause = pick(a.forward_reps, 20, 3), pick(a.pause, 0.2, 0.0)
  os.makedirs(a.out, exist_ok=True)

  import report  # benchmarks/report.py (matplotlib)
  env = environment(a.torch_threads)
  results = {}
  for size in sizes:
    workdir = tempfile.mkdtemp(prefix=f"compare_{size}_")
    spec = dict(size_name=size, size=SIZES[size], batch=a.batch, seq=seq, rank=a.rank,
                alpha=a.alpha or 2 * a.rank, workdir=workdir, torch_threads=a.torch_threads,
                forward_reps=reps)
    print(f"[{size}] preparing weights in {workdir}", flush=True)
    with open(os.path.join(workdir, "workers.log"), "w") as log:
      r = dict(env, spec={k: v for k, v in spec.items() if k != "workdir"},
               params=prepare(spec))
      print(f"[{size}] {r['params']:,} params; collective bytes on 8 simulated devices", flush=True)
      r["collectives"] = run_once("collectives.py", json.dumps(spec), devices=8, log=log)
      print(f"[{size}] train steps: {', '.join(names)} ({steps} interleaved)", flush=True)
      r["train"] = train_steps(spec, names, steps, pause, log)
      print(f"[{size}] forward latency and merge", flush=True)
      r["forward"] = run_once("inference.py", "forward", json.dumps(spec), log=log)
      r["merge"] = {m: run_once("inference.py", "merge", json.dumps(spec), m, log=log)
                    for m in ("jit", "eager")}
    r["summary"] = summarise(r)
    results[size] = r
    with open(os.path.join(a.out, f"compare_{size}.json"), "w") as f:
      json.dump(r, f, indent=1)
    print(report.size_table(size, r), flush=True)
    if a.keep_workdir:
      print(f"[{size}] kept {workdir}")
    else:
      shutil.rmtree(workdir, ignore_errors=True)
  with open(os.path.join(a.out, "compare.md"), "w") as f:
    f.write(report.markdown(results, env))
  report.chart(results, env, os.path.join(a.out, "compare.png"))
  print(f"wrote {a.out}/compare.md, compare.png, " +
        ", ".join(f"compare_{s}.json" for s in sizes))


if __name__ == "__main__":
  sys.exit(main())
