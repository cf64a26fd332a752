"""The main job: fine-tune a base model with LoRA from a `RunConfig`, end to end.

Used by the `lora-jax` command and the notebook. A model directory holds
`model.json` (the Llama architecture and tokenizer) and `params/` (an Orbax
checkpoint of the plain model's params); `builtin:tiny-kjv` is the one the
package ships. A run directory (`output_dir`) holds `run_config.yaml`,
`checkpoints/` (resumed automatically), and at the end `adapter/` and
`merged/` (a model directory).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml

from lora_jax import checkpoint, data, distributed, sharding, train
from lora_jax.config import LoRAConfig
from lora_jax.inject import init_adapters, inject, targets
from lora_jax.models.llama import Llama, LlamaConfig, config_for, generate
from lora_jax.optim import optimizer
from lora_jax.recipe import ModelSection, RunConfig
from lora_jax.tree import combine, count, merge

ASSETS = resources.files("lora_jax") / "assets"


def corpus_paths(specs) -> list[Path]:
  """Paths of data specs; `builtin:NAME` is a shipped corpus."""
  out = []
  for spec in specs:
    if spec.startswith("builtin:"):
      path = Path(str(ASSETS / "corpora" / f"{spec.split(':', 1)[1]}.txt"))
      if not path.is_file():
        raise FileNotFoundError(f"no built-in corpus '{spec}' (there are builtin:kjv and "
                                "builtin:devil)")
      out.append(path)
    else:
      out.append(Path(spec))
  return out


def _model_dir(base: str) -> Path:
  if base.startswith("builtin:"):
    path = Path(str(ASSETS / base.split(":", 1)[1]))
    if not (path / "model.json").is_file():
      raise FileNotFoundError(f"no built-in model '{base}' (there is builtin:tiny-kjv)")
    return path
  path = Path(base)
  if not (path / "model.json").is_file():
    raise FileNotFoundError(f"{path} is not a model directory (no model.json)")
  return path.resolve()


def llama_config(section: ModelSection) -> LlamaConfig:
  """The architecture of `section.base`, with the section's run options."""
  options = dict(scan_layers=section.scan_layers, remat=section.remat, dtype=section.dtype,
                 param_dtype=section.param_dtype)
  if section.base.startswith("preset:"):
    config = config_for(section.base.split(":", 1)[1], **options)
  else:
    described = json.loads((_model_dir(section.base) / "model.json").read_text())["llama"]
    config = LlamaConfig(**{**described, **options})
  if config.vocab_size < data.ByteTokenizer.vocab_size:  # larger ids would embed as NaN
    raise ValueError(
        f"model.base={section.base}: its vocabulary ({config.vocab_size}) is smaller than the "
        f"byte tokenizer's {data.ByteTokenizer.vocab_size} ids; use a byte-level model "
        "(preset:tiny-byte, or a model this command made)")
  return config


def save_model(directory, config: LlamaConfig, params, *, overwrite: bool = False) -> Path:
  """Writes a model directory: `model.json` and the params (layers unstacked or not)."""
  path = Path(directory).resolve()
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty: refusing to overwrite it")
  path.mkdir(parents=True, exist_ok=True)
  arch = {k: v for k, v in dataclasses.asdict(config).items()
          if k not in ("scan_layers", "remat", "dtype", "param_dtype")}
  if arch.get("rope_scaling") is not None:
    arch["rope_scaling"] = dataclasses.asdict(config.rope_scaling)
  (path / "model.json").write_text(json.dumps(
      {"llama": arch, "scan_layers": config.scan_layers, "tokenizer": "byte"}, indent=2))
  checkpointer = ocp.StandardCheckpointer()
  if (path / "params").exists():
    shutil.rmtree(path / "params")
  checkpointer.save(path / "params", nn.unbox(params))
  checkpointer.wait_until_finished()
  return path


