"""transformers checkpoints in and out, and the names both sides use, for every
family: the Llama architecture's (Llama, Mistral, Qwen 2 / 2.5, Qwen 3; their
configs in `lora_jax.hf.llama`) and Gemma 2 / 3 (`lora_jax.hf.gemma`).

The reference models (`lora_jax.models`) name their modules as transformers'
`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`, `Gemma2ForCausalLM` and `Gemma3ForCausalLM` do, so names
translate one to one:

    layers_3/self_attn/q_proj (kernel)   <->  model.layers.3.self_attn.q_proj.weight
    embed_tokens (embedding)             <->  model.embed_tokens.weight
    layers_3/input_layernorm (scale)     <->  model.layers.3.input_layernorm.weight
    lm_head (kernel)                     <->  lm_head.weight

Linear weights are stored (out, in) by torch and (in, out) by flax: kernels
are transposes, and so are PEFT's `lora_A.weight` (r, in) and `lora_B.weight`
(out, r) of flax's `lora_a` (in, r) and `lora_b` (r, out). Both models apply
rotary embeddings in the rotate-half convention, so q/k weights of HF
checkpoints (already permuted for it when converted from Meta's) need no
re-permutation.

* `load_llama`: `config.json` + `model.safetensors` (or a sharded index) into
  the family's model (`Llama` or `Gemma`, by `model_type`), each tensor read
  straight into its shards when a mesh is given.
* `save_llama` / `export_merged_safetensors`: a checkpoint transformers loads.

Only safetensors are read: pickled `pytorch_model.bin` files would need torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax import sharding
from lora_jax.config import LoRAConfig
from lora_jax.hf.gemma import gemma_config, gemma_hf_config
from lora_jax.hf.llama import ARCHITECTURES, llama_config, llama_hf_config
from lora_jax.models import model_for
from lora_jax.models.gemma import MODEL_TYPES as GEMMA_TYPES
from lora_jax.models.gemma import GemmaConfig
from lora_jax.models.llama import LlamaConfig, unstack_layers
from lora_jax.quantize import quantize as quantize_kernel
from lora_jax.quantize import quantized_sharding, stack
from lora_jax.quantized_base import selector
from lora_jax.tree import merge

_LAYER = re.compile(r"(?<![^/])layers_(\d+)(?=/|$)")
_HF_LAYER = re.compile(r"(?<![^.])layers\.(\d+)(?=\.|$)")
# Where a flax param's HF name differs: every other leaf is called `weight`.
_HF_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_MODULE = re.compile(
    r"embed_tokens|norm|lm_head|layers_\d+/(input_layernorm|post_attention_layernorm"
    r"|pre_feedforward_layernorm|post_feedforward_layernorm"
    r"|self_attn/[qkvo]_proj|self_attn/[qk]_norm|mlp/(gate|up|down)_proj)")
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


# --- names -----------------------------------------------------------------

def hf_module(path: str) -> str:
  """transformers' name of a Llama module: `layers_0/mlp/up_proj` -> `model.layers.0.mlp.up_proj`.

  Raises:
    ValueError: when `path` is no module of the reference Llama.
  """
  if not _MODULE.fullmatch(path):
    raise ValueError(f"'{path}' is not a module of the reference Llama, so it has no name "
                     "in transformers' LlamaForCausalLM")
  if path == "lm_head":
    return path
  return "model." + _LAYER.sub(r"layers.\1", path).replace("/", ".")


def jax_module(name: str) -> str:
  """The inverse of `hf_module`: `model.layers.0.mlp.up_proj` -> `layers_0/mlp/up_proj`."""
  path = _HF_LAYER.sub(r"layers_\1", name.removeprefix("model.")).replace(".", "/")
  if not _MODULE.fullmatch(path) or hf_module(path) != name:
    raise ValueError(f"'{name}' is not a module of transformers' LlamaForCausalLM")
  return path


def hf_param(path: str) -> str:
  """HF tensor name of a Llama param path (`layers_0/mlp/up_proj/kernel` -> `...up_proj.weight`)."""
  module, leaf = path.rsplit("/", 1)
  if leaf not in _HF_PARAM:
    raise ValueError(f"'{path}' is not a param of the reference Llama")
  return f"{hf_module(module)}.{_HF_PARAM[leaf]}"


def jax_param(name: str) -> str:
  """The inverse of `hf_param`."""
  module, leaf = name.rsplit(".", 1)
  path = jax_module(module)
  if leaf == "bias":
    return f"{path}/bias"
  kind = path.rsplit("/", 1)[-1]
  return f"{path}/{'embedding' if kind == 'embed_tokens' else 'scale' if kind.endswith('norm') else 'kernel'}"


def to_hf(path: str, x: np.ndarray) -> np.ndarray:
  """A flax leaf in torch's layout (kernels transposed)."""
  return x.T if path.endswith("/kernel") else x


