"""lora_jax against the libraries users would pick instead, side by side, from one command.

Same model (the reference Llama, `lora_jax.models.llama.Llama`, same
weights), same batch of token ids, loss, AdamW, fp32, LoRA rank/alpha on
q/k/v/o/gate/up/down for every contender (contenders.py):

1. Train-step wall time of lora_jax, flax.nnx.LoRA (an NNX port, nnx_llama.py),
   qwix LoRA, Hugging Face PEFT (torch CPU) and full fine-tuning (JAX): one
   worker process per contender, warm steps interleaved across the workers
   (A B C D E, E D C B A, ...), the median per contender, as a ratio to lora_jax.
   Each worker's peak RSS is its own (Linux VmHWM, what `ru_maxrss` reads).
   QLoRA in the same rounds: lora_jax and qwix LoRA on the same weights
   quantized to NF4 (contenders.py says how each quantizes), their step times
   as ratios to lora_jax's NF4 step and to the float lora_jax step.
2. XLA FLOPs and memory of the compiled lora_jax LoRA step vs the full
   fine-tuning step (also with `scan_layers=True, remat='full'`, as the TPU configs
   run, compiled only).
3. Forward latency and FLOPs: base vs merged (`lora_jax.merge`) vs unmerged
   LoRA at ranks 8, 16, 64 (inference.py).
4. Merge time and memory, jitted with donation and eager (inference.py).
5. Collective bytes per step on a simulated 8-device fsdp mesh, LoRA vs the
   frozen base (collectives.py).

Writes `compare_<size>.json` per size, `compare.md` and `compare.png` into
`--out` (default benchmarks/results/).

Usage:
  python benchmarks/compare.py                      # small and large, ~5.5 min on 2 CPU cores
  python benchmarks/compare.py --size small --steps 10
  python benchmarks/compare.py --tiny --out /tmp/c  # a tiny model, 2 steps: a smoke test
                                                    # (XLA backend optimisation off: fast compiles)
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

import workers
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
QLORA = ("lora_jax_nf4", "qwix_nf4")  # reported apart from CONTENDERS (the 'qlora' key)
TARGETS = dict(flop_ratio=0.70, memory_ratio=0.40)


def prepare(spec: dict) -> int:
  """Writes the reference logits and a transformers checkpoint of the weights into the workdir.

  Returns the number of params. The weights are the linen model's `init` with
  key 0 on the batch, which every JAX worker recomputes (bit for bit: each
  checks its logits against these).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from contenders import batch_ids
  from lora_jax import hf
  from lora_jax.models.llama import Llama, LlamaConfig

  llama = Llama(LlamaConfig(**spec["size"]))
  ids = jnp.asarray(batch_ids(spec))
  params = jax.jit(lambda k: nn.unbox(llama.init(k, ids)["params"]))(jax.random.key(0))
  np.save(os.path.join(spec["workdir"], "ref_logits.npy"),
          np.asarray(llama.apply({"params": params}, ids)))
  hf.save_llama(os.path.join(spec["workdir"], "hf"), params, llama.config)
  return sum(x.size for x in jax.tree.leaves(params))


