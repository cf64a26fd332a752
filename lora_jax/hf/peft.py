"""PEFT's adapter format: `adapter_config.json` + `adapter_model.safetensors`.

What `peft.PeftModel.from_pretrained(LlamaForCausalLM, directory)` reads:
tensors `base_model.model.<module>.lora_A.weight` (r, in), `.lora_B.weight`
(out, r) and, for DoRA, `.lora_magnitude_vector` (out,); whole modules of
`modules_to_save` as `base_model.model.<module>.weight`.

Rules (targets, rank and alpha patterns) are regexes over `/`-joined flax
paths here and over `.`-joined module names in PEFT. Each direction keeps
the rules a user wrote when they select the same layers with the same
values under the other side's matching, checked layer by layer; otherwise
it writes one exact rule per layer, so the meaning never changes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax.config import ADAPTER_LEAVES, ALL_LINEAR, LoRAConfig, PathRule
from lora_jax.hf.checkpoints import (check_free, fresh_directory, hf_module, hf_param,
                                     host_array, jax_module, jax_param, to_hf)
from lora_jax.models.llama import LlamaConfig, unstack_layers
from lora_jax.tree import leaf_paths, split

PREFIX = "base_model.model."
_ADAPTER_TENSOR = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight"
                             r"|lora_magnitude_vector)")
_TO_LEAF = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b",
            "lora_magnitude_vector": "lora_magnitude"}
# vLLM's allowed `max_lora_rank` values.
SERVABLE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT settings with no lora_jax counterpart, and their harmless values.
# init_lora_weights values that leave the base weights as they are (the others,
# e.g. "pissa", "olora", "corda", "loftq", rewrite W when the adapter loads).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_UNSUPPORTED = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "target_parameters": None, "layer_replication": None,
                "trainable_token_indices": None, "alora_invocation_tokens": None,
                "use_qalora": False}
_PLAIN_NAME = re.compile(r"\w+(?:\\?\.\w+)*")


class ServingWarning(UserWarning):
  """An exported adapter uses a setting that vLLM cannot serve as it is."""


# --- PEFT's matching, as peft.tuners.tuners_utils does it --------------------

def _peft_targets(targets: str | list[str], name: str) -> bool:
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  return any(name == t or name.endswith(f".{t}") for t in targets)


def _peft_pick(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
  """peft's `get_pattern_key`: the first key matching a trailing run of `name`."""
  return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _as_path(name: str) -> str | None:
  """A PEFT rule that is a plain dotted name, as a flax path rule (else None)."""
  if not _PLAIN_NAME.fullmatch(name):
    return None
  name = name.replace("\\.", ".").removeprefix("model.")
  return re.sub(r"(?<![^.])layers\.(\d+)(?=\.|$)", r"layers_\1", name).replace(".", "/")


def _number(x: float) -> float | int:
  return int(x) if float(x).is_integer() else x


# --- export ----------------------------------------------------------------