def load_base(section: ModelSection, sample_ids: jax.Array, shardings: Any = None
              ) -> tuple[Llama, Any]:
  """The plain model and its params (restored onto `shardings` when given)."""
  model = Llama(llama_config(section))
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), sample_ids)["params"])
  if section.base.startswith("preset:"):
    params = nn.unbox(jax.jit(model.init, out_shardings=None)(jax.random.key(0),
                                                             sample_ids)["params"])
    return model, params if shardings is None else jax.device_put(params, shardings)
  path = _model_dir(section.base) / "params"
  saved = json.loads((path.parent / "model.json").read_text()).get("scan_layers", False)
  if saved != section.scan_layers:
    raise ValueError(f"{path.parent} was saved with scan_layers={saved}; set "
                     f"model.scan_layers={str(saved).lower()}")
  target = abstract if shardings is None else jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
  return model, ocp.StandardCheckpointer().restore(path, target)


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
  n = len(next(iter(rows.values())))
  held = max(1, int(round(n * d.eval_fraction)))
  if n - held < 1:
    raise ValueError(f"data: {n} rows of {d.seq_len} tokens are too few to hold some out")
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
        or lora_plus(previous) != lora_plus(cfg)):
      raise ValueError(f"{out} holds a different run's checkpoints (its run_config.yaml "
                       "differs in model, lora, data or whether train.lora_plus_ratio is "
                       "set); choose another output_dir")
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
  tokenizer = data.ByteTokenizer()
  train_rows, eval_rows = _datasets(cfg, tokenizer)

  sample = jnp.zeros((t.batch_size, cfg.data.seq_len), jnp.int32)
  llama = Llama(llama_config(cfg.model))
  config = LoRAConfig(trainable=(".*",)) if full else cfg.lora
  model = llama if full else inject(llama, config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), sample)["params"]
  tx = _optimizer(cfg, nn.unbox(abstract), config)
  out = Path(cfg.output_dir).resolve()
  _check_run_dir(out, cfg)
  plain_shardings = sharding.param_shardings(
      jax.eval_shape(llama.init, jax.random.key(0), sample)["params"], mesh)
  _, base_params = load_base(cfg.model, sample, plain_shardings)
  params = base_params if full else init_adapters(
      model, base_params, jax.random.key(t.seed), sample)
  step = train.make_train_step(train.causal_lm_loss(model), tx, mesh, abstract,
                               config, accum_steps=t.accum_steps)
  adapters, opt_state, base = step.place(params)
  n = count(params, config)
  log(f"model: {sum(n.values()):,} params, training {n['lora'] + n['trainable']:,} "
      f"({100 * (n['lora'] + n['trainable']) / sum(n.values()):.2f}%) on a "
      f"{dict(mesh.shape)} mesh")

  ckpt = checkpoint.TrainCheckpointer(out / "checkpoints", config, save_every=t.save_every,
                                      keep=t.keep)
  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  state = ckpt.restore(checkpoint.TrainState(0, shapes(adapters), shapes(opt_state),
                                             jax.random.key(t.seed)))
  if state is None:
    state = checkpoint.TrainState(0, adapters, opt_state, jax.random.key(t.seed),
                                  {"epoch": 0, "batch": 0})
  else:
    log(f"resuming from step {state.step} in {out / 'checkpoints'}")
  rows = distributed.host_rows(step.batch_sharding, t.batch_size)
  loader = data.Loader(train_rows, t.batch_size, seed=t.seed, host_rows=rows,
                       position=state.data)
  evaluate = _evaluator(model, step, eval_rows, t, rows)
  result = {"eval_before": evaluate(state.adapters, base)} if state.step == 0 else {}
  if "eval_before" in result:
    log(f"eval loss before: {result['eval_before']:.4f}")

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
    batch = distributed.host_batch(next(loader), step.batch_sharding, t.batch_size)
    rng = jax.random.fold_in(state.rng, state.step)
    new_adapters, opt_state, metrics = step.step(state.adapters, state.opt_state, base, batch, rng)
    state = checkpoint.TrainState(state.step + 1, new_adapters, opt_state, state.rng,
                                  loader.state())
    ckpt.save(state)
    if pending is not None:
      report(pending)
    pending = metrics
    if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps:
      bar.write(f"step {state.step}: eval loss {evaluate(state.adapters, base):.4f}")
  if pending is not None:
    report(pending)
  bar.close()
  ckpt.save(state, force=True)
  ckpt.close()
  result["eval_after"] = evaluate(state.adapters, base)
  log(f"eval loss after: {result['eval_after']:.4f}")
  final = combine(state.adapters, base)
  if full:
    result["model"] = save_model(out / "model", llama.config, final, overwrite=True)
    log(f"model: {result['model']}")
  else:
    result["adapter"] = checkpoint.save_adapter(out / "adapter", final, config, overwrite=True)
    result["merged"] = save_model(out / "merged", llama.config,
                                  merge(final, config), overwrite=True)
    log(f"adapter: {result['adapter']}\nmerged model: {result['merged']}")
  result["steps"] = state.step
  return result


def _progress(total: int, done: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=done, disable=not enabled, unit="step", dynamic_ncols=True)


def _evaluator(model, step, rows, t, host_rows):
  loss_fn = train.causal_lm_loss(model, dropout=False)
  fn = jax.jit(lambda a, b, batch: loss_fn(combine(a, b), batch, jax.random.key(0)))
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


def generate_text(section: ModelSection, prompt: str, *, adapter: str | None = None,
                  max_new_tokens: int = 200, temperature: float = 0.0, seed: int = 0) -> str:
  """Continues `prompt` with the base model, or base + adapter."""
  tokenizer = data.ByteTokenizer()
  ids = jnp.asarray(tokenizer.encode(prompt, bos=True))[None, :]
  model, params = load_base(section, ids)
  if adapter is not None:
    adapters, config = checkpoint.load_adapter(adapter, target=params)
    model, params = inject(model, config), combine(adapters, params)
  out = generate(model, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                 rng=jax.random.key(seed) if temperature > 0 else None)
  new = np.asarray(out[0, ids.shape[1]:])
  # The vocabulary is padded past the tokenizer's ids; an untrained model may pick those.
  return tokenizer.decode(new[new < tokenizer.vocab_size])


def merge_adapter(section: ModelSection, adapter: str, output: str, *, dtype: str | None = None
                  ) -> Path:
  """Base + adapter folded into a new model directory."""
  sample = jnp.zeros((1, 8), jnp.int32)
  model, params = load_base(section, sample)
  adapters, config = checkpoint.load_adapter(adapter, target=params)
  merged = merge(combine(adapters, params), config, dtype=dtype)
  return save_model(output, model.config, merged)


def describe(cfg: RunConfig) -> dict[str, Any]:
  """Model size, trainable count and the layers the config adapts (no weights loaded)."""
  llama = Llama(llama_config(cfg.model))
  sample = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(inject(llama, cfg.lora).init, jax.random.key(0),
                                     sample)["params"])
  n = count(abstract, cfg.lora)
  return {"params": sum(n.values()), "trainable": n["lora"] + n["trainable"],
          "adapter_params": n["lora"], "targets": targets(llama, cfg.lora, sample),
          "layers": llama.config.num_layers, "vocab_size": llama.config.vocab_size}

