"""One LoRA train step per library, each in its own worker process (driven by compare.py).

Every contender trains the same Llama (`lora_jax.models.llama.Llama`'s
architecture and weights) on the same batch of token ids with the same loss
(mean next-token cross entropy), optimizer (AdamW, lr 1e-4, weight decay
0.01) and LoRA settings (rank, alpha, the q/k/v/o/gate/up/down projections,
no dropout), in float32:

  lora_jax   `inject` + `init_adapters` + `lora_jax.optimizer` +
             `lora_jax.train.make_train_step` (the library's jitted step)
  nnx        the NNX port (nnx_llama.py) with `nnx.LoRALinear`,
             `nnx.Optimizer(wrt=nnx.LoRAParam)`, `nnx.jit` (model and
             optimizer donated), `nnx.value_and_grad` w.r.t. LoRAParams
  qwix       `qwix.apply_lora_to_model(Llama, qwix.LoraProvider(...))` on the
             linen model; a plain `jax.jit` step, gradients w.r.t. the adapters
  peft       transformers' `LlamaForCausalLM` + `peft.get_peft_model`, torch
             eager on the CPU, `torch.optim.AdamW`
  full       full fine-tuning of the linen model: a plain `jax.jit` step,
             every param trained

QLoRA: the same LoRA on a frozen NF4 base (the same float weights quantized;
the output head, embeddings and norms stay float32), dequantized to float32
in the step:

  lora_jax_nf4  `lora_jax.quantized_base.quantize_params(base, 'nf4')`: blocks of 64
                weights along the input axis, double quantization (8-bit
                absmax codes), bit-exact with bitsandbytes; then as lora_jax
  qwix_nf4      `qwix.LoraProvider(..., weight_qtype='nf4', tile_size=64)` and
                `qwix.quantize_params`: the same blocks and levels, float32
                absmax per block, no double quantization; then as qwix

Protocol: `python contenders.py NAME SPEC_JSON` builds the contender, runs
two warm-up steps (the first compiles) and prints one line `@@ {...}` (setup
figures); then each `step` line on stdin runs one step and answers
`@@ {"t": seconds, "loss": ...}`; `done` answers with the peak RSS (and any
figures a builder leaves for after the steps, which would weigh on the peaks) and
exits.
Peak RSS is Linux's VmHWM: `peak_rss` over the worker's life (imports,
set-up, compilation, steps), `peak_rss_steps` while the timed steps ran
(the peak is reset once warm). With `figures_only` in the spec a worker
only builds the step and answers its compiled figures (compare.py's
`remat='full'` variants). Libraries are imported only by the workers that
use them (the PEFT worker never imports jax).
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, WEIGHT_DECAY = 1e-4, 0.01
NF4_BLOCK = 64  # QLoRA's (and bitsandbytes') block of weights per absmax
AFTER_STEPS = "after_steps"  # an info key: figures a worker computes once its peaks are read


def _status(key: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))


def rss_bytes() -> int:
  """Current resident set (VmRSS) of this process."""
  return _status("VmRSS")


def peak_rss_bytes() -> int:
  """Peak resident set since the process started or `reset_peak_rss` (VmHWM, as ru_maxrss)."""
  return _status("VmHWM")


def reset_peak_rss() -> None:
  """Restarts the peak at the current resident set (Linux: /proc/self/clear_refs)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def batch_ids(spec: dict):
  """The (batch, seq) int32 token ids every contender trains on."""
  import numpy as np
  rng = np.random.default_rng(0)
  return rng.integers(0, spec["size"]["vocab_size"], (spec["batch"], spec["seq"]), dtype=np.int32)


def reference_logits(spec: dict):
  import numpy as np
  return np.load(os.path.join(spec["workdir"], "ref_logits.npy"))


# ----------------------------------------------------------------------------
# Contenders. Each builder returns (step, logits, info): step() runs one train
# step and returns its loss (a host float, so the step has finished); logits
# are the model's output on the batch before training; info holds counts and,
# for some, XLA's figures of the compiled step.