# --- config.json ---------------------------------------------------------------

def read_config(directory) -> dict[str, Any]:
  """The parsed `config.json` of a checkpoint directory.

  Raises:
    FileNotFoundError: when there is none.
    ValueError: naming the file, when it is not a JSON object.
  """
  path = Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{Path(directory)} has no config.json: not a transformers checkpoint")
  try:
    hf = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not an object")
  return hf


def model_config(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig | GemmaConfig:
  """The model config of a checkpoint of any supported family, by its `model_type`:
  `llama_config` or `gemma_config` (for a multimodal Gemma 3, `model_type` 'gemma3',
  its language model's: `text_config`)."""
  kind = hf.get("model_type", "llama")
  if kind == "gemma3" and isinstance(hf.get("text_config"), Mapping):
    # Gemma 3 with its vision encoder: its language model, a gemma3_text model.
    return gemma_config({**hf["text_config"], "model_type": "gemma3_text"}, **overrides)
  if kind in GEMMA_TYPES:
    return gemma_config(hf, **overrides)
  if kind not in ARCHITECTURES:
    raise ValueError(f"config.json has model_type {kind!r} "
                     f"({', '.join(hf.get('architectures') or []) or 'no architectures'}); "
                     f"lora_jax loads {', '.join((*ARCHITECTURES, *GEMMA_TYPES))}")
  return llama_config(hf, **overrides)


def hf_config(config: LlamaConfig | GemmaConfig, dtype: Any) -> dict[str, Any]:
  """transformers' `config.json` for a model config of any family, weights stored in `dtype`."""
  if isinstance(config, GemmaConfig):
    return gemma_hf_config(config, dtype)
  return llama_hf_config(config, dtype)


# --- reading ---------------------------------------------------------------

# A multimodal checkpoint's language model (Gemma 3 with its vision encoder) under the
# names a text model has; its other towers are not read.
_LANGUAGE_MODEL = (("language_model.model.", "model."), ("model.language_model.", "model."),
                   ("language_model.lm_head.", "lm_head."))
_OTHER_TOWERS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                 "model.multi_modal_projector.")


