"""One run that trains several adapters on one frozen base (a run with `adapters`).

The adapters, each with its own `LoRAConfig`, are stacked (`lora_jax.stack`)
and trained in one step by `train.MixedLoss`: every step's batch holds
`train.batch_size` rows of each adapter, drawn by its own loader from the rows
that name it, and each adapter trains as a single-adapter run on its rows
alone would. The run writes `adapters/<name>` (an `AdapterSet` directory),
and `peft/<name>` and `merged/<name>` as `export` asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import bases, checkpoint, data, distributed, train
from lora_jax.adapter_set import INDEX
from lora_jax.inject import init_adapters, inject
from lora_jax.mixed import DORA, SCALE
from lora_jax.recipe import RunConfig
from lora_jax.run import (_check_run_dir, _eval_fn, _evaluator, _hold_out, _optimizer,
                          _train_loop, corpus_paths, start_or_resume)
from lora_jax.stack import AdapterStack, stack_adapters
from lora_jax.tree import combine, count, merge, split


def _adapter_datasets(cfg: RunConfig, tokenizer, names: list[str]) -> dict[str, tuple]:
  """Each adapter's `(train, eval)` rows, from data whose rows name their adapter."""
  d = cfg.data
  load = lambda specs: data.load_adapter_datasets(
      corpus_paths(specs), tokenizer, d.seq_len, key=d.adapter_key or "adapter", names=names,
      packing=d.packing)
  rows = load(d.train)
  if d.eval:
    held = load(d.eval)
    return {name: (rows[name], held[name]) for name in names}
  return {name: _hold_out(rows[name], cfg, f"adapter {name!r}") for name in names}


def train_adapters(cfg: RunConfig, base_model: bases.Base, tokenizer, mesh, progress: bool,
                    log: Callable[[str], None]) -> dict[str, Any]:
  """`train_run` for several adapters (`cfg.adapters`): one stack, trained by `MixedLoss`.

  Every step's batch holds `train.batch_size` rows of each adapter, drawn by its
  own `Loader` (seed `train.seed`), and each adapter starts as a run of its own
  config with `train.seed` would: so each trains as a single-adapter run on its
  rows alone (AdamW is elementwise), up to float round-off and dropout masks.
  """
  t = cfg.train
  configs = dict(cfg.adapters)
  names = list(configs)
  k = len(names)
  datasets = _adapter_datasets(cfg, tokenizer, names)
  sample = jnp.zeros((t.batch_size, cfg.data.seq_len), jnp.int32)
  llama = base_model.model()
  out = Path(cfg.output_dir).resolve()
  _check_run_dir(out, cfg)
  _, base_params = base_model.load(mesh)
  members = {}
  for name, config in configs.items():
    fresh = init_adapters(inject(llama, config), base_params, jax.random.key(t.seed), sample)
    members[name] = (split(fresh, config)[0], config)
  s = stack_adapters(llama, members, sample, dropout_rate=configs[names[0]].dropout_rate)
  mixed = inject(llama, s.spec)
  abstract = base_model.abstract_params(mixed, sample)
  tx = _optimizer(cfg, nn.unbox(abstract), None)
  step = train.make_train_step(train.MixedLoss(mixed, k), tx, mesh, abstract,
                               accum_steps=t.accum_steps, layouts=dict(s.layouts))
  adapters, opt_state, base = step.place(combine(s.params, base_params))
  sizes = {name: sum(x.size for x in jax.tree.leaves(members[name][0])) for name in names}
  del base_params, members
  log(f"model: {sum(count(_without_stack_settings(base)).values()):,} params, training {k} "
      "adapters ("
      + ", ".join(f"{name} {n:,}" for name, n in sizes.items())
      + f" params) stacked at rank {s.spec.max_rank} on a {dict(mesh.shape)} mesh")

  ckpt, state = start_or_resume(cfg, out, cfg.lora, adapters, opt_state,
                                {name: {"epoch": 0, "batch": 0} for name in names}, log)
  # Every host draws the whole global batch (each adapter's rows, in slot order) and
  # keeps its own rows of it.
  loaders = {}
  for name in names:
    try:
      loaders[name] = data.Loader(datasets[name][0], t.batch_size, seed=t.seed,
                                  position=state.data[name])
    except ValueError as e:
      raise ValueError(f"adapter {name!r}: {e}") from None
  rows = distributed.host_rows(step.batch_sharding, k * t.batch_size)
  ids = np.repeat(np.arange(k, dtype=np.int32), t.batch_size)

  def next_batch():
    parts = [next(loaders[name]) for name in names]
    batch = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    batch["adapter_ids"] = ids
    return distributed.host_batch({key: v[rows] for key, v in batch.items()},
                                  step.batch_sharding, k * t.batch_size)

  tokens = jax.jit(lambda b: jnp.sum(b["loss_mask"][:, 1:] * b["attention_mask"][:, 1:]))

  def step_fn(adapters, opt_state, base, batch, rng):
    # With MixedLoss the step's 'tokens' counts adapters: the bar shows tokens per second.
    adapters, opt_state, metrics = step.step(adapters, opt_state, base, batch, rng)
    return adapters, opt_state, {**metrics, "tokens": tokens(batch)}

  eval_loss = train.MixedLoss(mixed, k, dropout=False)
  fn = _eval_fn(lambda params, batch, rng: eval_loss(
      params, {**batch, "example_weight": jnp.ones(batch["adapter_ids"].shape, jnp.float32)},
      rng))
  eval_rows = distributed.host_rows(step.batch_sharding, t.batch_size)
  evaluators = {}
  for slot, name in enumerate(names):
    held = datasets[name][1]
    held = {**held, "adapter_ids": np.full(len(held["input_ids"]), slot, np.int32)}
    evaluators[name] = _evaluator(fn, step, held, t, eval_rows)
  evaluate = lambda adapters, base: {name: e(adapters, base) for name, e in evaluators.items()}
  position = lambda: {name: loader.state() for name, loader in loaders.items()}
  state, result = _train_loop(t, step_fn, state, base, next_batch, position, evaluate, ckpt,
                              progress, log)
  trained = s.replace(params=combine(state.adapters, split(s.params)[1]))
  result.update(_export_adapters(cfg, base_model, trained, _without_stack_settings(base), out))
  for name in ("adapters", "peft", "merged"):
    if name in result:
      log(f"{name}: {result[name]}")
    elif (out / name).exists():
      log(f"note: {out / name} is from an earlier export (export.{name} is off now): it "
          "does not hold this run's adapters")
  result["steps"] = state.step
  return result


