"""LoRA for any unmodified linen model, by method interception.

`inject(model, config)` returns the same model (same class, same fields, same
param names) whose calls run under `nn.intercept_methods`: every `nn.Dense`,
`nn.DenseGeneral` and `nn.Einsum` (or subclass) whose module path the config
selects gets an adapter beside its `kernel`, through the same `add_adapter`
the LoRA layers use. The model's code is never touched, and it works through
`nn.scan`, `nn.remat`, `nn.vmap`, shared modules and extra call arguments
because interception sees the real calls as flax makes them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import ALL_LINEAR, LoRAConfig, describe_paths, join_path, unmatched_error
from lora_jax.layers import Recorded, _Adapted, add_adapter, base_output, recording_layouts
from lora_jax.layout import (
    Layout, dense_contraction, dense_general_contraction, einsum_contraction)
from lora_jax.mixed import StackSpec, add_stacked_adapters, check_ids, set_ids
from lora_jax.tree import combine, leaf_paths, split

LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
# The calls that compute `x @ kernel`. A subclass's own `__call__` around them (say,
# `super().__call__(x) * 2`) passes through: adapting the inner call keeps the math
# equal to `merge`, which folds the update into the kernel.
_LINEAR_CALLS = tuple(inspect.unwrap(cls.__call__) for cls in LINEAR_TYPES)


@dataclasses.dataclass
class _Survey:
  """What one outermost call of a model saw: module paths and their types.

  Attributes:
    top: the module whose call this is (the model itself).
    linear: layers that compute `x @ kernel` through nn.Dense/DenseGeneral/Einsum's
      own call: the only ones an adapter can be added to.
    custom: subclasses of those whose own `__call__` never reaches the base
      class's: how they use their kernel is unknown, so they are not adapted.
    detached: linear modules called through `.apply` with explicit params (tied
      heads: `lm_head.apply({'params': {'kernel': embedding.T}}, h)`): not
      layers of the model, so never adapted.
    other: every other module.
  """

  top: nn.Module | None = None
  linear: dict[str, str] = dataclasses.field(default_factory=dict)
  custom: dict[str, str] = dataclasses.field(default_factory=dict)
  detached: dict[str, str] = dataclasses.field(default_factory=dict)
  other: dict[str, str] = dataclasses.field(default_factory=dict)


def _call_input(args, kwargs, index: int, name: str):
  return args[index] if len(args) > index else kwargs.get(name)


def _contraction(module: nn.Module, args, kwargs):
  """The input of an intercepted linear call and how the layer contracts it."""
  inputs = _call_input(args, kwargs, 0, "inputs")
  ndim = jnp.ndim(inputs)
  if isinstance(module, nn.Einsum):
    equation = _call_input(args, kwargs, 1, "einsum_str") or module.einsum_str
    return inputs, einsum_contraction(equation, jnp.shape(inputs), module.shape)
  if isinstance(module, nn.DenseGeneral):
    features = module.features
    n_features = len(features) if isinstance(features, (tuple, list)) else 1
    return inputs, dense_general_contraction(ndim, module.axis, module.batch_dims, n_features)
  return inputs, dense_contraction(ndim)


def _interceptor(config: LoRAConfig | StackSpec | None, survey: _Survey):
  """Records every module call; adds adapters to the selected linear layers."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if survey.top is None:
      survey.top = module
    if context.method_name != "__call__" or isinstance(module, _Adapted):
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    if not isinstance(module, LINEAR_TYPES):
      survey.other.setdefault(path, type(module).__name__)
      return next_fun(*args, **kwargs)
    if not module.path and module is not survey.top:  # `.apply` with its own params
      survey.detached.setdefault(module.name or type(module).__name__, type(module).__name__)
      return next_fun(*args, **kwargs)
    if inspect.unwrap(getattr(context.orig_method, "func", context.orig_method)) not in _LINEAR_CALLS:
      base = next(cls for cls in LINEAR_TYPES if isinstance(module, cls))
      survey.custom.setdefault(path, f"{type(module).__name__} (an nn.{base.__name__} whose own "
                               f"__call__ does not call nn.{base.__name__}.__call__)")
      return next_fun(*args, **kwargs)
    survey.linear.setdefault(path, type(module).__name__)
    inputs, contraction = _contraction(module, args, kwargs)
    outputs = base_output(module, contraction, inputs, lambda: next_fun(*args, **kwargs))
    if config is None or not config.selects(path):
      return outputs
    if isinstance(config, StackSpec):
      return add_stacked_adapters(module, config, contraction, inputs, outputs)
    return add_adapter(module, config.adapter_for(path), contraction, inputs, outputs)

  return intercept