def _lm_loss(logits, ids):
  """Mean next-token NLL: what `lora_jax.train.causal_lm_loss` computes for an all-ones mask."""
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _linen_base(spec: dict):
  """The plain linen Llama, its params (seed 0, as compare.py's reference) and the batch."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from lora_jax.models.llama import Llama, LlamaConfig
  llama = Llama(LlamaConfig(**spec["size"], remat=spec.get("remat", "none"),
                            scan_layers=spec.get("scan_layers", False)))
  ids = jnp.asarray(batch_ids(spec))
  base = jax.jit(lambda k: nn.unbox(llama.init(k, ids)["params"]))(jax.random.key(0))
  return llama, base, ids


def _compiled_figures(jitted, *args) -> dict:
  """XLA's FLOPs and memory analysis of `jitted` for `args` (not consumed)."""
  import jax
  with jax.numpy_dtype_promotion("standard"):
    return compiled_figures(jitted.lower(*args).compile())


def compiled_figures(compiled) -> dict:
  """FLOPs and memory (argument, output, temp, alias, total bytes) of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes"))
         for f in ("argument", "output", "temp", "alias")}
  out["total_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                        - out["alias_bytes"])
  return dict(flops=float(cost["flops"]), **out)


def _count(tree) -> int:
  import jax
  return sum(x.size for x in jax.tree.leaves(tree))


def _peft_a_init():
  """A's initializer in PEFT and lora_jax, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for qwix and NNX
  (whose default, he-uniform, is sqrt(6) times wider): the same training trajectory in law."""
  import jax
  return jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _split_step(apply, tx):
  """A plain jitted step `(trained, opt_state, frozen, ids) -> (trained, opt_state, loss)`.

  Gradients are taken w.r.t. `trained` only; `trained` and `opt_state` are donated.
  """
  import jax
  import optax
  from flax import traverse_util

  def combine(trained, frozen):
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trained))
    return traverse_util.unflatten_dict(flat)

  def step(trained, opt_state, frozen, ids):
    loss_fn = lambda t: _lm_loss(apply(combine(t, frozen), ids), ids)
    loss, grads = jax.value_and_grad(loss_fn)(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _run_split_step(jitted, trained, frozen, ids, tx):
  """Closure over the state of a `_split_step`, and its compiled figures.

  The optimizer state is made by the first step (not by a figures-only worker).
  """
  import jax
  info = _compiled_figures(jitted, trained, jax.eval_shape(tx.init, trained), frozen, ids)
  state = {"trained": trained, "opt": None}

  def step():
    if state["opt"] is None:
      state["opt"] = tx.init(state["trained"])
    state["trained"], state["opt"], loss = jitted(state["trained"], state["opt"], frozen, ids)
    return float(loss)
  return step, info


def build_lora_jax(spec: dict, quantize: str | None = None):
  """lora_jax's step; with `quantize` ('nf4', ...) on a base quantized by `lora_jax.quantize`."""
  import jax
  import optax
  import lora_jax as lj
  from lora_jax import quantize as lq
  from lora_jax import sharding, train

  llama, base, ids = _linen_base(spec)
  config = lj.LoRAConfig(rank=spec["rank"], alpha=spec["alpha"], targets=list(TARGETS))
  model = lj.inject(llama, config)
  if quantize:
    base = lj.quantize_params(base, quantize)
  params = lj.init_adapters(model, base, jax.random.key(1), ids)
  del base
  ref = jax.jit(model.apply)({"params": params}, ids)  # jitted: eager ops compile one by one
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]  # boxed: shardings
  if quantize:
    abstract = jax.eval_shape(functools.partial(lj.quantize_params, format=quantize), abstract)
  tx = lj.optimizer(optax.adamw(LR, weight_decay=WEIGHT_DECAY), lj.split(params)[0], config)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  t = train.make_train_step(train.causal_lm_loss(model), tx, mesh, abstract, config)
  adapters, opt_state, base = t.place(params)
  del params
  batch, rng = t.shard_batch({"input_ids": ids}), jax.random.key(2)
  info = _compiled_figures(t.step, adapters, opt_state, base, batch, rng)
  info.update(trained_params=_count(adapters), total_params=_count(adapters) + _count(base))
  if quantize:
    kernels = [x for x in jax.tree.leaves(base, is_leaf=lq.is_quantized) if lq.is_quantized(x)]
    weights = sum(math.prod(k.shape) for k in kernels)
    info.update(quantized_kernels=len(kernels), quantized_weights=weights,
                bits_per_weight=8 * sum(k.nbytes for k in kernels) / weights)
  state = {"adapters": adapters, "opt": opt_state}

  def step():
    state["adapters"], state["opt"], metrics = t.step(state["adapters"], state["opt"], base,
                                                      batch, rng)
    return float(metrics["loss"])
  return step, ref, info