class _Tensors:
  """The tensors of `model.safetensors` or of the shards its index names, read lazily,
  by their names in a text model (`files`: name -> file)."""

  def __init__(self, directory: Path, language_model: bool = False):
    index, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = {name: directory / file for name, file in weight_map.items()}
    elif single.is_file():
      with safe_open(single, "numpy") as f:
        files = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(
          f"{directory} holds neither model.safetensors nor model.safetensors.index.json "
          "(pickled .bin checkpoints are not read; re-save with safe_serialization=True)")
    self._stored = {name: name for name in files}
    if language_model:
      self._stored = {}
      for name in files:
        if name.startswith(_OTHER_TOWERS):
          continue
        text = next((new + name[len(old):] for old, new in _LANGUAGE_MODEL
                     if name.startswith(old)), name)
        self._stored[text] = name
    self.files = {text: files[stored] for text, stored in self._stored.items()}
    self._open: dict[Path, Any] = {}
    self._last: tuple[Any, np.ndarray] | None = None

  def _slice(self, name: str) -> Any:
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safe_open(file, "numpy")
    return self._open[file].get_slice(self._stored[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
    """`index` of the tensor, or of its transpose: only those bytes are read."""
    key = (name, transpose, tuple((s.start, s.stop, s.step) for s in index))
    if self._last is None or self._last[0] != key:  # devices holding the same slice ask in turn
      part = self._slice(name)[tuple(reversed(index)) if transpose else index]
      self._last = key, part.T if transpose else part
    return self._last[1]


def _reader(tensors: _Tensors, path: str, shape: tuple[int, ...], stacked: bool
            ) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """Reads `index` of the flax param `path` (layer-stacked: one tensor a layer)."""
  transpose = path.endswith("/kernel")
  if not stacked:
    return lambda index: tensors.read(hf_param(path), index, transpose)
  per_layer = [hf_param(path.replace("layers/", f"layers_{i}/", 1)) for i in range(shape[0])]
  return lambda index: np.stack([tensors.read(per_layer[i], index[1:], transpose)
                                 for i in range(shape[0])[index[0]]])


def _abstract_params(config: Any) -> Any:
  """The boxed abstract params of the config's model (shapes and logical axis names only)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(model_for(config).init, jax.random.key(0), ids)["params"]


def _expected(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> HF shape, for every param of `Llama(config)`."""
  plain = nn.unbox(_abstract_params(dataclasses.replace(config, scan_layers=False)))
  out = {}
  for kp, leaf in jax.tree_util.tree_leaves_with_path(plain):
    path = "/".join(k.key for k in kp)
    out[hf_param(path)] = leaf.shape[::-1] if path.endswith("/kernel") else leaf.shape
  return out


def _check_tensors(where: str, shapes: Mapping[str, tuple[int, ...]], config: LlamaConfig,
                   ignored: set[str] = frozenset()) -> None:
  """Raises `ValueError` naming missing, unexpected or misshapen tensors."""
  expected = _expected(config)
  missing = sorted(expected.keys() - shapes.keys())
  unexpected = sorted(shapes.keys() - expected.keys() - ignored)
  if missing or unexpected:
    raise ValueError(f"{where} does not match the config: missing tensors {missing[:5]}, "
                     f"unexpected tensors {unexpected[:5]}")
  for name, shape in expected.items():
    if tuple(shapes[name]) != shape:
      raise ValueError(f"tensor '{name}' has shape {tuple(shapes[name])}; the config implies "
                       f"{shape}")


def load_llama(directory, *, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
               rules: Any = None, quantize: str | None = None, quantize_block: int | None = None,
               **overrides: Any) -> tuple[nn.Module, dict]:
  """Reads a transformers checkpoint of any supported family into its reference model
  (`Llama` for Llama, Mistral and Qwen; `Gemma` for Gemma 2 and 3).

  Args:
    directory: holds `config.json` and `model.safetensors` or
      `model.safetensors.index.json` with its shards.
    dtype: params and compute dtype (e.g. `jnp.bfloat16`); pass `param_dtype`
      too to store the params in another dtype than the compute's.
    mesh: place each param straight onto its `NamedSharding` (from the
      model's logical axes and `rules`): every host reads only the slices of
      each tensor its devices hold, and no device ever holds a whole tensor
      that is sharded.
    rules: logical axis rules (default `lora_jax.sharding.DEFAULT_RULES`).
    quantize: 'nf4' (double-quantized), 'int4' or 'int8': a QLoRA base. Each
      linear kernel but the output head is quantized as it is read, one
      layer's tensor at a time on the devices that hold it (see
      `lora_jax.quantized_base.quantize_params`), so the full-precision model never
      exists whole in device memory. None or 'none': float params.
    quantize_block: weights per block along the input axis (default 64).
    **overrides: other `LlamaConfig` fields, e.g. `scan_layers=True`,
      `remat='full'`.

  Returns:
    `(model, params)`: the plain `Llama` and its unboxed params.

  Raises:
    FileNotFoundError: when a file is missing.
    ValueError: naming a setting the model lacks, a missing or unexpected
      tensor, or a tensor whose shape disagrees with `config.json`.
  """
  directory = Path(directory)
  hf = read_config(directory)
  config = model_config(hf, **{"dtype": dtype, "param_dtype": dtype, **overrides})
  model = model_for(config)
  boxed = _abstract_params(config)
  abstract = nn.unbox(boxed)
  tensors = _Tensors(directory, language_model="text_config" in hf)
  ignored = {n for n in tensors.files if n.endswith("rotary_emb.inv_freq")}
  if config.tie_word_embeddings:
    ignored.add("lm_head.weight")  # some tied checkpoints store the copy
  _check_tensors(str(directory), {n: tensors.shape(n) for n in tensors.files}, config, ignored)

  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)
  target = np.dtype(jnp.dtype(config.param_dtype))

  quantized = lambda path: False
  if quantize not in (None, "none"):
    quantized = selector(["/".join(k.key for k in kp)
                          for kp, _ in jax.tree_util.tree_leaves_with_path(abstract)])

  def dense(read, shape, where):
    if where is None:
      return jnp.asarray(read(tuple(slice(None) for _ in shape)).astype(target))
    return jax.make_array_from_callback(shape, where, lambda i: read(i).astype(target))

  def load(kp, leaf, where=None):
    path = "/".join(k.key for k in kp)
    stacked = config.scan_layers and path.startswith("layers/")
    if not quantized(path):
      return dense(_reader(tensors, path, leaf.shape, stacked), leaf.shape, where)
    if not stacked:
      return quantize_kernel(dense(_reader(tensors, path, leaf.shape, False), leaf.shape, where),
                             quantize, block=quantize_block, name=path, sharding=where)
    # A stack of layers: one layer's float tensor on the devices at a time.
    layer_where = where and jax.sharding.NamedSharding(
        where.mesh, jax.sharding.PartitionSpec(*tuple(where.spec)[1:]))
    parts = [quantize_kernel(dense(_reader(tensors, path.replace("layers/", f"layers_{i}/", 1),
                                           leaf.shape[1:], False), leaf.shape[1:], layer_where),
                             quantize, block=quantize_block, name=f"{path}[{i}]",
                             sharding=layer_where)
             for i in range(leaf.shape[0])]
    whole = jax.eval_shape(lambda w: quantize_kernel(w, quantize, block=quantize_block), leaf)
    return stack(parts, where and quantized_sharding(whole, where, path))

  if shardings is None:
    return model, jax.tree_util.tree_map_with_path(load, abstract)
  return model, jax.tree_util.tree_map_with_path(load, abstract, shardings)


# --- writing ---------------------------------------------------------------

def check_free(directory: Path, overwrite: bool) -> None:
  """Refuses a file or a non-empty directory (unless `overwrite`), as the writer sees it.

  The first process writes, so its view decides, and every process raises
  together: no process is left waiting for one that refused.
  """
  problem = None
  if jax.process_index() == 0:
    if directory.exists() and not directory.is_dir():
      problem = f"{directory} is a file, not a directory"
    elif directory.exists() and any(directory.iterdir()) and not overwrite:
      problem = (f"{directory} exists and is not empty: refusing to overwrite it "
                 "(pass overwrite=True to replace it)")
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
    if refused and problem is None:
      problem = f"{directory}: the first process refused to write there"
  if problem:
    raise FileExistsError(problem)


@contextlib.contextmanager
def fresh_directory(directory: Path, overwrite: bool) -> Iterator[Path | None]:
  """A temporary sibling to write into; it becomes `directory` only once complete.

  A non-empty `directory` is refused unless `overwrite`; even then the old one
  is moved aside and deleted only after the new one is in place, so a failed
  export loses nothing. With several processes only the first writes (the
  others get None) and every process waits until it is done.
  """
  check_free(directory, overwrite)
  if jax.process_index() != 0:
    yield None
  else:
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
      yield staging
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    staging.chmod(0o755)
    old = None
    if directory.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
      directory.rename(old / "replaced")
    staging.rename(directory)
    if old is not None:
      shutil.rmtree(old)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"lora_jax wrote {directory}")