def _check_selection(config: LoRAConfig, survey: _Survey, params: list[str]) -> None:
  """Raises `ValueError` when the config selects nothing, names a module it cannot
  adapt, or holds a rule that matches nothing."""
  if not survey.linear:
    raise ValueError("the model calls no nn.Dense, nn.DenseGeneral or nn.Einsum layer: "
                     "there is nothing LoRA can adapt")
  candidates = f"linear layers of this model: {describe_paths(survey.linear)}"
  custom = [p for p in survey.custom if p not in survey.linear]
  names = isinstance(config.targets, tuple)  # a regex may sweep past such a layer
  for path in custom:
    if config.selects(path) and (names or not any(map(config.selects, survey.linear))):
      raise ValueError(
          f"'{path}' is a {survey.custom[path]}: how it uses its kernel is unknown, so it "
          f"cannot get an adapter; exclude it. {candidates}")
  # Excluding what is never adapted anyway (a tied head, a custom layer) is harmless.
  excludable = custom + list(survey.detached)
  unmatched = [rule for rule in config.unmatched_rules(survey.linear, params)
               if not (rule.field == "exclude" and any(map(rule.matches, excludable)))]
  if not unmatched:
    if not any(map(config.selects, survey.linear)):
      what = "'all-linear'" if config.targets == ALL_LINEAR else f"targets={config.targets!r}"
      raise ValueError(f"{what} with exclude={config.exclude!r} selects no layer; {candidates}")
    return
  rule = unmatched[0]
  if rule.field in ("targets", "exclude"):
    detached = [f"'{name}' ({kind})" for name, kind in survey.detached.items()
                if rule.matches(name)]
    if detached:
      raise ValueError(
          f"{rule} names {', '.join(detached[:3])}, which the model calls through .apply "
          "with explicit params (a head tied to the embedding, say): not a layer of the "
          f"model, so it cannot get an adapter; {candidates}")
    others = [f"'{p}' ({kind})" for p, kind in survey.other.items() if rule.matches(p)]
    if others:
      raise ValueError(f"{rule} names {', '.join(others[:3])}, not a linear layer "
                       f"(nn.Dense/DenseGeneral/Einsum); {candidates}")
  raise unmatched_error(rule, list(survey.linear), params, config)


_active = threading.local()  # the survey of the outermost injected call in progress


class _Injected:
  """Mixin for injected model classes: intercepts every call of the model."""

  _lora_config: LoRAConfig | StackSpec | None
  _lora_base: type

  def _call_wrapped_method(self, fun, args, kwargs):
    if getattr(_active, "survey", None) is not None:  # an outer injected call intercepts already
      return super()._call_wrapped_method(fun, args, kwargs)
    config = self._lora_config
    creating = self.scope is not None and self.is_mutable_collection("params")
    kwargs = dict(kwargs)
    ids = _adapter_ids(config, kwargs.pop("adapter_ids", None), creating)
    survey = _Survey()
    _active.survey = survey
    previous = set_ids(ids)
    try:
      with nn.intercept_methods(_interceptor(config, survey)):
        out = super()._call_wrapped_method(fun, args, kwargs)
    finally:
      _active.survey = None
      set_ids(previous)
    if config is not None and creating:
      # Full paths, as rules see them, also for a model injected inside another.
      prefix = "".join(f"{name}/" for name in self.path)
      params = [prefix + p for p in leaf_paths(self.variables.get("params", {}))]
      if isinstance(config, StackSpec):
        _check_stack_layers(config, survey)
      else:
        _check_selection(config, survey, params)
    return out


def _adapter_ids(config: LoRAConfig | StackSpec | None, ids: Any, creating: bool) -> Any:
  """The `adapter_ids` keyword of an injected model's call, checked."""
  if not isinstance(config, StackSpec):
    if ids is not None:
      raise ValueError("adapter_ids is an argument of a model injected with a StackSpec (an "
                       "adapter stack, lora_jax.stack); this model has one adapter per layer")
    return None
  if ids is None:
    if config.count > 1 and not creating:
      raise ValueError(f"the model serves a stack of {config.count} adapters: pass "
                       "adapter_ids=[one id per example] (-1 for the base)")
    return None
  return check_ids(ids, config, None)