def build_full(spec: dict):
  import jax
  import optax
  llama, base, ids = _linen_base(spec)
  ref = jax.jit(llama.apply)({"params": base}, ids)
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  jitted = _split_step(lambda p, x: llama.apply({"params": p}, x), tx)
  step, info = _run_split_step(jitted, base, {}, ids, tx)
  info.update(trained_params=_count(base), total_params=_count(base))
  return step, ref, info


def build_qwix(spec: dict, weight_qtype: str | None = None):
  """qwix's LoRA; with `weight_qtype` ('nf4') qwix's QLoRA, blocks of 64 input weights."""
  import jax
  import optax
  import qwix
  from flax import traverse_util

  llama, base, ids = _linen_base(spec)
  quantized = {} if weight_qtype is None else dict(weight_qtype=weight_qtype,
                                                   tile_size=NF4_BLOCK)
  provider = qwix.LoraProvider(module_path=".*/(" + "|".join(TARGETS) + ")",
                               rank=spec["rank"], alpha=float(spec["alpha"]),
                               lora_a_initializer=_peft_a_init(), **quantized)
  model = qwix.apply_lora_to_model(llama, provider)
  if weight_qtype is not None:
    # The float weights quantized as qwix's step expects them (a float kernel fed to a
    # quantized model is an error outside `init`).
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    base = qwix.quantize_params(base, abstract)

  def adapters_of(key, base):  # creates only the missing (LoRA) params, like init_adapters
    _, state = model.apply({"params": base}, ids, rngs={"params": key}, mutable=["params"])
    flat = traverse_util.flatten_dict(state["params"])
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if "_lora_" in k[-1]})

  adapters = jax.jit(adapters_of)(jax.random.key(1), base)
  apply = lambda p, x: model.apply({"params": p}, x)
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  jitted = _split_step(apply, tx)
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  ref = jax.jit(apply)(traverse_util.unflatten_dict(flat), ids)
  step, info = _run_split_step(jitted, adapters, base, ids, tx)
  info.update(trained_params=_count(adapters), total_params=_count(adapters) + _count(base))
  if weight_qtype is not None:
    info.update(_qwix_storage(base))
  if weight_qtype == "nf4":  # after the timed steps, off the RSS figures (see main)
    info[AFTER_STEPS] = lambda: {"vs_lora_jax_nf4": _qwix_vs_lora_jax_nf4(
        _linen_base(spec)[1], base)}
  return step, ref, info


def _qwix_kernels(base) -> dict:
  """qwix's quantized kernels (`QArray`s, in its `WithAux` leaves) by path."""
  from flax import traverse_util
  return {path: x.array for path, x in traverse_util.flatten_dict(base).items()
          if hasattr(x, "array")}


def _qwix_storage(base) -> dict:
  """How many weights qwix quantized, and its stored bits per weight (codes and scales)."""
  kernels = _qwix_kernels(base).values()
  weights = sum(q.qvalue.size for q in kernels)
  bits = sum(q.qvalue.size * 4 + q.scale.size * 8 * q.scale.dtype.itemsize for q in kernels)
  return dict(quantized_weights=int(weights), bits_per_weight=bits / max(weights, 1))


