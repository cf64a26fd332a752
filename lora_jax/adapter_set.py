"""Several named adapters for one base model, chosen per call.

An `AdapterSet` holds `(adapters, config)` pairs by name, in the order they
were added; the base params stay with the user and are never copied or
changed. Running adapter `name` (or the base, with `None`):

  set.model(model, name).apply({'params': set.params(base, name)}, x)

`params` puts that adapter's leaves onto the base (the base's own leaves are
the same objects, bit for bit) and `model` injects its config. The set saves
as one directory (`save`/`load`: an Orbax `save_adapter` checkpoint per name
and an index) and writes and reads PEFT's multi-adapter layout
(`export_peft`/`import_peft`). `switch_merged` moves a merged model from one
adapter to another without the original base.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from lora_jax.checkpoint import load_adapter, save_adapter
from lora_jax.config import ADAPTER_LEAVES, LoRAConfig, check_adapter_name
from lora_jax.hf.checkpoints import fresh_directory
from lora_jax.hf.peft import ServingWarning
from lora_jax.hf.peft import export_peft as _export_peft
from lora_jax.hf.peft import import_peft as _import_peft
from lora_jax.inject import inject, quantized_model
from lora_jax.layout import Layout
from lora_jax.models.llama import LlamaConfig
from lora_jax.stack import AdapterStack, stack_adapters
from lora_jax.tree import leaf_paths, split
from lora_jax.unmerge import RECORD_LEAVES, merge_reversibly, unmerge

INDEX = "adapter_set.json"
DEFAULT = "default"  # the adapter PEFT keeps at the root of its directory
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _nodes(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
  """`(path, node)` of every dict in `tree`, depth first."""
  yield prefix, tree
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _nodes(value, f"{prefix}/{key}" if prefix else str(key))


def _check_adapters(adapters: Any, config: Any) -> dict:
  """The adapter side of `adapters` (`split`), checked to be one adapter of `config`."""
  if not isinstance(config, LoRAConfig):
    raise ValueError(f"expected a LoRAConfig, got {type(config).__name__}")
  if not isinstance(adapters, Mapping):
    raise ValueError(f"adapters must be nested mappings of params, got {type(adapters).__name__}")
  kept, _ = split(adapters, config)
  found = False
  for path, layer in _nodes(kept):
    held = [k for k in ADAPTER_LEAVES if k in layer]
    if not held:
      continue
    found = True
    if "lora_a" not in layer or "lora_b" not in layer:
      raise ValueError(f"adapter layer '{path}' holds {held}: lora_a and lora_b go together")
    if ("lora_magnitude" in layer) != config.use_dora:
      raise ValueError(f"adapter layer '{path}' {'has' if 'lora_magnitude' in layer else 'lacks'}"
                       f" a DoRA magnitude but the config has use_dora={config.use_dora}")
  if not found:
    raise ValueError("adapters hold no adapter leaves (lora_a, lora_b): nothing to add")
  return kept


def _check_plain(base: Any) -> None:
  """Raises `ValueError` unless `base` is nested mappings without adapter leaves."""
  if not isinstance(base, Mapping):
    raise ValueError(f"base must be nested mappings of params, got {type(base).__name__}")
  held = next((p for p, node in _nodes(base) if any(k in node for k in ADAPTER_LEAVES)), None)
  if held is not None:
    raise ValueError(f"the base params hold adapters already (at '{held}'): pass the plain "
                     "model's params, e.g. split(params, config)[1]")


def _overlay(adapters: Mapping, base: Mapping) -> dict:
  """`adapters` on `base`: adapter leaves added, `trainable` params replacing the base's.

  Dicts along the adapters' paths are new; every other node of `base` is kept.
  """
  _check_plain(base)

  def walk(a: Mapping, b: Mapping, prefix: str) -> dict:
    out = dict(b)
    for key, value in a.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      there = out.get(key)
      if isinstance(value, Mapping):
        if there is not None and not isinstance(there, Mapping):
          raise ValueError(f"the adapter holds a module at '{path}', the base a param")
        out[key] = walk(value, there or {}, path)
      elif isinstance(there, Mapping):
        raise ValueError(f"the adapter holds a param at '{path}', the base a module")
      else:
        shapes = [getattr(nn.meta.unbox(v), "shape", None) for v in (value, there)]
        if there is not None and shapes[0] != shapes[1]:
          raise ValueError(f"the adapter's '{path}' has shape {shapes[0]}, the base's {shapes[1]}")
        out[key] = value
    return out

  return walk(adapters, base, "")


class AdapterSet:
  """Named adapters of one base model, in the order they were added.

  Each entry is `(adapters, config)`: only the adapter leaves (`lora_a`,
  `lora_b`, DoRA's `lora_magnitude`) and the config's `trainable` params,
  held as given (arrays are not copied). A `trainable` param replaces the
  base's while its adapter runs, as PEFT's `modules_to_save` do.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> base = {'dense': {'kernel': jnp.ones((3, 2))}}
    >>> adapters = AdapterSet()
    >>> for name, rank in (('small', 1), ('large', 2)):
    ...   leaves = {'lora_a': jnp.ones((3, rank)), 'lora_b': jnp.zeros((rank, 2))}
    ...   adapters.add(name, {'dense': leaves}, lj.LoRAConfig(rank=rank))
    >>> adapters.names
    ('small', 'large')
    >>> jax.tree.map(jnp.shape, adapters.params(base, 'large'))
    {'dense': {'kernel': (3, 2), 'lora_a': (3, 2), 'lora_b': (2, 2)}}
    >>> adapters.params(base, None) is base
    True
  """

  def __init__(self):
    self._entries: dict[str, tuple[dict, LoRAConfig]] = {}

  # --- the collection ----------------------------------------------------------

  def add(self, name: str, adapters: Mapping, config: LoRAConfig, *,
          overwrite: bool = False) -> None:
    """Adds an adapter under `name` (last in order; replacing one keeps its place).

    Args:
      name: a non-empty string without `/`, not `.`, `..` or `__base__`.
      adapters: the adapters, or full params holding them (only the adapter
        leaves and `trainable` params are kept).
      config: the config they were made with.
      overwrite: replace an adapter of that name.

    Raises:
      ValueError: for a bad name, a name taken (without `overwrite`), or
        adapters that hold no adapter leaves or disagree with `config`.
    """
    check_adapter_name(name)
    if name in self._entries and not overwrite:
      raise ValueError(f"an adapter named {name!r} is in the set already (pass overwrite=True "
                       "to replace it)")
    self._entries[name] = (_check_adapters(adapters, config), config)

  def remove(self, name: str) -> None:
    """Removes the adapter `name` (`KeyError` listing the names if there is none)."""
    self[name]  # KeyError, listing the names
    del self._entries[name]

  @property
  def names(self) -> tuple[str, ...]:
    """The names, in the order they were added."""
    return tuple(self._entries)

  def __getitem__(self, name: str) -> tuple[dict, LoRAConfig]:
    """`(adapters, config)` of adapter `name`."""
    if not isinstance(name, str) or name not in self._entries:
      raise KeyError(f"no adapter named {name!r}; the set holds {list(self._entries)}")
    return self._entries[name]

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def __iter__(self) -> Iterator[str]:
    return iter(tuple(self._entries))

  def __repr__(self) -> str:
    return f"AdapterSet({list(self._entries)})"

  # --- running one of them -----------------------------------------------------

  def params(self, base: Mapping, name: str | None) -> Mapping:
    """The params that run adapter `name` on `base`; `None`: `base` itself.

    Args:
      base: the plain model's params (no adapters), left as they are.
      name: an adapter of the set, or `None` for the base model.

    Returns:
      A new tree whose base leaves are `base`'s own objects.
    """
    if name is None:
      _check_plain(base)
      return base
    return _overlay(self[name][0], base)

  def model(self, model: nn.Module, name: str | None) -> nn.Module:
    """The model that runs adapter `name` (`inject(model, config)`); `None`: no adapter.

    With `None` a plain model comes back as it is, and an injected one without
    its adapters (`lora_jax.quantized_model`, which also runs a quantized base).
    """
    if name is None:
      if not isinstance(model, nn.Module):
        raise ValueError(f"expected a flax.linen Module, got {type(model).__name__}")
      return model if getattr(model, "_lora_config", None) is None else quantized_model(model)
    return inject(model, self[name][1])

  def stack(self, model: nn.Module, *sample_args: Any, **options: Any) -> AdapterStack:
    """All the set's adapters stacked for mixed batches (`lora_jax.stack_adapters`,
    whose keyword options `max_rank`, `count`, `use_dora` it takes), in the set's order."""
    return stack_adapters(model, {name: self[name] for name in self}, *sample_args, **options)

  # --- files -------------------------------------------------------------------

  def _target(self, directory, overwrite: bool, what: str) -> Path:
    """The directory to write, refused (before anything is written) unless free."""
    if not self._entries:
      raise ValueError(f"{what}: the set holds no adapters: nothing to write")
    if jax.process_count() > 1:
      raise ValueError(f"{what} writes from one process; with several, write each adapter "
                       "(checkpoint.save_adapter, hf.export_peft)")
    if str(directory).startswith(("gs://", "s3://")):
      raise ValueError(f"{what} writes local directories, not {directory}; save each adapter "
                       "with checkpoint.save_adapter")
    path = Path(directory).resolve()
    if path.exists() and not path.is_dir():
      raise FileExistsError(f"{path} is a file, not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
      held = ""
      if (path / INDEX).is_file():
        held = f" (an adapter set of {json.loads((path / INDEX).read_text()).get('names')})"
      elif (path / _PEFT_FILES[0]).is_file():
        held = " (a PEFT adapter)"
      raise FileExistsError(f"{path} exists and is not empty{held}: refusing to overwrite it "
                            "(pass overwrite=True to replace it)")
    return path

  def save(self, directory, *, overwrite: bool = False) -> Path:
    """Writes each adapter (`checkpoint.save_adapter`) to `directory/<name>`, which
    `load_adapter` also reads alone, and `adapter_set.json` (the names in order).

    Written whole into a temporary sibling, then put in place: with
    `overwrite=True` the directory then holds exactly this set; a failed save
    leaves the old one as it was.

    Raises:
      FileExistsError: for a non-empty `directory` (naming the adapters it
        holds) without `overwrite`, before anything is written.
      ValueError: for an empty set, or an adapter named `adapter_set.json`.
    """
    path = self._target(directory, overwrite, "AdapterSet.save")
    if INDEX in self._entries:
      raise ValueError(f"an adapter named {INDEX!r} would overwrite the set's index; rename it")
    with fresh_directory(path, overwrite) as staging:
      for name, (adapters, config) in self._entries.items():
        save_adapter(staging / name, adapters, config)
      (staging / INDEX).write_text(json.dumps({"names": list(self._entries)}, indent=2) + "\n")
    return path

  @classmethod
  def load(cls, directory, *, target: Mapping | None = None) -> AdapterSet:
    """Reads what `save` wrote.

    Args:
      directory: a saved set.
      target: the base params; each adapter is checked against its kernels
        (see `checkpoint.load_adapter`).

    Raises:
      FileNotFoundError: when `directory` holds no saved set, or lacks one of
        its adapters.
    """
    path = Path(directory)
    if not (path / INDEX).is_file():
      raise FileNotFoundError(f"{path} holds no adapter set ({INDEX} is missing); one adapter "
                              "loads with checkpoint.load_adapter")
    names = json.loads((path / INDEX).read_text()).get("names")
    if not isinstance(names, list) or not names:
      raise ValueError(f"{path / INDEX} lists no adapter names")
    out = cls()
    for name in names:
      out.add(name, *load_adapter(path / name, target=target))
    return out

  def export_peft(self, directory, *, base_model_name_or_path: str | None = None,
                  model_config: LlamaConfig | None = None, overwrite: bool = False) -> Path:
    """Writes the set as PEFT's `save_pretrained` writes several adapters.

    Adapter `'default'` goes to the directory itself, every other one to
    `directory/<name>` (each by `hf.export_peft`, for the reference Llama);
    without a `'default'`, as in PEFT, the root holds only subdirectories.
    PEFT loads them with `PeftModel.from_pretrained(model, directory)` (the
    root, as `'default'`) and `model.load_adapter(f'{directory}/{name}',
    adapter_name=name)`. PEFT's model card (`README.md`) is not written;
    serving warnings (`hf.ServingWarning`) name their adapter. Written whole
    into a temporary sibling, then put in place.

    Raises:
      FileExistsError: for a non-empty `directory` without `overwrite`, before
        anything is written.
      ValueError: for an empty set, an adapter named as a file of the root
        (`adapter_config.json`, `adapter_model.safetensors`), or as
        `hf.export_peft` refuses an adapter.
    """
    path = self._target(directory, overwrite, "AdapterSet.export_peft")
    clash = [n for n in self._entries if n in _PEFT_FILES]
    if clash:
      raise ValueError(f"adapter {clash[0]!r} would be a directory named as the root's PEFT "
                       "file; rename it")
    order = sorted(self._entries, key=lambda n: n != DEFAULT)  # the root first, while empty
    with fresh_directory(path, overwrite) as staging:
      for name in order:
        adapters, config = self._entries[name]
        with warnings.catch_warnings(record=True) as caught:
          warnings.simplefilter("always")
          _export_peft(staging if name == DEFAULT else staging / name, adapters, config,
                       base_model_name_or_path=base_model_name_or_path,
                       model_config=model_config)
        for w in caught:
          message = f"adapter {name!r}: {w.message}" if w.category is ServingWarning else w.message
          warnings.warn(message, w.category, stacklevel=2)
    return path

  @classmethod
  def import_peft(cls, directory) -> AdapterSet:
    """Reads PEFT's multi-adapter layout (what `save_pretrained` writes).

    The adapter at the root of `directory` (its `adapter_config.json`) is
    `'default'`; every subdirectory holding an `adapter_config.json` (hidden
    ones aside) is the adapter of its name. Each is read by `hf.import_peft`.
    Order: `'default'` first, then the others sorted by name (PEFT records no
    order).

    Raises:
      FileNotFoundError: when there is no adapter at the root or in a
        subdirectory.
      ValueError: when the root and a subdirectory `default` both hold one,
        a subdirectory's name cannot name an adapter, or as `hf.import_peft`.
    """
    path = Path(directory)
    if not path.is_dir():
      raise FileNotFoundError(f"{path} is not a directory")
    found = [(DEFAULT, path)] if (path / _PEFT_FILES[0]).is_file() else []
    subdirectories = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                            and (p / _PEFT_FILES[0]).is_file())
    for sub in sorted(subdirectories, key=lambda p: p.name != DEFAULT):
      if sub.name == DEFAULT and found:
        raise ValueError(f"{path} holds an adapter at its root and in {sub}: both would be "
                         f"{DEFAULT!r}")
      found.append((check_adapter_name(sub.name), sub))
    if not found:
      raise FileNotFoundError(f"{path} holds no PEFT adapter: no {_PEFT_FILES[0]} at its root "
                              "or in a subdirectory")
    out = cls()
    for name, where in found:
      out.add(name, *_import_peft(where))
    return out