def _check_stack_layers(spec: StackSpec, survey: _Survey) -> None:
  missing = [p for p in spec.layers if p not in survey.linear]
  if missing:
    raise ValueError(f"the adapter stack names {', '.join(repr(p) for p in missing[:3])}, not "
                     f"linear layers of this model; linear layers: "
                     f"{describe_paths(survey.linear)}")


@functools.lru_cache(maxsize=None)
def _injected_class(cls: type, config: LoRAConfig) -> type:
  return type(cls.__name__, (_Injected, cls), {
      "__module__": cls.__module__, "__qualname__": cls.__qualname__,
      "_lora_config": config, "_lora_base": cls})


def _copy(model: nn.Module, cls: type) -> nn.Module:
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
  return cls(**fields)


def inject(model: nn.Module, config: LoRAConfig) -> nn.Module:
  """The same model with adapters on the linear layers `config` selects.

  The returned module has `model`'s class name, fields and methods; its
  `init`/`apply` give `model`'s param tree plus `lora_a`, `lora_b` (and
  `lora_magnitude`) beside each selected kernel, and the base model's outputs
  while the adapters are zero. Use it as a submodule by passing it in as a
  field; nested injected models take the outermost config.

  Args:
    model: an unbound linen module, from any code.
    config: which layers get adapters, and how.

  Returns:
    An unbound module of a subclass of `type(model)`.

  Raises:
    ValueError: at `init`, when the config selects no layer or names a module
      that is not linear; the message lists the candidate layers.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoRAConfig
    >>> model = inject(nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)]),
    ...                LoRAConfig(rank=2, targets=['layers_0']))
    >>> jax.tree.map(jnp.shape, model.init(jax.random.key(0), jnp.ones((1, 3)))['params'])
    {'layers_0': {'bias': (4,), 'kernel': (3, 4), 'lora_a': (3, 2), 'lora_b': (2, 4)}, 'layers_2': {'bias': (2,), 'kernel': (4, 2)}}
  """
  if not isinstance(model, nn.Module):
    raise ValueError(f"inject expects a flax.linen Module, got {type(model).__name__}")
  if not isinstance(config, (LoRAConfig, StackSpec)):
    raise ValueError(f"inject expects a LoRAConfig (or a StackSpec), got {type(config).__name__}")
  if model.scope is not None or isinstance(model.parent, nn.Module):
    raise ValueError("inject expects an unbound model built outside any module; inject the "
                     "top-level model and pass it to a parent module as a field")
  base = getattr(type(model), "_lora_base", type(model))
  return _copy(model, _injected_class(base, config))


def quantized_model(model: nn.Module) -> nn.Module:
  """The same model without adapters, able to run on a quantized base: the linear
  kernels of its params may be `QuantizedKernel`s (`lora_jax.quantize_params`), which
  each layer dequantizes in its compute dtype as it runs (an injected model does this
  already).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import quantize_params
    >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = mlp.init(jax.random.key(0), jnp.ones((1, 64)))['params']
    >>> quantized = quantize_params(params, 'int8')
    >>> quantized_model(mlp).apply({'params': quantized}, jnp.ones((1, 64))).shape
    (1, 2)
  """
  if not isinstance(model, nn.Module):
    raise ValueError(f"quantized_model expects a flax.linen Module, got {type(model).__name__}")
  base = getattr(type(model), "_lora_base", type(model))
  return _copy(model, _injected_class(base, None))


def _plain(model: nn.Module) -> nn.Module:
  """`model` without injection."""
  base = getattr(type(model), "_lora_base", None)
  return model if base is None else _copy(model, base)


def targets(model: nn.Module, config: LoRAConfig | None = None, *sample_args, **sample_kwargs
            ) -> list[str]:
  """The module paths of the linear layers `config` selects, in call order.

  Traces `model.init` abstractly (no memory is used). Without a config, lists
  every linear layer that could be selected.

  Raises:
    ValueError: when the config selects nothing (listing the candidates).

  Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> targets(mlp, None, jnp.ones((1, 3)))
    ['layers_0', 'layers_2']
    >>> from lora_jax import LoRAConfig
    >>> targets(mlp, LoRAConfig(exclude=['layers_0']), jnp.ones((1, 3)))
    ['layers_2']
  """
  survey = _Survey()
  plain = _plain(model)

  with nn.intercept_methods(_interceptor(None, survey)):
    variables = jax.eval_shape(lambda: plain.init(jax.random.key(0), *sample_args, **sample_kwargs))
  if config is None:
    return list(survey.linear)
  _check_selection(config, survey, leaf_paths(nn.unbox(variables.get("params", {}))))
  return [p for p in survey.linear if config.selects(p)]