def train_steps(spec: dict, names, steps: int, pause: float, log, jobs: dict) -> tuple[dict, dict]:
  """Starts every contender's worker, then times interleaved steps.

  The workers set up (compile) concurrently, beside `jobs` (started workers whose
  answers are not timings); every answer is in before the first timed step.

  Returns:
    `(per contender figures, the jobs' answers)`.
  """
  arg = json.dumps(spec)
  workers = {n: Worker("contenders.py", n, arg, log=log) for n in names}
  try:
    ready = {n: w.read() for n, w in workers.items()}
    answers = {k: w.read() for k, w in jobs.items()}
    rounds = interleave(workers, steps, pause)
    final = {n: w.ask("done") for n, w in workers.items()}
  finally:
    for w in [*workers.values(), *jobs.values()]:
      w.close()
  out = {}
  for n in names:
    times = [r["t"] for r in rounds[n]]
    out[n] = dict(ready[n], **final[n], step_times_s=times, median_s=float(np.median(times)),
                  losses=[r["loss"] for r in rounds[n]])
  ref = out.get("lora_jax", out[names[0]])["median_s"]
  for n in names:
    out[n]["ratio_to_lora_jax"] = out[n]["median_s"] / ref
  return out, answers


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
  q = r.get("qlora", {})
  if "lora_jax_nf4" in q and "qwix_nf4" in q:
    s["qlora_step_ratio_qwix"] = q["qwix_nf4"]["ratio_to_lora_jax_nf4"]
    s["qlora_flop_ratio_qwix"] = q["qwix_nf4"]["flops"] / q["lora_jax_nf4"]["flops"]
  if "lora_jax_nf4" in q and "lora_jax" in t:
    s["qlora_step_ratio_float"] = q["lora_jax_nf4"]["ratio_to_lora_jax"]
    s["qlora_flop_ratio_float"] = q["lora_jax_nf4"]["flops"] / t["lora_jax"]["flops"]
  met = {}  # only the targets whose contenders ran (--contenders may pick a few)
  if "lora_jax" in t and jax_peers:
    met["step no slower than any JAX peer"] = all(t[n]["ratio_to_lora_jax"] >= 1
                                                  for n in jax_peers)
  if "lora_jax" in t and "peft" in t:
    met["step faster than PEFT"] = t["peft"]["ratio_to_lora_jax"] > 1
  if "flop_ratio" in s:
    met[f"LoRA/full FLOPs <= {TARGETS['flop_ratio']}"] = s["flop_ratio"] <= TARGETS["flop_ratio"]
    met[f"LoRA/full compiled memory <= {TARGETS['memory_ratio']}"] = (
        s["memory_ratio"] <= TARGETS["memory_ratio"])
  if "memory_ratio_remat" in s:
    met[f"LoRA/full compiled memory <= {TARGETS['memory_ratio']} with scan + remat"] = (
        s["memory_ratio_remat"] <= TARGETS["memory_ratio"])
  if "forward" in r:
    met["merged forward FLOPs == base"] = (r["forward"]["flops"]["merged"] ==
                                           r["forward"]["flops"]["base"])
  if "qlora_step_ratio_qwix" in s:
    met["NF4 step no slower than qwix NF4"] = s["qlora_step_ratio_qwix"] >= 1
  s["targets"] = met
  return s


