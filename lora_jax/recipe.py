"""Run configs: what `lora-jax train` reads from YAML, validated.

A run config has six sections, each a frozen dataclass: `model` (which base,
and how to run it), `lora` (a `LoRAConfig`), `data`, `train`, `mesh` and
`export` (what a run writes besides its adapter), plus `output_dir`, and for
a run that trains several adapters at once `adapters` (name -> changes to the
`lora` section). YAML gives the values; `key.sub=value` overrides on the command
line replace single fields. Every unknown key is an error that names it and
suggests the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lora_jax.config import LoRAConfig, check_adapter_name

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_float_dtype(value: Any, key: str) -> None:
  """Raises `ValueError` naming `key` unless `value` names a floating dtype."""
  if value not in FLOAT_DTYPES:
    raise ValueError(f"{key}={value!r}: must be one of {', '.join(FLOAT_DTYPES)}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """The base model.

  Attributes:
    base: `hf:DIR` (or a plain DIR holding `config.json`) for a Hugging Face
      checkpoint, `builtin:tiny-kjv` (the shipped model), a lora_jax model
      directory (`model.json` and Orbax `params/`), or `preset:NAME` for a
      randomly initialised preset (planning, tests). See `lora_jax.bases`.
    tokenizer: a directory with Hugging Face tokenizer files to use instead
      of the base's own ('': the checkpoint's tokenizer; bytes for lora_jax
      model directories and presets).
    scan_layers: stack the layers with `nn.scan` (fast compiles, big models).
    remat: 'none', 'full', 'dots' or 'dots_with_no_batch_dims'.
    dtype: compute dtype, e.g. 'bfloat16' on TPU.
    param_dtype: storage dtype of the base params.
    quantize: store the frozen base's linear kernels (all but the output
      head) in 'nf4' (QLoRA's NormalFloat4, double-quantized), 'int4' or
      'int8', quantized as they are read and dequantized layer by layer in
      `dtype` inside the step (see `lora_jax.quantize`); 'none' keeps them in
      `param_dtype`.
    quantize_block: weights per quantization block along a kernel's input
      axis for nf4 and int4 (default 64; int4 also 128).
  """

  base: str = "builtin:tiny-kjv"
  tokenizer: str = ""
  scan_layers: bool = False
  remat: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  quantize: str = "none"
  quantize_block: int | None = None

  def __post_init__(self):
    check_float_dtype(self.dtype, "model.dtype")
    check_float_dtype(self.param_dtype, "model.param_dtype")
    check_quantize(self.quantize, self.quantize_block, "model.")


def check_quantize(fmt: Any, block: Any, prefix: str = "") -> None:
  """Raises `ValueError` naming the key for an unknown format or a block it cannot take."""
  from lora_jax.quantize import FORMATS
  if fmt not in ("none", *FORMATS):
    raise ValueError(f"{prefix}quantize={fmt!r}: must be one of none, {', '.join(FORMATS)}")
  if block is None:
    return
  if fmt in ("none", "int8"):
    raise ValueError(f"{prefix}quantize_block={block!r}: {fmt} has no blocks (int8 is per "
                     "output channel); set it only for nf4 or int4")
  if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2:
    raise ValueError(f"{prefix}quantize_block={block!r}: must be an even number of weights, "
                     "e.g. 64")


@dataclasses.dataclass(frozen=True)
class DataSection:
  """Training text.

  Attributes:
    train: files (.txt, .jsonl, .parquet), directories of them or saved with
      `datasets`' `save_to_disk`, or `builtin:devil` / `builtin:kjv` for the
      shipped corpora. JSONL/Parquet rows hold `text`, `prompt` and
      `completion`, Alpaca's `instruction`/`input`/`output`, or chat
      `messages` or ShareGPT `conversations` (rendered with the tokenizer's
      chat template); the loss
      counts only completions and assistant replies (see `lora_jax.formats`).
    eval: held-out data in the same forms; empty: `eval_fraction` of train.
    eval_fraction: share of the training rows held out when `eval` is empty.
    seq_len: tokens per row.
    packing: pack examples into full rows (else one example per row, padded).
    documents: how plain text splits into examples: 'file', 'paragraphs',
      'lines'.
    adapter_key: with `adapters` (several adapters in one run), the field of
      every JSONL/Parquet row that names the adapter it trains; None: 'adapter'.
  """

  train: tuple[str, ...] = ("builtin:devil",)
  eval: tuple[str, ...] = ()
  eval_fraction: float = 0.05
  seq_len: int = 128
  packing: bool = True
  documents: str = "paragraphs"
  adapter_key: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainSection:
  """The optimisation.

  Attributes:
    steps: optimizer steps.
    batch_size: global batch (rows), split over the data and fsdp mesh axes.
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up, then cosine decay to `final_lr_fraction`.
    final_lr_fraction: where the cosine ends, as a share of the peak.
    weight_decay: AdamW's decoupled weight decay.
    lora_plus_ratio: LoRA+: the B-group's learning rate over A's (see
      `lora_jax.optimizer`), or None.
    accum_steps: gradient accumulation micro-batches.
    eval_every: steps between evaluations (0: only before and after).
    eval_batches: batches per evaluation.
    save_every: steps between checkpoints.
    keep: checkpoints kept.
    seed: data order and adapter initialisation.
  """

  steps: int = 300
  batch_size: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  lora_plus_ratio: float | None = None
  accum_steps: int = 1
  eval_every: int = 100
  eval_batches: int = 4
  save_every: int = 100
  keep: int = 2
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class MeshSection:
  """Mesh axis sizes; one may be -1 for the devices left over."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class ExportSection:
  """What a LoRA run writes at the end besides `adapter/` (lora_jax's own checkpoint).

  Attributes:
    peft: write `peft/`, a PEFT adapter (`adapter_config.json` +
      `adapter_model.safetensors`) that `PeftModel.from_pretrained` and vLLM
      load. None: for Hugging Face bases.
    merged: write `merged/`, the adapter folded into the base: a complete
      Hugging Face checkpoint (with the tokenizer files) for Hugging Face
      bases, else a lora_jax model directory. None: only for lora_jax model
      directories and presets (a merged Hugging Face model is a full copy).
    merged_dtype: e.g. 'bfloat16'; None: the checkpoint's `torch_dtype`
      (each param's own dtype for lora_jax bases).
    base_model_name_or_path: recorded in the PEFT adapter; None: the
      checkpoint's `_name_or_path`, else its directory.
  """

  peft: bool | None = None
  merged: bool | None = None
  merged_dtype: str | None = None
  base_model_name_or_path: str | None = None

  def __post_init__(self):
    if self.merged_dtype is not None:
      check_float_dtype(self.merged_dtype, "export.merged_dtype")


SECTIONS = {"model": ModelSection, "lora": LoRAConfig, "data": DataSection,
            "train": TrainSection, "mesh": MeshSection, "export": ExportSection}


# Names an adapter of a run cannot take: files of the directories its adapters are written to.
RESERVED_NAMES = ("adapter_set.json", "adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run; `from_dict` validates every key.

  Attributes:
    adapters: several adapters trained at once, each on the rows that name it
      (`data.adapter_key`): `(name, LoRAConfig)` pairs in slot order, each the
      `lora` section with that adapter's changes. Empty: one adapter, the
      `lora` section's. In YAML a mapping `name: {lora key: value, ...}` (or
      a list of names, each taking the `lora` section as it is).
  """

  model: ModelSection = ModelSection()
  lora: LoRAConfig = LoRAConfig(rank=8, alpha=16.0)
  data: DataSection = DataSection()
  train: TrainSection = TrainSection()
  mesh: MeshSection = MeshSection()
  export: ExportSection = ExportSection()
  output_dir: str = "runs/default"
  adapters: tuple[tuple[str, LoRAConfig], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "adapters", tuple((n, c) for n, c in self.adapters))
    names = [name for name, _ in self.adapters]
    for name, config in self.adapters:
      check_adapter_name(name, "adapters: ")
      if name in RESERVED_NAMES:
        raise ValueError(f"adapters: {name!r} names a file of the adapter directories a run "
                         "writes; choose another name")
      if not isinstance(config, LoRAConfig):
        raise ValueError(f"adapters.{name}: expected a LoRAConfig, got {type(config).__name__}")
      if config.init == "loftq":
        raise ValueError(f"adapters.{name}: init=loftq fits one adapter to the quantized base's "
                         "error; several adapters share one base, so they start with "
                         "init=default")
      if config.trainable:
        raise ValueError(f"adapters.{name}: trainable={list(config.trainable)} trains base "
                         "params fully, but several adapters share one base: they train "
                         "adapters only (set trainable: [])")
    if len(set(names)) != len(names):
      raise ValueError(f"adapters: {sorted({n for n in names if names.count(n) > 1})} given "
                       "twice")
    rates = {config.dropout_rate for _, config in self.adapters}
    if len(rates) > 1:
      raise ValueError(f"adapters: dropout_rate differs ({sorted(rates)}); the adapters train in "
                       "one stack, which applies one dropout rate: give them the same")
    if self.data.adapter_key is not None and not self.adapters:
      raise ValueError(f"data.adapter_key={self.data.adapter_key!r} names the field that says "
                       "which adapter a row trains, for a run with several adapters: give them "
                       "in 'adapters' (or leave data.adapter_key unset)")

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
    if not isinstance(data, Mapping):
      raise ValueError(f"a run config must be a mapping, got {type(data).__name__}")
    _check_keys(data, [f.name for f in dataclasses.fields(cls)], "")
    values = {}
    for name, section in SECTIONS.items():
      given = data.get(name) or {}
      if not isinstance(given, Mapping):
        raise ValueError(f"config section '{name}' must be a mapping, got {given!r}")
      values[name] = _build(section, given, name)
    if "output_dir" in data:
      values["output_dir"] = str(data["output_dir"])
    values["adapters"] = _adapters(data.get("adapters"), values["lora"])
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    out = {name: (getattr(self, name).to_dict() if name == "lora"
                  else _plain(dataclasses.asdict(getattr(self, name)))) for name in SECTIONS}
    out["output_dir"] = self.output_dir
    if self.adapters:  # each adapter as its changes to the lora section
      lora = self.lora.to_dict()
      out["adapters"] = {name: {k: v for k, v in config.to_dict().items() if v != lora[k]}
                         for name, config in self.adapters}
    return out

  def to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _adapters(given: Any, lora: LoRAConfig) -> tuple[tuple[str, LoRAConfig], ...]:
  """The `adapters` key of a config: a list of names, or name -> changes to `lora`."""
  if given is None:
    return ()
  if isinstance(given, (list, tuple)):
    names = [check_adapter_name(name, "adapters: ") for name in given]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"adapters: {repeated} listed twice")
    given = {name: None for name in names}
  if not isinstance(given, Mapping):
    raise ValueError("adapters must map each adapter's name to its changes to the lora section "
                     f"(or list the names), got {given!r}")
  out = []
  for name, changes in given.items():
    check_adapter_name(name, "adapters: ")
    changes = changes or {}
    if not isinstance(changes, Mapping):
      raise ValueError(f"adapters.{name} must be a mapping of lora keys (e.g. {{rank: 4}}) or "
                       f"empty, got {changes!r}")
    try:
      out.append((name, LoRAConfig.from_dict({**lora.to_dict(), **changes})))
    except ValueError as e:
      raise ValueError(f"adapters.{name}: {e}") from None
  return tuple(out)


def _plain(d: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_keys(data: Mapping, known: Sequence[str], prefix: str) -> None:
  for key in data:
    if key not in known:
      close = difflib.get_close_matches(str(key), list(known), n=1)
      hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(known)}"
      raise ValueError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, data: Mapping[str, Any], section: str) -> Any:
  if cls is LoRAConfig:
    _check_keys(data, [f.name for f in dataclasses.fields(LoRAConfig)], "lora.")
    return LoRAConfig(**{"rank": 8, "alpha": 16.0, **data})
  fields = {f.name: f for f in dataclasses.fields(cls)}
  _check_keys(data, list(fields), f"{section}.")
  values = {}
  for name, value in data.items():
    default = fields[name].default
    if default is None:  # an optional field: None, or a value of its type
      kind = str(fields[name].type).split(" |")[0]
      default = {"bool": False, "int": 0, "float": 0.0, "str": ""}[kind]
      if value is None:
        values[name] = value
        continue
    if isinstance(default, tuple):
      value = (value,) if isinstance(value, str) else tuple(value or ())
    elif isinstance(default, bool):
      if not isinstance(value, bool):
        raise ValueError(f"config {section}.{name}={value!r}: must be true or false")
    elif isinstance(default, int) and not isinstance(default, bool):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config {section}.{name}={value!r}: must be an integer")
    elif isinstance(default, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config {section}.{name}={value!r}: must be a number")
      value = float(value)
    elif isinstance(default, str) and not isinstance(value, str):
      raise ValueError(f"config {section}.{name}={value!r}: must be a string")
    values[name] = value
  return cls(**values)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """`section.key=value` strings applied to a config dict; values parse as YAML."""
  data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override '{item}' is not key=value (e.g. train.steps=100)")
    value = yaml.safe_load(raw) if raw else ""
    parts = key.split(".")
    if len(parts) == 1:
      data[key] = value
    elif len(parts) == 2:
      section = data.setdefault(parts[0], {})
      if not isinstance(section, dict):
        raise ValueError(f"override '{item}': '{parts[0]}' is not a section")
      section[parts[1]] = value
    else:
      raise ValueError(f"override '{item}': keys have the form section.key")
  return data


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
  """Reads a YAML run config (or the defaults) and applies overrides."""
  data: dict[str, Any] = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"config file {path} does not exist")
    try:
      data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      raise ValueError(f"{path} is not valid YAML: {e}") from None
  return RunConfig.from_dict(apply_overrides(data, overrides))
