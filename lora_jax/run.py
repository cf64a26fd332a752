"""The main job: fine-tune a base model with LoRA from a `RunConfig`, end to end.

Used by the `lora-jax` command and the notebook. The base is a Hugging Face
checkpoint (with its own tokenizer and chat template), a lora_jax model
directory such as the shipped `builtin:tiny-kjv`, or a preset (see
`lora_jax.bases`). A run directory (`output_dir`) holds `run_config.yaml`,
`checkpoints/` (resumed automatically), and at the end `adapter/`, and as
the `export` section asks `peft/` (a PEFT adapter) and `merged/` (a model of
the base's kind). With `model.quantize` the frozen base is quantized as it
loads (QLoRA); with `lora.init: loftq` the LoftQ start is computed once into
`loftq/`, and a PEFT export comes with `loftq_base/`, the dequantized base
those adapters belong to. A run with `adapters` trains several adapters at
once (`lora_jax.stacked_run`). Generation and merged exports from a run's
outputs are in `lora_jax.serve`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from lora_jax import bases, checkpoint, data, distributed, models, sharding, train
from lora_jax.config import LoRAConfig
from lora_jax.inject import init_adapters, inject, targets
from lora_jax.loftq import loftq_params
from lora_jax.optim import optimizer
from lora_jax.recipe import RunConfig
from lora_jax.quantized_base import dequantize_params, footprint
from lora_jax.tree import combine, count, merge, split


def corpus_paths(specs) -> list[Path]:
  """Paths of data specs; `builtin:NAME` is a shipped corpus."""
  out = []
  for spec in specs:
    if spec.startswith("builtin:"):
      path = Path(str(bases.ASSETS / "corpora" / f"{spec.split(':', 1)[1]}.txt"))
      if not path.is_file():
        raise FileNotFoundError(f"no built-in corpus '{spec}' (there are builtin:kjv and "
                                "builtin:devil)")
      out.append(path)
    else:
      out.append(Path(spec))
  return out


def _optimizer(cfg: RunConfig, params: Any, config: LoRAConfig) -> optax.GradientTransformation:
  """AdamW on a warm-up + cosine schedule, with LoRA+ when `train.lora_plus_ratio` is set."""
  t = cfg.train
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
      end_value=t.learning_rate * t.final_lr_fraction)
  tx = optax.adamw(schedule, weight_decay=t.weight_decay)
  if t.lora_plus_ratio is None:
    # The bare transformation: the optimizer state (and so checkpoints) of runs
    # without LoRA+ keep the layout they always had.
    return tx
  return optimizer(tx, params, config, lora_plus_ratio=t.lora_plus_ratio)


def _datasets(cfg: RunConfig, tokenizer) -> tuple[dict, dict]:
  d = cfg.data
  rows = data.load_dataset(corpus_paths(d.train), tokenizer, d.seq_len, packing=d.packing,
                           documents=d.documents)
  if d.eval:
    return rows, data.load_dataset(corpus_paths(d.eval), tokenizer, d.seq_len,
                                   packing=d.packing, documents=d.documents)
  return _hold_out(rows, cfg, "data")


def _hold_out(rows: dict, cfg: RunConfig, what: str) -> tuple[dict, dict]:
  """`(train, eval)`: `data.eval_fraction` of the rows held out, chosen by `train.seed`."""
  n = len(next(iter(rows.values())))
  held = max(1, int(round(n * cfg.data.eval_fraction)))
  if n - held < 1:
    raise ValueError(f"{what}: {n} rows of {cfg.data.seq_len} tokens are too few to hold some "
                     "out")
  order = np.random.default_rng(cfg.train.seed).permutation(n)
  pick = lambda idx: {k: v[np.sort(idx)] for k, v in rows.items()}
  return pick(order[held:]), pick(order[:held])


def _check_run_dir(out: Path, cfg: RunConfig) -> None:
  saved = out / "run_config.yaml"
  if saved.exists():
    previous = RunConfig.from_dict(yaml.safe_load(saved.read_text()))
    # With or without LoRA+ the optimizer state differs in layout, so the
    # checkpoints of one cannot resume the other.
    lora_plus = lambda c: c.train.lora_plus_ratio is not None
    if (previous.lora != cfg.lora or previous.model != cfg.model or previous.data != cfg.data
        or lora_plus(previous) != lora_plus(cfg) or previous.adapters != cfg.adapters):
      raise ValueError(f"{out} holds a different run's checkpoints (its run_config.yaml "
                       "differs in model, lora, adapters, data or whether "
                       "train.lora_plus_ratio is set); choose another output_dir")
  elif out.exists() and any(out.iterdir()):
    raise ValueError(f"{out} is not empty and holds no lora-jax run; choose another output_dir")
  out.mkdir(parents=True, exist_ok=True)
  saved.write_text(cfg.to_yaml())


def train_run(cfg: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print,
              full: bool = False) -> dict[str, Any]:
  """Fine-tunes `cfg.model.base` with LoRA on `cfg.data` (or all params, `full`).

  Resumes from `output_dir/checkpoints` when they exist. Returns the eval
  losses before and after, the steps run and where the outputs went.
  """
  t = cfg.train
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.batch_size % (shards * t.accum_steps):
    raise ValueError(f"train.batch_size={t.batch_size} must divide by the data x fsdp mesh axes "
                     f"({shards}) x train.accum_steps ({t.accum_steps})")
  if full and t.lora_plus_ratio is not None:
    raise ValueError("train.lora_plus_ratio is a LoRA setting: full training has no adapters "
                     "(it would only speed up the biases and norms); leave it unset")
  if not full and cfg.lora.init == "loftq" and cfg.model.quantize == "none":
    raise ValueError("lora.init=loftq fits the adapters to a quantized base's error: set "
                     "model.quantize (nf4, int4 or int8)")
  if full and cfg.model.quantize != "none":
    raise ValueError(f"model.quantize={cfg.model.quantize} freezes the base in few bits: full "
                     "training needs float params; set model.quantize=none")
  if full and cfg.adapters:
    raise ValueError("adapters: pretrain trains every param of one model; several adapters "
                     "train with lora-jax train")
  base_model = bases.resolve(cfg.model)
  tokenizer = base_model.tokenizer()
  if cfg.adapters:
    from lora_jax.stacked_run import train_adapters  # it builds on this module's steps
    return train_adapters(cfg, base_model, tokenizer, mesh, progress, log)
  train_rows, eval_rows = _datasets(cfg, tokenizer)

  sample = jnp.zeros((t.batch_size, cfg.data.seq_len), jnp.int32)
  llama = base_model.model()
  config = LoRAConfig(trainable=(".*",)) if full else cfg.lora
  model = llama if full else inject(llama, config)
  abstract = base_model.abstract_params(model, sample)
  tx = _optimizer(cfg, nn.unbox(abstract), config)
  out = Path(cfg.output_dir).resolve()
  _check_run_dir(out, cfg)
  if full:
    _, params = base_model.load(mesh)
  elif config.init == "loftq":
    params = _loftq_start(base_model, model, config, sample, abstract, mesh, out / "loftq",
                          jax.random.key(t.seed), log)
  else:
    _, base_params = base_model.load(mesh)
    params = init_adapters(model, base_params, jax.random.key(t.seed), sample)
  step = train.make_train_step(train.causal_lm_loss(model), tx, mesh, abstract,
                               config, accum_steps=t.accum_steps)
  adapters, opt_state, base = step.place(params)
  n = count(params, config)
  log(f"model: {sum(n.values()):,} params, training {n['lora'] + n['trainable']:,} "
      f"({100 * (n['lora'] + n['trainable']) / sum(n.values()):.2f}%) on a "
      f"{dict(mesh.shape)} mesh")

  ckpt, state = start_or_resume(cfg, out, config, adapters, opt_state,
                                {"epoch": 0, "batch": 0}, log)
  rows = distributed.host_rows(step.batch_sharding, t.batch_size)
  loader = data.Loader(train_rows, t.batch_size, seed=t.seed, host_rows=rows,
                       position=state.data)
  evaluate = _evaluator(_eval_fn(train.causal_lm_loss(model, dropout=False)), step, eval_rows,
                        t, rows)
  next_batch = lambda: distributed.host_batch(next(loader), step.batch_sharding, t.batch_size)
  state, result = _train_loop(t, step.step, state, base, next_batch, loader.state, evaluate,
                              ckpt, progress, log)
  final = combine(state.adapters, base)
  if full:
    result["model"] = base_model.save(out / "model", final, overwrite=True)
    log(f"model: {result['model']}")
  else:
    result.update(_export(cfg, base_model, final, config, out))
    for name in ("adapter", "peft", "loftq_base", "merged"):
      if name in result:
        log(f"{name}: {result[name]}")
      elif (out / name).exists() and name != "loftq_base":
        log(f"note: {out / name} is from an earlier export (export.{name} is off now): it "
            "does not hold this run's adapter")
  result["steps"] = state.step
  return result


def start_or_resume(cfg: RunConfig, out: Path, config: LoRAConfig | None, adapters: Any,
                    opt_state: Any, position: Any, log: Callable[[str], None]
                    ) -> tuple[checkpoint.TrainCheckpointer, checkpoint.TrainState]:
  """The run's checkpointer and its state: restored from `out/checkpoints` (shapes and
  shardings of `adapters` and `opt_state`), else step 0 at the loader `position`."""
  t = cfg.train
  ckpt = checkpoint.TrainCheckpointer(out / "checkpoints", config, save_every=t.save_every,
                                      keep=t.keep)
  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  state = ckpt.restore(checkpoint.TrainState(0, shapes(adapters), shapes(opt_state),
                                             jax.random.key(t.seed)))
  if state is None:
    return ckpt, checkpoint.TrainState(0, adapters, opt_state, jax.random.key(t.seed), position)
  log(f"resuming from step {state.step} in {out / 'checkpoints'}")
  return ckpt, state


def _losses(loss: float | Mapping[str, float]) -> str:
  """An eval loss, or each adapter's, for the log."""
  if isinstance(loss, Mapping):
    return ", ".join(f"{name} {value:.4f}" for name, value in loss.items())
  return f"{loss:.4f}"