def _adapter_layers(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
  if "lora_a" in tree or "lora_b" in tree:
    yield prefix, tree
    return
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _adapter_layers(value, f"{prefix}/{key}" if prefix else str(key))


def _module_leaves(tree: Mapping, module: str) -> dict[str, Any]:
  node = tree
  for key in module.split("/"):
    node = node.get(key, {}) if isinstance(node, Mapping) else {}
  return {f"{module}/{k}": v for k, v in node.items() if not isinstance(v, Mapping)}


def export_peft(directory, params: Mapping, config: LoRAConfig, *,
                base_model_name_or_path: str | None = None,
                model_config: LlamaConfig | None = None, overwrite: bool = False) -> Path:
  """Writes the adapters of the reference Llama as a PEFT LoRA adapter.

  `peft.PeftModel.from_pretrained(model, directory)` on transformers'
  `LlamaForCausalLM` loads it with no missing or unexpected keys and gives
  this model's logits. `trainable` params become `modules_to_save` (whole
  modules, so pass the full params when a rule selects only some of a
  module's params). `target_modules` is the list of adapted layer names
  when PEFT's suffix matching provably selects exactly the adapted layers
  (knowing the layer count from `model_config`, the full params, or the
  config's rules), else a regex of their full names.

  Warns (`ServingWarning`), naming each, about what vLLM cannot serve as it
  is: DoRA, `modules_to_save`, trained biases, rank/alpha patterns (vLLM
  uses `r`/`lora_alpha` everywhere) and ranks outside vLLM's
  `max_lora_rank` values.

  Args:
    directory: a new or empty directory.
    params: the model's params with adapters (layers stacked or not), or the
      adapters alone.
    config: the `LoRAConfig` the adapters were trained with.
    base_model_name_or_path: recorded in `adapter_config.json`.
    model_config: the base model's architecture, if at hand.
    overwrite: replace a non-empty `directory`.

  Raises:
    ValueError: when a layer is not one of the reference Llama's, an adapter
      is not a plain (in, r), (r, out) pair or disagrees with `config`, or a
      trained embedding is tied to the output head (PEFT would keep the head
      tied to the original: export a merged model instead).
  """
  directory = Path(directory).resolve()
  check_free(directory, overwrite)  # before any work or warning
  full = nn.unbox(dict(params))
  adapters, _ = split(full, config)  # rules apply to the paths the config was made for
  if not adapters:
    raise ValueError("params hold no adapters or trainable params: nothing to export")
  stacked = "layers" in full
  if stacked:
    full, adapters = unstack_layers(full), unstack_layers(adapters)

  def rule_path(path: str) -> str:
    return re.sub(r"^layers_\d+/", "layers/", path) if stacked else path

  tensors, ranks, alphas = {}, {}, {}
  for path, layer in _adapter_layers(adapters):
    name = hf_module(path)
    a, b = (host_array(layer[k]) for k in ("lora_a", "lora_b"))
    if a.ndim != 2 or b.ndim != 2:
      raise ValueError(f"adapter '{path}' has shapes {a.shape} and {b.shape}: PEFT stores only "
                       "Linear adapters, (in, r) and (r, out)")
    if a.shape[1] != config.rank_for(rule_path(path)) or (
        "lora_magnitude" in layer) != config.use_dora:
      raise ValueError(f"adapter '{path}' (rank {a.shape[1]}, DoRA "
                       f"{'lora_magnitude' in layer}) does not match the config: pass the "
                       "config it was trained with")
    tensors[f"{PREFIX}{name}.lora_A.weight"] = a.T
    tensors[f"{PREFIX}{name}.lora_B.weight"] = b.T
    if "lora_magnitude" in layer:
      tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = host_array(layer["lora_magnitude"])
    ranks[name], alphas[name] = a.shape[1], config.alpha_for(rule_path(path))

  trained = [p for p in leaf_paths(adapters) if p.rsplit("/", 1)[-1] not in ADAPTER_LEAVES]
  extras = sorted({p.rsplit("/", 1)[0] for p in trained})
  has_base = any(p.endswith("/kernel") for p in leaf_paths(full))
  tied = model_config.tie_word_embeddings if model_config else has_base and "lm_head" not in full
  for module in extras:
    if hf_module(module) in ranks:
      raise ValueError(f"'{module}' has an adapter and `trainable` params; PEFT cannot save "
                       "both (its modules_to_save never get adapters)")
    if module == "embed_tokens" and tied:
      raise ValueError("embed_tokens trains but lm_head is tied to it: PEFT would keep lm_head "
                       "tied to the original embedding; use export_merged_safetensors")
    for path, x in _module_leaves(full, module).items():
      tensors[PREFIX + hf_param(path)] = to_hf(path, host_array(x))
  saved = [hf_module(m) for m in extras]

  names = sorted({n.rsplit(".", 1)[-1] for n in ranks})
  layers = _layer_count(full, config, model_config, has_base, rule_path)
  exact = layers is not None and all(_peft_targets(names, n) == (n in ranks)
                                     for n in _llama_linear(layers) - set(saved))
  rank_pattern = _export_pattern(config.rank_pattern, ranks, config.rank)
  alpha_pattern = _export_pattern(config.alpha_pattern, alphas, config.alpha)
  peft_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank,
      "lora_alpha": _number(config.alpha),
      "target_modules": names if exact else "|".join(re.escape(n) for n in sorted(ranks)),
      "exclude_modules": None, "lora_dropout": config.dropout_rate,
      "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": "none",
      "modules_to_save": saved or None, "rank_pattern": rank_pattern,
      "alpha_pattern": {k: _number(v) for k, v in alpha_pattern.items()},
      "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path,
      "fan_in_fan_out": False, "inference_mode": True, "layers_to_transform": None,
      "layers_pattern": None, "revision": None,
  }
  _warn_unservable(config, saved, trained, ranks, rank_pattern, alpha_pattern)

  with fresh_directory(directory, overwrite) as staging:
    if staging is not None:  # the first process writes
      save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
      (staging / "adapter_config.json").write_text(json.dumps(peft_config, indent=2,
                                                              sort_keys=True))
  return directory