def host_array(x: Any) -> np.ndarray:
  """A (possibly sharded, multi-host) array whole on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _write_shards(directory: Path, tensors: dict[str, np.ndarray], prefix: str,
                  max_shard_bytes: int) -> None:
  """One `{prefix}.safetensors`, or numbered shards and their index as transformers does."""
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name], size = tensors[name], size + nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], str(directory / f"{prefix}.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    file = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(directory / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, file))
  total = sum(t.nbytes for t in tensors.values())
  (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def save_llama(directory, params: Mapping, model_config: LlamaConfig, *, dtype: Any = None,
               overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
  """Writes plain Llama params as a transformers checkpoint.

  Args:
    directory: a new or empty directory.
    params: the plain model's params (layers stacked or not; sharded or not).
    model_config: the architecture, written as `config.json`.
    dtype: the stored dtype (default: the params').
    overwrite: replace a non-empty `directory`.
    max_shard_bytes: split into shards with an index above this size.

  Returns:
    The directory. With several processes every one must call this; the
    first writes.

  Raises:
    ValueError: naming params that `model_config` lacks or expects.
  """
  directory = Path(directory).resolve()
  params = nn.unbox(dict(params))
  if "layers" in params:
    params = unstack_layers(params)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if dtype is None:
    dtype = leaves[0][1].dtype
  store = np.dtype(jnp.dtype(dtype))
  tensors = {}
  for kp, x in leaves:
    path = "/".join(str(k.key) for k in kp)
    tensors[hf_param(path)] = np.ascontiguousarray(to_hf(path, host_array(x)).astype(store))
  _check_tensors("params", {n: t.shape for n, t in tensors.items()}, model_config)
  with fresh_directory(directory, overwrite) as staging:
    if staging is not None:
      _write_shards(staging, tensors, "model", max_shard_bytes)
      (staging / "config.json").write_text(
          json.dumps(hf_config(model_config, store), indent=2, sort_keys=True))
  return directory


def export_merged_safetensors(directory, params: Mapping, config: LoRAConfig, dtype: Any = None,
                              *, model_config: LlamaConfig, overwrite: bool = False,
                              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
  """Folds the adapters into the base and writes a plain transformers checkpoint.

  `LlamaForCausalLM.from_pretrained(directory)` then gives the LoRA model's
  logits with no PEFT involved. The merge is `lora_jax.merge` (float32, cast
  once to `dtype`, default each kernel's own dtype) and runs where `params`
  live.

  Args:
    directory: a new or empty directory.
    params: the params with adapters (from `lora_jax.combine`, boxed or not).
    config: the `LoRAConfig` the adapters were trained with.
    dtype: the stored dtype, e.g. `jnp.bfloat16`.
    model_config: the base model's architecture (`model.config` of `load_llama`).
    overwrite: replace a non-empty `directory`.
    max_shard_bytes: shard size, as for `save_llama`.
  """
  merged = merge(nn.unbox(dict(params)), config, dtype=dtype)  # layer by layer
  return save_llama(directory, merged, model_config, dtype=dtype, overwrite=overwrite,
                    max_shard_bytes=max_shard_bytes)
