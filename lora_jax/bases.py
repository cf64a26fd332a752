"""Where a run's base model comes from, and how models of its kind are written.

`model.base` names one of:

    builtin:tiny-kjv          the shipped model (a lora_jax model directory)
    DIR (with model.json)     a lora_jax model directory: `model.json` (the
                              architecture) and Orbax `params/`, as
                              `lora-jax pretrain` or `merge` write them
    hf:DIR, or DIR (with      a Hugging Face checkpoint: `config.json`,
      config.json)            safetensors and its tokenizer files, read
                              straight onto the mesh shard by shard
    preset:NAME               a randomly initialised preset (planning, tests)

A `Base` knows its architecture without reading weights, its tokenizer (the
checkpoint's own for Hugging Face checkpoints, bytes otherwise), how to load
its params, and how to write a model of the same kind (merged or fully
trained): a lora_jax model directory, or a complete Hugging Face checkpoint
with the tokenizer files copied beside the safetensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lora_jax import data, models, sharding
from lora_jax.quantized_base import quantize_params

ASSETS = resources.files("lora_jax") / "assets"
RUN_OPTIONS = ("scan_layers", "remat", "dtype", "param_dtype")
# What a Hugging Face checkpoint keeps beside its weights: copied into merged outputs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Base:
  """A resolved `model.base`.

  Attributes:
    spec: what the user wrote.
    kind: 'model' (a lora_jax model directory), 'hf' (a Hugging Face
      checkpoint) or 'preset'.
    path: the directory (None for presets).
    config: the architecture (a `LlamaConfig` or `GemmaConfig`) with the run
      options (scan, remat, dtypes).
    tokenizer_dir: where a Hugging Face tokenizer is read from (None: bytes).
    quantize: 'none', or the format its linear kernels load in ('nf4', ...).
    quantize_block: the quantization block (None: the format's default).
  """

  spec: str
  kind: str
  path: Path | None
  config: Any
  tokenizer_dir: Path | None
  quantize: str = "none"
  quantize_block: int | None = None

  @property
  def name_or_path(self) -> str:
    """The checkpoint's own name (`_name_or_path` in `config.json`), else its path."""
    if self.kind == "hf":
      from lora_jax.hf.checkpoints import read_config
      recorded = read_config(self.path).get("_name_or_path")
      if recorded:
        return str(recorded)
    return str(self.path) if self.path is not None else self.spec

  @property
  def stored_dtype(self) -> str | None:
    """The dtype a Hugging Face checkpoint stores its weights in (`torch_dtype`)."""
    if self.kind != "hf":
      return None
    from lora_jax.hf.checkpoints import read_config
    hf = read_config(self.path)
    return hf.get("torch_dtype") or hf.get("dtype")

  def tokenizer(self) -> Any:
    """The tokenizer, checked against the model's vocabulary."""
    if self.tokenizer_dir is None:
      tok, name = data.ByteTokenizer(), "the byte tokenizer"
    else:
      from lora_jax.hf.tokenizer import load_tokenizer
      tok, name = load_tokenizer(self.tokenizer_dir), f"the tokenizer in {self.tokenizer_dir}"
    if self.config.vocab_size < tok.vocab_size:  # larger ids would embed as NaN
      raise ValueError(
          f"model.base={self.spec}: its vocabulary ({self.config.vocab_size}) is smaller than "
          f"the {tok.vocab_size} ids of {name}; use the model's own tokenizer"
          + (" or a byte-level model (preset:tiny-byte, or a model lora-jax made)"
             if self.tokenizer_dir is None else ""))
    return tok

  def model(self) -> nn.Module:
    """The plain model (no weights)."""
    return models.model_for(self.config)

  def load(self, mesh: jax.sharding.Mesh | None = None) -> tuple[nn.Module, Any]:
    """The plain model and its params, placed on `mesh` (sharded by logical axes) if given,
    its linear kernels quantized as `quantize` asks (a Hugging Face checkpoint's as they
    are read; other bases' once loaded)."""
    if self.kind == "hf":
      from lora_jax.hf.checkpoints import load_llama
      options = {k: getattr(self.config, k) for k in RUN_OPTIONS}
      return load_llama(self.path, mesh=mesh, quantize=self.quantize,
                        quantize_block=self.quantize_block, **options)
    model, params = self._load_float(mesh)
    if self.quantize == "none":
      return model, params
    shardings = None if mesh is None else jax.tree.map(lambda x: x.sharding, params)
    return model, quantize_params(params, self.quantize, block=self.quantize_block,
                                  shardings=shardings)

  def abstract_params(self, model: nn.Module, *args: Any) -> Any:
    """`model.init`'s boxed abstract params for `args`, its base kernels quantized as
    `load` quantizes them (for planning and for `make_train_step`)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    if self.quantize == "none":
      return boxed
    return jax.eval_shape(functools.partial(quantize_params, format=self.quantize,
                                            block=self.quantize_block), boxed)

  def _load_float(self, mesh: jax.sharding.Mesh | None) -> tuple[nn.Module, Any]:
    model = self.model()
    sample = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), sample)["params"]
    shardings = None if mesh is None else sharding.param_shardings(boxed, mesh)
    if self.kind == "preset":
      params = nn.unbox(jax.jit(model.init)(jax.random.key(0), sample)["params"])
      return model, params if shardings is None else jax.device_put(params, shardings)
    saved = json.loads((self.path / "model.json").read_text()).get("scan_layers", False)
    if saved != self.config.scan_layers:
      raise ValueError(f"{self.path} was saved with scan_layers={saved}; set "
                       f"model.scan_layers={str(saved).lower()}")
    abstract = nn.unbox(boxed)
    target = abstract if shardings is None else jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    return model, ocp.StandardCheckpointer().restore(self.path / "params", target)

  def save(self, directory, params: Any, *, dtype: Any = None, overwrite: bool = False) -> Path:
    """Writes plain params as a model of this base's kind (a lora_jax directory for presets).

    Hugging Face bases give a complete Hugging Face checkpoint: safetensors
    in `dtype` (default: the checkpoint's own), `config.json` and the
    tokenizer files.
    """
    if self.kind != "hf":
      if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
      return save_model(directory, self.config, params, overwrite=overwrite)
    from lora_jax.hf.checkpoints import save_llama
    path = save_llama(directory, params, self.config, dtype=dtype or self.stored_dtype,
                      overwrite=overwrite)
    if jax.process_index() == 0:
      for name in TOKENIZER_FILES:
        source = self.tokenizer_dir / name
        if name == "generation_config.json" and (self.path / name).is_file():
          source = self.path / name  # the checkpoint's own, even with another's tokenizer
        if source.is_file():
          shutil.copy2(source, path / name)
    return path


def resolve(section: Any) -> Base:
  """The `Base` a `ModelSection` names.

  Raises:
    FileNotFoundError: for a directory that is neither kind of model, or an
      unknown built-in.
    ValueError: for an architecture lora_jax cannot load (naming it).
  """
  options = {k: getattr(section, k) for k in RUN_OPTIONS}
  quantized = {"quantize": section.quantize, "quantize_block": section.quantize_block}
  spec = section.base
  tokenizer = Path(section.tokenizer).expanduser().resolve() if section.tokenizer else None
  if spec.startswith("preset:"):
    return Base(spec, "preset", None, models.config_for(spec.split(":", 1)[1], **options),
                tokenizer, **quantized)
  if spec.startswith("builtin:"):
    path = Path(str(ASSETS / spec.split(":", 1)[1]))
    if not (path / "model.json").is_file():
      raise FileNotFoundError(f"no built-in model '{spec}' (there is builtin:tiny-kjv)")
  else:
    path = Path(spec.removeprefix("hf:")).expanduser().resolve()
  if spec.startswith("hf:") or not (path / "model.json").is_file():
    if not (path / "config.json").is_file():
      what = "a Hugging Face checkpoint" if spec.startswith("hf:") else "a model directory"
      raise FileNotFoundError(f"{path} is not {what} (no config.json"
                              + ("" if spec.startswith("hf:") else " or model.json") + ")")
    from lora_jax.hf.checkpoints import model_config, read_config
    config = model_config(read_config(path), **options)
    return Base(spec, "hf", path, config, tokenizer or path, **quantized)
  described = json.loads((path / "model.json").read_text())
  found = [a for a in models.CLASSES if a in described]
  if len(found) != 1:
    raise ValueError(f"{path / 'model.json'} names no one architecture of "
                     f"{', '.join(models.CLASSES)}")
  config_class = models.CLASSES[found[0]][0]
  return Base(spec, "model", path, config_class(**{**described[found[0]], **options}),
              tokenizer, **quantized)


def save_model(directory, config: Any, params, *, overwrite: bool = False) -> Path:
  """Writes a lora_jax model directory: `model.json` and the params (layers unstacked or not)."""
  path = Path(directory).resolve()
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty: refusing to overwrite it")
  path.mkdir(parents=True, exist_ok=True)
  arch = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_OPTIONS}
  (path / "model.json").write_text(json.dumps(
      {models.architecture_of(config): arch, "scan_layers": config.scan_layers,
       "tokenizer": "byte"}, indent=2))
  checkpointer = ocp.StandardCheckpointer()
  if (path / "params").exists():
    shutil.rmtree(path / "params")
  checkpointer.save(path / "params", nn.unbox(params))
  checkpointer.wait_until_finished()
  return path