def _train_loop(t, step_fn: Callable, state: checkpoint.TrainState, base: Any,
                next_batch: Callable[[], Any], position: Callable[[], Any],
                evaluate: Callable, ckpt: checkpoint.TrainCheckpointer, progress: bool,
                log: Callable[[str], None]) -> tuple[checkpoint.TrainState, dict[str, Any]]:
  """Steps from `state` to `train.steps`, checkpointing and evaluating on the way.

  Returns the last state (saved) and the eval losses before (at step 0 only) and after.
  """
  result = {"eval_before": evaluate(state.adapters, base)} if state.step == 0 else {}
  if "eval_before" in result:
    log(f"eval loss before: {_losses(result['eval_before'])}")

  bar = _progress(t.steps, state.step, progress)
  tokens, start, pending = 0, time.perf_counter(), None

  def report(metrics) -> None:
    # Reads a step's metrics once the next step is queued: the host never waits on the
    # device between steps just to draw the progress bar.
    nonlocal tokens
    tokens += int(metrics["tokens"])
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    bar.update(1)
    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{rate:,.0f}")

  while state.step < t.steps:
    batch = next_batch()
    rng = jax.random.fold_in(state.rng, state.step)
    new_adapters, opt_state, metrics = step_fn(state.adapters, state.opt_state, base, batch, rng)
    state = checkpoint.TrainState(state.step + 1, new_adapters, opt_state, state.rng,
                                  position())
    ckpt.save(state)
    if pending is not None:
      report(pending)
    pending = metrics
    if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps:
      bar.write(f"step {state.step}: eval loss {_losses(evaluate(state.adapters, base))}")
  if pending is not None:
    report(pending)
  bar.close()
  ckpt.save(state, force=True)
  ckpt.close()
  result["eval_after"] = evaluate(state.adapters, base)
  log(f"eval loss after: {_losses(result['eval_after'])}")
  return state, result