_LINEAR = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def _layer_count(full: Mapping, config: LoRAConfig, model_config: LlamaConfig | None,
                 has_base: bool, rule_path) -> int | None:
  """How many decoder layers the model has, when that is certain."""
  if model_config is not None:
    return model_config.num_layers
  seen = 1 + max((int(k[7:]) for k in full if re.fullmatch(r"layers_\d+", k)), default=-1)
  if has_base:
    return seen
  # Adapters alone: one layer more would have adapters under the config's rules,
  # and it has none, so it does not exist.
  if any(config.selects(rule_path(f"layers_{seen}/{m}")) for m in _LINEAR):
    return seen
  return None


def _llama_linear(layers: int) -> set[str]:
  """HF names of every linear layer of a Llama with `layers` decoder layers."""
  return {hf_module(f"layers_{i}/{m}") for i in range(layers) for m in _LINEAR} | {"lm_head"}


def _export_pattern(given: tuple[tuple[str, Any], ...], values: Mapping[str, Any],
                    default: Any) -> dict[str, Any]:
  """`given` if PEFT resolves it to `values` on every layer, else one exact key per layer.

  PEFT takes the first matching key of a pattern it sorted by key (its own
  saved configs are sorted too), so the check runs in that order.
  """
  pattern = dict(sorted(given))
  if all(_peft_pick(pattern, name, default) == v for name, v in values.items()):
    return pattern
  return {re.escape(name): v for name, v in sorted(values.items()) if v != default}


def _warn_unservable(config, saved, trained, ranks, rank_pattern, alpha_pattern) -> None:
  problems = []
  if config.use_dora:
    problems.append("use_dora=True: vLLM serves no DoRA adapters (export_merged_safetensors "
                    "folds them into the weights instead)")
  if saved:
    problems.append(f"modules_to_save {saved} (from `trainable`): vLLM rejects them")
  biases = [p for p in trained if p.endswith("/bias")]
  if biases:
    problems.append(f"trained biases {biases}: vLLM serves only bias='none'")
  if rank_pattern or alpha_pattern:
    problems.append(f"rank_pattern {rank_pattern} / alpha_pattern {alpha_pattern}: vLLM "
                    f"ignores them and would use r={config.rank}, "
                    f"lora_alpha={_number(config.alpha)} for every layer")
  odd = sorted({r for r in ranks.values() if r not in SERVABLE_RANKS})
  if odd and max(odd) > SERVABLE_RANKS[-1]:
    problems.append(f"rank(s) {odd}: above vLLM's largest max_lora_rank, {SERVABLE_RANKS[-1]}")
  elif odd:
    up = next(r for r in SERVABLE_RANKS if r >= max(odd))
    problems.append(f"rank(s) {odd}: not among vLLM's max_lora_rank values {SERVABLE_RANKS}; "
                    f"it needs --max-lora-rank {up} or more")
  for problem in problems:
    warnings.warn(f"for vLLM: {problem}", ServingWarning, stacklevel=3)