def _qwix_vs_lora_jax_nf4(float_base, base) -> dict:
  """qwix's dequantized NF4 kernels against lora_jax's NF4 of the same float kernels, with
  and without double quantization: how many weights differ and the largest difference."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from qwix._src.core import qarray  # dequantize: what qwix's step does before the matmul
  from lora_jax import quantize as lq

  @jax.jit  # one program per kernel shape (eager, each small op would compile on its own)
  def compare(w, q):
    theirs = qarray.dequantize(q).reshape(w.shape)
    out = {}
    for name, double in (("single", False), ("double", True)):
      ours = lq.quantize(w, "nf4", block=NF4_BLOCK, double=double).dequantize()
      out[name] = (jnp.max(jnp.abs(ours - theirs)), jnp.sum(ours != theirs))
    return out

  floats = traverse_util.flatten_dict(float_base)
  diff = {name: {"max_abs_diff": 0.0, "weights_differing": 0} for name in ("single", "double")}
  for path, q in _qwix_kernels(base).items():
    for name, (largest, differing) in compare(floats[path], q).items():
      d = diff[name]
      d["max_abs_diff"] = max(d["max_abs_diff"], float(largest))
      d["weights_differing"] += int(differing)
  return diff


def build_nnx(spec: dict):
  import optax
  from flax import nnx
  import nnx_llama  # benchmarks/nnx_llama.py

  llama, base, ids = _linen_base(spec)
  model = nnx_llama.from_linen(llama.config, base, lora_rank=spec["rank"],
                               lora_alpha=float(spec["alpha"]), a_init=_peft_a_init(), seed=1)
  del base
  ref = nnx.jit(lambda m, x: m(x))(model, ids)
  optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WEIGHT_DECAY),
                            wrt=nnx.LoRAParam)

  @nnx.jit(donate_argnames=("model", "optimizer"))
  def train_step(model, optimizer, ids):
    loss_fn = lambda m: _lm_loss(m(ids), ids)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  trained = _count(nnx.state(model, nnx.LoRAParam))
  info = dict(trained_params=trained, total_params=_count(nnx.state(model, nnx.Param)))
  return (lambda: float(train_step(model, optimizer, ids))), ref, info


# ----------------------------------------------------------------------------
# PEFT on torch.


def build_peft(spec: dict):
  import peft
  import torch
  from transformers import LlamaForCausalLM

  torch.set_num_threads(spec["torch_threads"])
  # The linen params, written by lora_jax.hf.save_llama (compare.prepare).
  model = LlamaForCausalLM.from_pretrained(os.path.join(spec["workdir"], "hf"),
                                           torch_dtype=torch.float32)
  lora = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=list(TARGETS),
                         lora_dropout=0.0, bias="none")
  model = peft.get_peft_model(model, lora)
  model.train()
  ids = torch.from_numpy(batch_ids(spec)).long()
  with torch.no_grad():
    ref = model(input_ids=ids).logits.numpy()
  trained = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trained, lr=LR, weight_decay=WEIGHT_DECAY)

  def step():
    loss = model(input_ids=ids, labels=ids).loss  # HF shifts the labels: next-token NLL
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  info = dict(trained_params=sum(p.numel() for p in trained),
              total_params=sum(p.numel() for p in model.parameters()),
              torch_threads=torch.get_num_threads(),
              attn_implementation=model.config._attn_implementation)
  return step, ref, info


BUILDERS = dict(lora_jax=build_lora_jax, nnx=build_nnx, qwix=build_qwix, peft=build_peft,
                full=build_full,
                lora_jax_nf4=functools.partial(build_lora_jax, quantize="nf4"),
                qwix_nf4=functools.partial(build_qwix, weight_qtype="nf4"))


def _send(msg: dict) -> None:
  sys.stdout.write("@@ " + json.dumps(msg) + "\n")
  sys.stdout.flush()


def main() -> None:
  import numpy as np
  name, spec = sys.argv[1], json.loads(sys.argv[2])
  start = time.perf_counter()
  if name == "peft":
    import peft, torch, transformers  # noqa: F401,E401  (imports counted in rss_after_imports)
  else:
    import flax, jax, optax, lora_jax  # noqa: F401,E401
    if name.startswith("qwix"):
      import qwix  # noqa: F401
  rss_imports = rss_bytes()
  step, logits, info = BUILDERS[name](spec)
  after = info.pop(AFTER_STEPS, None)
  if spec.get("figures_only"):  # compiled figures, e.g. of a remat variant: no steps run
    return _send(dict(info, name=name))
  diff = float(np.max(np.abs(np.asarray(logits) - reference_logits(spec))))
  del logits
  t0 = time.perf_counter()
  first_loss = step()  # compiles (JAX) or warms up (torch)
  t1 = time.perf_counter()
  step()
  peak_setup = peak_rss_bytes()
  reset_peak_rss()  # from here: the peak while training
  _send(dict(info, name=name, first_step_s=t1 - t0, setup_s=time.perf_counter() - start,
             logits_max_abs_diff=diff, first_loss=first_loss, rss_after_imports=rss_imports,
             rss_ready=rss_bytes(), peak_rss_setup=peak_setup, pid=os.getpid()))
  for line in sys.stdin:
    if line.strip() == "step":
      t0 = time.perf_counter()
      loss = step()
      _send({"t": time.perf_counter() - t0, "loss": loss})
    elif line.strip() == "done":
      steps = peak_rss_bytes()
      answer = {"peak_rss_steps": steps, "peak_rss": max(peak_setup, steps),
                "rss_end": rss_bytes(), "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
      _send(dict(answer, **(after() if after else {})))
      return


if __name__ == "__main__":
  main()