def _loftq_start(base_model: bases.Base, model: nn.Module, config: LoRAConfig, sample: Any,
                 abstract: Any, mesh: jax.sharding.Mesh, saved: Path, rng: jax.Array,
                 log: Callable[[str], None]) -> Any:
  """The LoftQ start (quantized base and fitted adapters), computed once and kept in
  `saved` (the run's `loftq/`): reruns and resumed runs read it back onto the mesh."""
  shardings = sharding.param_shardings(abstract, mesh)
  if not saved.exists():
    if jax.process_count() > 1:
      raise ValueError(f"{saved} does not exist: compute the LoftQ start once in a "
                       "single-process run (the same command on one host, with train.steps=0, "
                       "output_dir on storage every host reads), then start the multi-host "
                       "run, which reads it")
    log(f"LoftQ: fitting the {base_model.quantize} base and the adapters "
        f"({config.loftq_iter} iteration(s))")
    # In host memory: the float base need not fit the accelerators, and the SVDs run there.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      _, params = dataclasses.replace(base_model, quantize="none").load()
      params = init_adapters(model, params, rng, sample)
      params = loftq_params(params, config, base_model.quantize, iters=config.loftq_iter,
                            block=base_model.quantize_block)
      checkpoint.save_base(saved, params)
  return checkpoint.load_base(saved, shardings=shardings)