def share_compilations(cache_dir: str) -> None:
  """One XLA compilation cache for this process and every worker of the run.

  Programs that several processes compile alike (the base model's init, its
  forward) are compiled once. Executables are the same either way: only
  compile times change, and none is a result.
  """
  import jax
  settings = dict(compilation_cache_dir=cache_dir, persistent_cache_min_compile_time_secs=0,
                  persistent_cache_min_entry_size_bytes=0)
  for key, value in settings.items():
    jax.config.update(f"jax_{key}", value)
    workers.EXTRA_ENV[f"JAX_{key.upper()}"] = str(value)


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
  p.add_argument("--forward-reps", type=int, help="timed forwards each (default 10; tiny 3)")
  p.add_argument("--pause", type=float, help="seconds between steps (default 0.2; tiny 0)")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                 help="torch intra-op threads (default: every core, as XLA uses)")
  p.add_argument("--contenders", default=",".join(CONTENDERS + QLORA),
                 help="comma-separated subset of " + ",".join(CONTENDERS + QLORA))
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                 help="also compile both steps with remat='full' (default: on, off with --tiny)")
  p.add_argument("--keep-workdir", action="store_true")
  a = p.parse_args()
  tiny = a.tiny
  sizes = ["tiny"] if tiny else (["small", "large"] if a.size == "both" else [a.size])
  names = [n for n in a.contenders.split(",") if n]
  if unknown := set(names) - set(CONTENDERS + QLORA):
    p.error(f"unknown contenders {sorted(unknown)}")
  pick = lambda value, full, small: value if value is not None else (small if tiny else full)
  steps, seq = pick(a.steps, 10, 2), pick(a.seq, 128, 16)
  reps, pause = pick(a.forward_reps, 10, 3), pick(a.pause, 0.2, 0.0)
  a.remat = pick(a.remat, True, False)
  os.makedirs(a.out, exist_ok=True)
  if tiny:  # compile faster (LLVM unoptimised): the smoke test's timings mean nothing anyway
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

  import report  # benchmarks/report.py (matplotlib)
  run_dir = tempfile.mkdtemp(prefix="compare_")
  share_compilations(os.path.join(run_dir, "xla_cache"))
  env = environment(a.torch_threads)
  results = {}
  for size in sizes:
    workdir = os.path.join(run_dir, size)
    os.makedirs(workdir)
    spec = dict(size_name=size, size=SIZES[size], batch=a.batch, seq=seq, rank=a.rank,
                alpha=a.alpha or 2 * a.rank, workdir=workdir, torch_threads=a.torch_threads,
                forward_reps=reps)
    print(f"[{size}] preparing weights in {workdir}", flush=True)
    with open(os.path.join(workdir, "workers.log"), "w") as log:
      r = dict(env, spec={k: v for k, v in spec.items() if k != "workdir"},
               params=prepare(spec))
      arg = json.dumps(spec)
      # Compile-only jobs run beside the contenders' set-up; timed ones after the train steps
      # on a quiet machine (with --tiny, where timings mean nothing, all at once).
      jobs = {"collectives": Worker("collectives.py", arg, devices=8, log=log)}
      if a.remat:  # the two steps whose memory is compared, with remat='full' (compiled only)
        remat = json.dumps(dict(spec, remat="full", scan_layers=True, figures_only=True))
        jobs.update({f"remat_{n}": Worker("contenders.py", n, remat, log=log)
                     for n in ("lora_jax", "full") if n in names})
      timed = {"forward": ("forward",), "merge_jit": ("merge", "jit"),
               "merge_eager": ("merge", "eager")}
      if tiny:
        jobs.update({k: Worker("inference.py", *v, arg, log=log) for k, v in timed.items()})
      print(f"[{size}] {r['params']:,} params; {', '.join(names)}: set-up, then {steps} steps "
            f"interleaved; beside the set-up: {', '.join(jobs)}", flush=True)
      train, answers = train_steps(spec, names, steps, pause, log, jobs)
      r["train"] = {n: c for n, c in train.items() if n in CONTENDERS}
      if qlora := {n: c for n, c in train.items() if n in QLORA}:
        ref = qlora.get("lora_jax_nf4", next(iter(qlora.values())))["median_s"]
        for c in qlora.values():
          c["ratio_to_lora_jax_nf4"] = c["median_s"] / ref
        r["qlora"] = qlora
      for k, v in timed.items():
        if k not in answers:
          print(f"[{size}] {k}", flush=True)
          answers[k] = run_once("inference.py", *v, arg, log=log)
      r["collectives"], r["forward"] = answers["collectives"], answers["forward"]
      r["merge"] = {"jit": answers["merge_jit"], "eager": answers["merge_eager"]}
      for n in ("lora_jax", "full"):
        if f"remat_{n}" in answers:
          r["train"][n]["remat_full"] = answers[f"remat_{n}"]
    r["summary"] = summarise(r)
    results[size] = r
    with open(os.path.join(a.out, f"compare_{size}.json"), "w") as f:
      json.dump(r, f, indent=1)
    print(report.size_table(size, r), flush=True)
  with open(os.path.join(a.out, "compare.md"), "w") as f:
    f.write(report.markdown(results, env))
  report.chart(results, env, os.path.join(a.out, "compare.png"))
  if a.keep_workdir:
    print(f"kept {run_dir} (worker logs, weights, compilation cache)")
  else:
    shutil.rmtree(run_dir, ignore_errors=True)
  print(f"wrote {a.out}/compare.md, compare.png, " +
        ", ".join(f"compare_{s}.json" for s in sizes))


if __name__ == "__main__":
  sys.exit(main())