# --- import ----------------------------------------------------------------

def _in_saved(name: str, saved: list[str]) -> bool:
  """Whether tensor `name` is in a module (or under one) that PEFT's modules_to_save names."""
  parts = name.split(".")[:-1]
  return any(".".join(parts[:i]).endswith(m) for i in range(1, len(parts) + 1) for m in saved)


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in sorted(flat.items()):
    *parents, leaf = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def _path_pattern(peft_pattern: Mapping[str, Any], values: Mapping[str, Any], default: Any
                  ) -> tuple[tuple[str, Any], ...]:
  """PEFT's pattern as flax path rules when its keys are plain names, else exact paths."""
  translated = tuple((_as_path(k), v) for k, v in peft_pattern.items())
  if all(k for k, _ in translated):
    # PEFT ignores keys of layers it did not adapt; lora_jax refuses them, so drop them.
    return tuple((k, v) for k, v in translated
                 if any(map(PathRule.suffix("pattern", k).matches, values)))
  return _exact(values, default)


def _exact(values: Mapping[str, Any], default: Any) -> tuple[tuple[str, Any], ...]:
  return tuple((p, v) for p, v in sorted(values.items()) if v != default)


def _import_targets(peft: Mapping[str, Any], layers: list[str], saved: tuple[str, ...]
                    ) -> dict[str, Any]:
  """`targets`/`exclude` selecting `layers`: PEFT's names when they do, else exact paths."""
  target_modules, exclude = peft.get("target_modules"), peft.get("exclude_modules") or []
  names = None
  if target_modules == "all-linear":
    names = ALL_LINEAR
  elif isinstance(target_modules, list) and all(map(_as_path, target_modules)):
    names = tuple(map(_as_path, target_modules))
  excluded = tuple(map(_as_path, exclude)) if isinstance(exclude, list) else (None,)
  every_layer = peft.get("layers_to_transform") in (None, [])
  if names and all(excluded) and every_layer:
    candidate = LoRAConfig(targets=names, exclude=excluded)
    # PEFT never adapts a module it saves whole; lora_jax rules must not either.
    if all(map(candidate.selects, layers)) and not any(map(candidate.selects, saved)):
      return {"targets": names, "exclude": excluded}
  return {"targets": tuple(layers), "exclude": ()}