def layouts(model: nn.Module, *sample_args, **sample_kwargs) -> dict[str, Layout]:
  """Every adapter's `Layout`, by layer path, recorded by tracing `model.init`.

  The record is exact whatever the shapes: each adapter param is boxed with
  the layout its layer gives it, and flax tells the box where every lifted
  transform (`nn.scan`, `nn.vmap`) inserts an axis. Pass it as `layouts=` to
  `merge`, `sharding.param_shardings` or `checkpoint.load_adapter` where the
  shapes alone could be read two ways. Traced abstractly: no memory is used.

  Args:
    model: an injected model (or one built from LoRA layers).
    *sample_args: arguments for one call of the model (shapes are what count).
    **sample_kwargs: keyword arguments for that call.

  Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from lora_jax import LoRAConfig
    >>> mlp = inject(nn.Sequential([nn.Dense(4), nn.Dense(2)]), LoRAConfig(rank=2))
    >>> print(layouts(mlp, jnp.ones((1, 3)))['layers_1'])
    kernel bc: A bd, B dc, magnitude c (rank d)
  """
  with recording_layouts():
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *sample_args,
                                                  **sample_kwargs))
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      variables.get("params", {}), is_leaf=lambda x: isinstance(x, Recorded)):
    if isinstance(leaf, Recorded):
      found[join_path(path).rsplit("/", 1)[0] if len(path) > 1 else ""] = leaf.layout
  if not found:
    raise ValueError("the model created no adapters: inject(model, config) first, or use "
                     "LoRA layers")
  return found


def init_adapters(model: nn.Module, base_params: Mapping, rng: jax.Array, *sample_args,
                  **sample_kwargs) -> dict:
  """Fresh adapters on top of existing base params.

  The base leaves are returned exactly as given (never re-initialised); DoRA
  magnitudes start from the given kernels. Abstract base params
  (`jax.ShapeDtypeStruct`) give abstract adapters without using memory, and
  the function works under `jax.eval_shape`.

  Models with other variable collections (BatchNorm's `batch_stats`, caches)
  take either their params alone or the whole variables dict, `{'params':
  ..., 'batch_stats': ...}`, and return the same form. The other collections
  are only read by the sample call and returned untouched (one the call
  would update, such as batch statistics in training mode, keeps its given
  value; one that is missing is made up for the call and dropped).

  Args:
    model: an injected model (or one built from LoRA layers).
    base_params: the plain model's `params` collection, or all of its
      variables (a dict with a `'params'` key; so a model whose top-level
      module is named `params` must pass its variables).
    rng: key for the adapter initialisers.
    *sample_args: arguments for one call of the model (shapes are what count).
    **sample_kwargs: keyword arguments for that call.

  Returns:
    The full param tree: `base_params` plus the adapter leaves; given
    variables, the variables with their `'params'` so extended.

  Raises:
    ValueError: when the model creates no adapter, or needs params that
      `base_params` lacks.
  """
  rngs = dict(sample_kwargs.pop("rngs", None) or {})
  is_variables = isinstance(base_params, Mapping) and "params" in base_params
  others = {k: v for k, v in base_params.items() if k != "params"} if is_variables else {}
  base = base_params["params"] if is_variables else base_params

  def make(key, base, others):
    _, state = model.apply({"params": base, **others}, *sample_args,
                           rngs={**rngs, "params": key}, mutable=True, **sample_kwargs)
    return split(state["params"])

  # Shapes first (no memory); then only the adapters are computed, never a copy of the base.
  adapters, rest = jax.eval_shape(make, rng, base, others)
  leaves = jax.tree.leaves((base, others))
  if adapters and not any(isinstance(l, jax.ShapeDtypeStruct) for l in leaves):
    adapters = jax.jit(lambda key, base, others: make(key, base, others)[0])(rng, base, others)
  if not adapters:
    raise ValueError("the model created no adapters: inject(model, config) first, or use "
                     "LoRA layers")
  missing = sorted(set(leaf_paths(rest)) - set(leaf_paths(nn.unbox(base))))
  if missing:
    raise ValueError(f"base_params lack {len(missing)} param(s) the model needs, e.g. "
                     f"{', '.join(missing[:3])}")
  params = combine(adapters, base)
  return {**base_params, "params": params} if is_variables else params