def _export(cfg: RunConfig, base_model: bases.Base, params: Any, config: LoRAConfig,
            out: Path) -> dict[str, Path]:
  """The adapter, and as `cfg.export` asks the PEFT adapter and the merged model."""
  e = cfg.export
  written = {"adapter": checkpoint.save_adapter(out / "adapter", params, config, overwrite=True)}
  if e.peft if e.peft is not None else base_model.kind == "hf":
    from lora_jax import hf
    base_name = e.base_model_name_or_path or base_model.name_or_path
    if config.init == "loftq":
      # LoftQ adapters belong to the base LoftQ fitted, not to the original checkpoint.
      written["loftq_base"] = base_model.save(
          out / "loftq_base", dequantize_params(split(params, LoRAConfig())[1]), overwrite=True)
      base_name = e.base_model_name_or_path or str(written["loftq_base"])
    written["peft"] = hf.export_peft(
        out / "peft", params, config, model_config=base_model.config, overwrite=True,
        base_model_name_or_path=base_name)
  if e.merged if e.merged is not None else base_model.kind != "hf":
    written["merged"] = base_model.save(out / "merged", merge(params, config),
                                        dtype=e.merged_dtype, overwrite=True)
  return written


def _progress(total: int, done: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=done, disable=not enabled, unit="step", dynamic_ncols=True)


def _eval_fn(loss_fn: train.LossFn) -> Callable:
  """`(adapters, base, batch) -> (summed loss, weight)`, jitted, without dropout's rng."""
  return jax.jit(lambda a, b, batch: loss_fn(combine(a, b), batch, jax.random.key(0)))


def _evaluator(fn, step, rows, t, host_rows):
  n = len(next(iter(rows.values())))
  batches = min(t.eval_batches, max(n // t.batch_size, 1))

  def evaluate(adapters, base) -> float:
    loader = data.Loader(rows, min(t.batch_size, n), seed=0, shuffle=False,
                         host_rows=host_rows if n >= t.batch_size else None,
                         drop_remainder=False)
    total = weight = 0.0
    for _ in range(batches):
      batch = next(loader)
      if n >= t.batch_size:
        batch = distributed.host_batch(batch, step.batch_sharding, t.batch_size)
      s, w = fn(adapters, base, batch)
      total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)

  return evaluate


def describe(cfg: RunConfig) -> dict[str, Any]:
  """Model size, trainable count, the layers the config adapts and the frozen base's
  stored bytes beside its bfloat16 bytes (no weights loaded)."""
  base_model = bases.resolve(cfg.model)
  llama = base_model.model()
  sample = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(base_model.abstract_params(inject(llama, cfg.lora), sample))
  n = count(abstract, cfg.lora)
  stored = footprint(split(abstract, cfg.lora)[1])
  facts = {"params": sum(n.values()), "trainable": n["lora"] + n["trainable"],
           "adapter_params": n["lora"], "targets": targets(llama, cfg.lora, sample),
           "layers": llama.config.num_layers, "vocab_size": llama.config.vocab_size,
           "family": models.family_name(llama.config),
           "base_bytes": stored["bytes"], "base_bf16_bytes": 2 * stored["weights"],
           "quantized": {**stored, "format": cfg.model.quantize},
           "kind": {"hf": "Hugging Face checkpoint", "model": "lora_jax model directory",
                    "preset": "preset (random weights)"}[base_model.kind]}
  if cfg.adapters:  # several adapters: each one's own count and layers
    facts["adapters"] = {}
    for name, config in cfg.adapters:
      shapes = nn.unbox(base_model.abstract_params(inject(llama, config), sample))
      facts["adapters"][name] = {"adapter_params": count(shapes, config)["lora"],
                                 "targets": targets(llama, config, sample)}
    facts["params"] -= facts["adapter_params"]
    facts["adapter_params"] = sum(a["adapter_params"] for a in facts["adapters"].values())
    facts["trainable"] = facts["adapter_params"]
    facts["params"] += facts["adapter_params"]
    facts["targets"] = sorted({p for a in facts["adapters"].values() for p in a["targets"]})
  return facts