def import_peft(directory) -> tuple[dict, LoRAConfig]:
  """Reads a PEFT LoRA (or DoRA) adapter of a Llama into lora_jax's layout.

  Args:
    directory: holds `adapter_config.json` and `adapter_model.safetensors`.

  Returns:
    `(adapters, config)`: adapters for the unstacked reference Llama
    (`layers_{i}/...`; `stack_layers` them for a scanned model), with
    `modules_to_save` weights as `trainable` params, and the `LoRAConfig`
    that selects exactly the adapted layers with PEFT's ranks and alphas.
    `lora_jax.combine(adapters, base)` gives params for
    `inject(Llama(...), config)`, where `base` is `split(params, config)[1]`
    when there are `trainable` params.

  Raises:
    FileNotFoundError: when a file is missing.
    ValueError: naming a PEFT setting or a tensor that lora_jax does not
      implement, or tensors that disagree with the config.
  """
  directory = Path(directory)
  config_file, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory} has no adapter_config.json: not a PEFT adapter")
  if not weights.is_file():
    raise FileNotFoundError(f"{directory} has no adapter_model.safetensors (pickled .bin "
                            "adapters are not read; re-save with safe_serialization=True)")
  peft = json.loads(config_file.read_text())
  if peft.get("peft_type") != "LORA":
    raise ValueError(f"{config_file} has peft_type {peft.get('peft_type')!r}; only LORA imports")
  odd = {k: peft[k] for k, harmless in _UNSUPPORTED.items()
         if peft.get(k) not in (harmless, None, [], {})}
  if odd:
    raise ValueError(f"{config_file} sets {odd}, which lora_jax does not implement")
  if peft.get("init_lora_weights", True) not in _PLAIN_INITS:
    raise ValueError(f"{config_file} has init_lora_weights={peft['init_lora_weights']!r}, which "
                     "rewrites the base weights when PEFT loads it; save it converted to plain "
                     "LoRA (PEFT's path_initial_model_for_weight_conversion) and import that")

  saved = list(peft.get("modules_to_save") or [])
  flat: dict[str, Any] = {}
  with safe_open(weights, "numpy") as f:
    for key in f.keys():
      match = _ADAPTER_TENSOR.fullmatch(key)
      try:
        if match:
          module, kind = match.groups()
          x = f.get_tensor(key)
          flat[f"{jax_module(module)}/{_TO_LEAF[kind]}"] = x if x.ndim == 1 else x.T
        elif key.startswith(PREFIX) and _in_saved(key[len(PREFIX):], saved):
          path = jax_param(key[len(PREFIX):])
          flat[path] = to_hf(path, f.get_tensor(key))
        else:
          raise ValueError("neither an adapter nor part of modules_to_save")
      except ValueError as e:
        raise ValueError(f"{weights}: tensor '{key}': {e}") from None

  layers = sorted({p.rsplit("/", 1)[0] for p in flat if p.rsplit("/", 1)[1] in ADAPTER_LEAVES})
  ranks, alphas, dtypes = {}, {}, set()
  for path in layers:
    a, b = flat.get(f"{path}/lora_a"), flat.get(f"{path}/lora_b")
    if a is None or b is None or a.shape[1] != b.shape[0]:
      raise ValueError(f"{weights}: layer '{path}' lacks lora_A or lora_B, or their ranks differ")
    if (f"{path}/lora_magnitude" in flat) != bool(peft.get("use_dora")):
      raise ValueError(f"{weights}: layer '{path}' and use_dora={peft.get('use_dora')} "
                       "disagree about a DoRA magnitude")
    ranks[path] = a.shape[1]
    alphas[path] = float(_peft_pick(peft.get("alpha_pattern") or {}, hf_module(path),
                                    peft.get("lora_alpha", 8)))
    dtypes.add(a.dtype.name)
  if not layers:
    raise ValueError(f"{weights} holds no LoRA adapters")
  if len(dtypes) > 1:
    raise ValueError(f"{weights} mixes adapter dtypes {sorted(dtypes)}")

  trainable = tuple(sorted({p.rsplit("/", 1)[0] for p in flat} - set(layers)))
  rank, alpha = peft.get("r", 8), float(peft.get("lora_alpha", 8))  # PEFT's defaults
  config = LoRAConfig(
      rank=rank, alpha=alpha, dropout_rate=peft.get("lora_dropout", 0.0),
      use_rslora=bool(peft.get("use_rslora")), use_dora=bool(peft.get("use_dora")),
      rank_pattern=_path_pattern(peft.get("rank_pattern") or {}, ranks, rank),
      alpha_pattern=_path_pattern(peft.get("alpha_pattern") or {}, alphas, alpha),
      trainable=trainable, lora_dtype=dtypes.pop(),
      **_import_targets(peft, layers, trainable))
  # Translated patterns must give every layer PEFT's value; exact paths always do.
  if any(config.rank_for(p) != r for p, r in ranks.items()):
    config = dataclasses.replace(config, rank_pattern=_exact(ranks, rank))
  if any(config.alpha_for(p) != a for p, a in alphas.items()):
    config = dataclasses.replace(config, alpha_pattern=_exact(alphas, alpha))
  return _nest({p: jnp.asarray(x) for p, x in flat.items()}), config