def _without_stack_settings(params: Mapping) -> dict:
  """`params` without an adapter stack's frozen per-adapter settings (scales, DoRA flags)."""
  return {key: _without_stack_settings(value) if isinstance(value, Mapping) else value
          for key, value in params.items() if key not in (SCALE, DORA)}


def _export_adapters(cfg: RunConfig, base_model: bases.Base, trained: AdapterStack, base: Any,
                     out: Path) -> dict[str, Path]:
  """Each adapter of a trained stack to `adapters/<name>` (with the index `AdapterSet.load`
  reads), and as `cfg.export` asks PEFT's multi-adapter layout in `peft/<name>` and each
  merged model in `merged/<name>`."""
  e = cfg.export
  adapters = {name: trained.adapter(name) for name in trained.names if name is not None}
  written = {"adapters": out / "adapters"}
  for name, (tree, config) in adapters.items():
    checkpoint.save_adapter(out / "adapters" / name, tree, config, overwrite=True)
  if jax.process_index() == 0:  # the index `AdapterSet.load` reads
    (out / "adapters" / INDEX).write_text(json.dumps({"names": list(adapters)}, indent=2) + "\n")
  if e.peft if e.peft is not None else base_model.kind == "hf":
    from lora_jax import hf
    written["peft"] = out / "peft"
    for name, (tree, config) in adapters.items():  # PEFT's layout for adapters not 'default'
      hf.export_peft(out / "peft" / name, tree, config, model_config=base_model.config,
                     overwrite=True,
                     base_model_name_or_path=e.base_model_name_or_path or base_model.name_or_path)
  if e.merged if e.merged is not None else base_model.kind != "hf":
    written["merged"] = out / "merged"
    for name, (tree, config) in adapters.items():
      base_model.save(out / "merged" / name, merge(combine(tree, base), config),
                      dtype=e.merged_dtype, overwrite=True)
  return written
