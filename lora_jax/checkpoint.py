"""Orbax checkpoints: tiny adapters, resumable training state, merged exports.

* `save_adapter`/`load_adapter`: only the adapter leaves (and `trainable`
  params) and the `LoRAConfig`, in one Orbax checkpoint directory.
* `TrainCheckpointer`: an `ocp.CheckpointManager` for training state (step,
  adapters, optimizer state, rng, data position; never the frozen base),
  saving asynchronously every N steps, keeping the last K, saving on SIGTERM
  (the pre-emption notice of TPU VMs), and skipping damaged checkpoints.
* `export_merged`: the base model's own tree with the adapters folded in,
  restorable by the plain model with a standard Orbax restore.

Nothing here overwrites a checkpoint a user saved: writing into a non-empty
directory raises `FileExistsError` unless `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from lora_jax.config import ADAPTER_LEAVES, LoRAConfig, join_path
from lora_jax.layout import Layout, find_layout
from lora_jax.quantize import QuantizedKernel, is_quantized
from lora_jax.tree import leaf_paths, merge, split

log = logging.getLogger(__name__)


def _absolute(directory) -> epath.Path:
  path = epath.Path(directory)
  return path if str(path).startswith(("gs://", "s3://")) else epath.Path(Path(path).resolve())


def _refuse_overwrite(path: epath.Path, overwrite: bool) -> None:
  if path.exists() and any(path.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{path} exists and is not empty: refusing to overwrite it "
                            "(pass overwrite=True to replace it)")
    path.rmtree()


def _abstract(metadata_tree: Any, shardings: Any) -> Any:
  """Shape/dtype structs from checkpoint metadata, placed on `shardings` if given, else
  whole on this process's first device (never on the devices of the process that
  wrote them, which this one may not have)."""
  if shardings is None:
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        metadata_tree)
  return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                      metadata_tree, shardings)


def _adapter_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      adapters=ocp.StandardCheckpointHandler(), lora_config=ocp.JsonCheckpointHandler()))


def save_adapter(directory, params: Mapping, config: LoRAConfig, *, overwrite: bool = False
                 ) -> epath.Path:
  """Writes the adapters (and `trainable` params) and the config; nothing else.

  Args:
    directory: a new or empty directory (local path or `gs://...`).
    params: the full param tree, or just the adapters.
    config: the config the adapters were trained with.
    overwrite: replace an existing non-empty directory.

  Returns:
    The directory written.
  """
  adapters, _ = split(params, config)
  if not adapters:
    raise ValueError("params hold no adapters or trainable params: nothing to save")
  path = _absolute(directory)
  _refuse_overwrite(path, overwrite)
  checkpointer = _adapter_checkpointer()
  checkpointer.save(path, args=ocp.args.Composite(
      adapters=ocp.args.StandardSave(nn.unbox(adapters)),
      lora_config=ocp.args.JsonSave(config.to_dict())))
  return path


def load_adapter(directory, *, target: Mapping | None = None, shardings: Any = None,
                 layouts: Mapping[str, Layout] | None = None) -> tuple[dict, LoRAConfig]:
  """Reads an adapter checkpoint.

  Args:
    directory: what `save_adapter` wrote.
    target: the base params (or abstract ones) the adapters are meant for;
      each adapter is checked against its kernel there. Params that hold
      adapters already (another run's, say) define what fits themselves:
      the same adapter leaves with the same shapes.
    layouts: every adapter's layout by layer path (`lora_jax.layouts`), to
      check against `target`'s kernels; without it each is read from shapes.
    shardings: a tree of shardings for the adapters (e.g.
      `TrainStep.adapter_shardings`): each host reads only its shards.
      Without it the adapters come whole onto this process's first device,
      whatever devices wrote them.

  Returns:
    `(adapters, config)`; `lora_jax.combine(adapters, base)` gives full params.

  Raises:
    FileNotFoundError: when `directory` holds no adapter checkpoint.
    ValueError: naming the first path whose shape, rank or layer does not fit
      `target`.
  """
  path = _absolute(directory)
  if not (path / "adapters").exists() or not (path / "lora_config").exists():
    raise FileNotFoundError(f"{path} holds no lora_jax adapter checkpoint")
  checkpointer = _adapter_checkpointer()
  metadata = checkpointer.metadata(path).item_metadata["adapters"].tree
  restored = checkpointer.restore(path, args=ocp.args.Composite(
      adapters=ocp.args.StandardRestore(_abstract(metadata, shardings)),
      lora_config=ocp.args.JsonRestore()))
  config = LoRAConfig.from_dict(restored["lora_config"])
  adapters = restored["adapters"]
  if target is not None:
    check_fits(adapters, nn.unbox(target), config, layouts)
  return adapters, config


def _base_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      params=ocp.StandardCheckpointHandler(), formats=ocp.JsonCheckpointHandler()))


def save_base(directory, params: Mapping, *, overwrite: bool = False) -> epath.Path:
  """Writes a frozen base, quantized kernels included, so quantization runs once.

  Args:
    directory: a new or empty directory (local path or `gs://...`).
    params: plain params, some kernels `QuantizedKernel`s (`quantize_params`).
    overwrite: replace an existing non-empty directory.

  Returns:
    The directory written; `load_base` reads it back bit for bit.
  """
  plain = nn.unbox(params)
  formats = {}
  for kp, x in jax.tree_util.tree_leaves_with_path(plain, is_leaf=is_quantized):
    if is_quantized(x):
      formats[join_path(kp)] = {"format": x.format, "dtype": x.dtype,
                                                   "block": x.block}
  path = _absolute(directory)
  _refuse_overwrite(path, overwrite)
  _base_checkpointer().save(path, args=ocp.args.Composite(
      params=ocp.args.StandardSave(plain), formats=ocp.args.JsonSave(formats)))
  return path


def load_base(directory, *, shardings: Any = None) -> dict:
  """Reads what `save_base` wrote.

  Args:
    directory: a `save_base` directory.
    shardings: a tree of shardings shaped like the params (for quantized
      kernels, `lora_jax.quantized_base.quantized_shardings`): each host reads only
      its shards. Without it the params come whole onto this process's first
      device, whatever devices wrote them.

  Raises:
    FileNotFoundError: when `directory` holds no saved base.
  """
  path = _absolute(directory)
  if not (path / "params").exists() or not (path / "formats").exists():
    raise FileNotFoundError(f"{path} holds no frozen base saved by lora_jax (save_base)")
  checkpointer = _base_checkpointer()
  formats = checkpointer.restore(path, args=ocp.args.Composite(
      formats=ocp.args.JsonRestore()))["formats"]
  metadata = checkpointer.metadata(path).item_metadata["params"].tree
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # as for adapters
  struct_of = lambda m: None if m is None else jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                    sharding=here)

  def build(tree, prefix):
    if prefix in formats:
      return QuantizedKernel(*(struct_of(tree.get(k)) for k in ("codes", "absmax", "absmax2",
                                                               "offset")), **formats[prefix])
    if isinstance(tree, Mapping):
      return {k: build(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    return struct_of(tree)

  abstract = build(metadata, "")
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  return checkpointer.restore(path, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract)))["params"]


def check_fits(adapters: Mapping, base: Mapping, config: LoRAConfig,
               layouts: Mapping[str, Layout] | None = None) -> None:
  """Raises `ValueError` naming the first adapter path that does not fit `base`.

  `base` may be the plain model's params, the base side of `split(params,
  config)` (which lacks the `trainable` params: those are then not checked),
  or params that hold adapters already: then those adapters define what fits
  (same leaves, same shapes), as a restore into them needs.
  """
  def walk(tree: Mapping, base_tree: Any, prefix: str):
    if isinstance(base_tree, Mapping):
      base_tree = {**base_tree, **{k: v for k, v in tree.items()
                                   if not isinstance(v, Mapping) and k not in ADAPTER_LEAVES
                                   and k not in base_tree}}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        if not isinstance(base_tree, Mapping) or key not in base_tree:
          leaves = leaf_paths(value)
          if not any(p.rsplit("/", 1)[-1] in ADAPTER_LEAVES for p in leaves):  # trainable params that this base side does not hold
            continue
          raise ValueError(f"adapter '{path}' has no layer in the base params")
        walk(value, base_tree[key], path)
      elif key in ADAPTER_LEAVES:
        if key in base_tree:  # the target's own adapters define what fits
          if tuple(base_tree[key].shape) != tuple(value.shape):
            raise ValueError(f"adapter '{path}' has shape {tuple(value.shape)}, the target's "
                             f"adapter there has {tuple(base_tree[key].shape)}")
          continue
        if "kernel" not in base_tree:
          raise ValueError(f"adapter '{path}' has no kernel beside it in the base params")
        kernel = base_tree["kernel"].shape
        if layouts is not None and prefix not in layouts:
          raise ValueError(f"the layouts hold no record of layer '{prefix}'")
        try:
          layout = find_layout(kernel, tree["lora_a"].shape, tree["lora_b"].shape,
                               tree["lora_magnitude"].shape if "lora_magnitude" in tree else None,
                               None if layouts is None else layouts[prefix])
        except (KeyError, ValueError) as e:
          raise ValueError(f"adapter '{path}' does not fit kernel {kernel}: {e}") from None
        rank = layout.rank_of(tree["lora_a"].shape)
        if rank != config.rank_for(prefix):
          raise ValueError(f"adapter '{path}' has rank {rank}, its config gives "
                           f"{config.rank_for(prefix)}")
      elif key not in base_tree or base_tree[key].shape != value.shape:
        found = base_tree[key].shape if key in base_tree else "nothing"
        raise ValueError(f"trainable '{path}' has shape {value.shape}, the base has {found}")

  is_adapter = lambda p: p.rsplit("/", 1)[-1] in ADAPTER_LEAVES
  held = {p for p in leaf_paths(base) if is_adapter(p)}
  if held:
    saved = {p for p in leaf_paths(adapters) if is_adapter(p)}
    for which, paths in (("the checkpoint lacks", held - saved), ("the target lacks", saved - held)):
      if paths:
        raise ValueError(f"the target holds adapters, and {which} adapter "
                         f"'{sorted(paths)[0]}' ({len(paths)} in all)")
  walk(adapters, base, "")


def export_merged(directory, params: Mapping, config: LoRAConfig, *, dtype: Any = None,
                  overwrite: bool = False) -> epath.Path:
  """Writes the merged model: exactly the base model's tree, no adapter leaves.

  Merged in float32 and cast once (to each kernel's dtype or `dtype`), on
  whatever devices `params` live: a sharded tree stays sharded and each host
  writes its own shards. The plain model restores it with
  `ocp.StandardCheckpointer().restore(directory, abstract_params)`.
  """
  path = _absolute(directory)
  _refuse_overwrite(path, overwrite)
  merged = merge(nn.unbox(params), config, dtype=dtype)  # layer by layer
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, merged)
  checkpointer.wait_until_finished()
  return path


@dataclasses.dataclass
class TrainState:
  """What a resumed run needs, besides the frozen base.

  Attributes:
    step: steps done.
    adapters: the trained leaves.
    opt_state: their optimizer state.
    rng: the run's key (typed or raw).
    data: the data loader's position, a small dict of ints.
  """

  step: int
  adapters: Any
  opt_state: Any
  rng: jax.Array
  data: dict[str, int] = dataclasses.field(default_factory=dict)


class TrainCheckpointer:
  """Resumable training checkpoints on `ocp.CheckpointManager`.

  Call `save(state)` after every step: it writes every `save_every` steps
  (asynchronously: training goes on while the files are written), and at
  once when SIGTERM arrived, after which it waits for the write and exits
  with status 0. SIGTERM only sets a flag until the next `save`; a second
  SIGTERM ends the process at once. On several hosts the signal handler is
  not installed: JAX's pre-emption notice (`reached_preemption`) decides, the
  same step on every host. Saving a step that exists (a resumed run redoing
  it) replaces it. `restore` returns the newest complete checkpoint, skipping
  (and reporting) damaged ones; unfinished writes are never listed.

  Example:
    ckpt = TrainCheckpointer(run_dir / 'checkpoints', config, save_every=100)
    state = ckpt.restore(abstract_state) or fresh_state
    for ...:
      state = ...
      ckpt.save(state)
    ckpt.close()
  """

  def __init__(self, directory, config: LoRAConfig, *, save_every: int = 100, keep: int = 3,
               asynchronous: bool = True, handle_sigterm: bool = True):
    for name, value in (("save_every", save_every), ("keep", keep)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    self.directory = _absolute(directory)
    self.config = config
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=asynchronous))
    try:
      self._check_config()
    except ValueError:
      self._manager.close()
      raise
    self._terminate = False
    self._previous_handler = None
    # With several hosts each would see SIGTERM at a different step; there JAX's own
    # pre-emption notice (`reached_preemption`) gives every host the same step instead.
    if handle_sigterm and jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _check_config(self) -> None:
    """The directory must not hold another run's checkpoints."""
    marker = self.directory / "lora_config.json"
    if marker.exists():
      saved = LoRAConfig.from_json(marker.read_text())
      if saved != self.config:
        raise ValueError(f"{self.directory} holds checkpoints of a run with another LoRA "
                         f"config ({saved}); use a new directory")
    else:
      marker.write_text(self.config.to_json())

  def _on_sigterm(self, signum, frame) -> None:
    del frame
    if self._terminate:  # a second SIGTERM: no more waiting for the training loop
      self._restore_handler()
      os.kill(os.getpid(), signum)
    self._terminate = True

  @property
  def terminating(self) -> bool:
    """Whether SIGTERM arrived (the next `save` saves and exits)."""
    return self._terminate

  def save(self, state: TrainState, *, force: bool = False) -> bool:
    """Saves `state` if its step is due (or `force`, or on SIGTERM).

    Returns:
      Whether a checkpoint was started.
    """
    due = (force or self._terminate or state.step % self.save_every == 0
           or self._manager.reached_preemption(state.step))
    if due:
      if state.step in self._manager.all_steps():
        # A resumed run recomputing a step it saved before (perhaps damaged): replace it.
        self._manager.wait_until_finished()
        self._manager.delete(state.step)
      rng = state.rng
      if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
      tree = {"adapters": state.adapters, "opt_state": state.opt_state, "rng": rng}
      self._manager.save(state.step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree),
          meta=ocp.args.JsonSave({"step": state.step, "data": dict(state.data)})), force=True)
    if self._terminate:
      self._manager.wait_until_finished()
      log.warning("SIGTERM: saved step %d to %s; exiting", state.step, self.directory)
      self.close()
      sys.exit(0)
    return due

  def steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    self._manager.reload()
    return list(self._manager.all_steps())

  def restore(self, abstract: TrainState, *, step: int | None = None) -> TrainState | None:
    """The newest restorable checkpoint (or `step`), or None when there is none.

    Args:
      abstract: a `TrainState` of `jax.ShapeDtypeStruct`s (with shardings, for
        a mesh: restore places every leaf there, whatever mesh saved it). Its
        `step` and `data` are ignored.
      step: a particular step instead of the newest.
    """
    self._report_unfinished()
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    rng = abstract.rng
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if typed:
      rng = jax.eval_shape(jax.random.key_data, rng)
    for candidate in candidates:
      try:
        tree = {"adapters": abstract.adapters, "opt_state": abstract.opt_state, "rng": rng}
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 (any damage means: try the one before)
        if step is not None:
          raise
        log.warning("skipping damaged checkpoint %s/%d: %s", self.directory, candidate,
                    str(e).splitlines()[0][:200])
        continue
      tree, meta = restored["state"], restored["meta"]
      key = (jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(abstract.rng))
             if typed else tree["rng"])
      return TrainState(meta["step"], tree["adapters"], tree["opt_state"], key, meta["data"])
    return None

  def _report_unfinished(self) -> None:
    for entry in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in entry.name:
        log.warning("skipping unfinished checkpoint %s", entry)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and restores the previous SIGTERM handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    self._restore_handler()

  def _restore_handler(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