def switch_merged(merged_params: Mapping, record: Mapping, adapters: Mapping,
                  config: LoRAConfig, *, layouts: Mapping[str, Layout] | None = None
                  ) -> tuple[dict, dict]:
  """Moves merged params from the adapter of `record` to `adapters`.

  `unmerge` takes the old adapter out (the base comes back within float32
  round-off), then `merge_reversibly` folds the new one in: the result equals
  merging the new adapter into the original base, which is never read.

  A `trainable` param of the old adapter replaced the base's in the merge, so
  the base's value is gone: the new adapter must train it too (else
  `ValueError`, before any work; merge from the original base instead).

  Args:
    merged_params: merged params, as `merge_reversibly` returned them.
    record: their record.
    adapters: the new adapter (or full params holding it).
    config: its config.
    layouts: layouts covering the layers of both adapters (`lora_jax.layouts`).

  Returns:
    `(merged_params, record)` for the new adapter.
  """
  new = _check_adapters(adapters, config)
  if not isinstance(record, Mapping):
    raise ValueError(f"record must be what merge_reversibly returned, not {type(record).__name__}")
  trained = lambda tree, skip: {p for p in leaf_paths(tree) if p.rsplit("/", 1)[-1] not in skip}
  old_trained = trained(record, ADAPTER_LEAVES + RECORD_LEAVES)
  new_trained = trained(new, ADAPTER_LEAVES)
  lost = sorted(old_trained - new_trained)
  if lost:
    raise ValueError(f"the merged adapter trained {lost} fully (trainable), replacing the base's "
                     "values, and the new adapter does not: merge it into the original base")
  params = unmerge(merged_params, record, layouts=layouts)

  def drop(tree: Mapping, prefix: str) -> dict:  # the old adapter's leaves out
    out = {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        out[key] = drop(value, path)
      elif key not in ADAPTER_LEAVES and path not in old_trained:
        out[key] = value
    return out

  return merge_reversibly(_overlay(new, drop(params, "")), config, layouts=layouts)
