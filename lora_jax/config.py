"""`LoRAConfig`: which layers get adapters, with which rank and scale.

Paths are the `/`-joined names of flax modules or params, e.g.
`layers_0/self_attn/q_proj` or `layers_0/self_attn/q_proj/kernel`. Every rule
of a config (`targets`, `exclude`, the keys of `rank_pattern` and
`alpha_pattern`, `trainable`) is a `PathRule`: a regular expression that must
match a whole path. Rules are written in one of three forms, each turned into
that one regex:

* a string given as `targets` or `exclude` is itself the regex (like PEFT's
  `target_modules` given as a string): `'.*/(q_proj|v_proj)'`;
* an entry of a list given as `targets` or `exclude` is a literal name that
  matches a trailing run of path components (like PEFT's list form):
  `'q_proj'` and `'self_attn/q_proj'` match `layers_0/self_attn/q_proj`, but
  not `layers_0/self_attn/my_q_proj`;
* a key of `rank_pattern`/`alpha_pattern` and an entry of `trainable` is a
  regex that matches a trailing run of path components (PEFT's patterns):
  `'layers_1/.*'`, `'v_proj'`.

For patterns the first matching entry wins; a key may appear only once. A
rule that matches nothing in the model is an error (`unmatched_rules`), whatever
its kind: it is almost always a typo that would silently train something else.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import yaml

ALL_LINEAR = "all-linear"
A_INITS = ("kaiming_uniform", "gaussian")
INITS = ("default", "loftq")
BASE_NAME = "__base__"  # PEFT's name for the base model, no adapter
# Output heads that 'all-linear' leaves alone (PEFT does the same).
HEAD_NAMES = ("lm_head", "head", "classifier", "score")
ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude")


def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f"LoRA {field}={value!r}: {why}")


def _check_rank(rank: Any, field: str = "rank") -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    _fail(field, rank, "must be an integer >= 1")
  return int(rank)


def _check_alpha(alpha: Any, field: str = "alpha") -> float:
  if (
      isinstance(alpha, bool)
      or not isinstance(alpha, (int, float, np.number))
      or not math.isfinite(alpha)
      or alpha <= 0
  ):
    _fail(field, alpha, "must be a finite number > 0")
  return float(alpha)


def _check_dtype(dtype: Any, field: str = "lora_dtype") -> str:
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in ("float32", "bfloat16", "float16", "float64"):
    _fail(field, dtype, "must be a floating dtype such as 'float32' or 'bfloat16'")
  return name


def _compile(pattern: Any, field: str) -> str:
  if not isinstance(pattern, str) or not pattern:
    _fail(field, pattern, "must be a non-empty string")
  try:
    re.compile(pattern)
  except re.error as e:
    _fail(field, pattern, f"is not a valid regular expression ({e})")
  return pattern


@dataclasses.dataclass(frozen=True)
class PathRule:
  """One rule of a config, as written and as the regex every path is matched with.

  Attributes:
    field: the config field it comes from (`'targets'`, `'exclude'`,
      `'rank_pattern'`, `'alpha_pattern'` or `'trainable'`).
    text: the rule as the user wrote it.
    regex: a regular expression that must match a whole path.
  """

  field: str
  text: str
  regex: str

  @classmethod
  def whole(cls, field: str, text: str) -> PathRule:
    """A regex over the whole path."""
    return cls(field, text, text)

  @classmethod
  def name(cls, field: str, text: str) -> PathRule:
    """A literal name: the trailing components of the path."""
    return cls(field, text, f"(?:.*/)?{re.escape(text)}")

  @classmethod
  def suffix(cls, field: str, text: str) -> PathRule:
    """A regex over a trailing run of the path's components."""
    return cls(field, text, f"(?:.*/)?(?:{text})")

  def matches(self, path: str) -> bool:
    """Whether the rule matches `path` (the one matching function of lora_jax)."""
    return re.fullmatch(self.regex, path) is not None

  def __str__(self) -> str:
    kind = {"targets": "target", "rank_pattern": "rank_pattern key",
            "alpha_pattern": "alpha_pattern key"}.get(self.field, f"{self.field} rule")
    return f"{kind} {self.text!r}"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """The adapter settings of one layer, validated.

  Attributes:
    rank: r, the inner dimension of A (fan_in, r) and B (r, fan_out).
    alpha: the scale numerator: the update is (alpha / r) * x @ A @ B.
    use_rslora: scale by alpha / sqrt(r) instead (rank-stabilised LoRA).
    dropout_rate: dropout on the adapter's input only.
    a_init: 'kaiming_uniform' (PEFT's default) or 'gaussian' (std 1/r).
    use_dora: learn a per-output-feature magnitude as in DoRA.
    lora_dtype: dtype of the adapter params.
  """

  rank: int = 8
  alpha: float = 8.0
  use_rslora: bool = False
  dropout_rate: float = 0.0
  a_init: str = "kaiming_uniform"
  use_dora: bool = False
  lora_dtype: str = "float32"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("rank", _check_rank(self.rank))
    set_("alpha", _check_alpha(self.alpha))
    rate = self.dropout_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)) or not 0 <= rate < 1:
      _fail("dropout_rate", rate, "must be a number in [0, 1)")
    set_("dropout_rate", float(rate))
    if self.a_init not in A_INITS:
      _fail("a_init", self.a_init, f"must be one of {A_INITS}")
    for flag in ("use_rslora", "use_dora"):
      if not isinstance(getattr(self, flag), (bool, np.bool_)):
        _fail(flag, getattr(self, flag), "must be True or False")
      set_(flag, bool(getattr(self, flag)))
    set_("lora_dtype", _check_dtype(self.lora_dtype))

  @property
  def scale(self) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _rules(value: Any, field: str, regex: bool = True) -> tuple[str, ...]:
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, Iterable):
    _fail(field, value, "must be a string or a list of strings")
  out = tuple(value)
  for v in out:
    if not isinstance(v, str) or not v:
      _fail(field, v, "must be a non-empty string")
  return tuple(_compile(v, field) for v in out) if regex else out


def _pattern(value: Any, field: str, check) -> tuple[tuple[str, Any], ...]:
  items = value.items() if isinstance(value, Mapping) else value
  try:
    pairs = [(k, v) for k, v in items]
  except (TypeError, ValueError):
    _fail(field, value, "must map regexes to values")
  keys = [k for k, _ in pairs]
  repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
  if repeated is not None:
    # A mapping keeps one value per key: serialised, the pairs would change meaning.
    _fail(field, value, f"key {repeated!r} appears more than once")
  return tuple((_compile(k, field), check(v, f"{field}[{k!r}]")) for k, v in pairs)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """What to adapt and how; immutable, hashable, and serialisable.

  Attributes:
    rank: default adapter rank r.
    alpha: default scale numerator (PEFT's `lora_alpha`).
    targets: `'all-linear'` (every linear layer but output heads), a regex
      matched against the whole module path, or a list of module names.
    exclude: layers never adapted, in the same forms as `targets`; checked
      first.
    dropout_rate: dropout on the adapter input (PEFT's `lora_dropout`).
    use_rslora: scale by alpha / sqrt(r).
    use_dora: DoRA magnitude vectors.
    a_init: 'kaiming_uniform' or 'gaussian'.
    rank_pattern: regex -> rank overrides, first match wins. Stored as a
      tuple of pairs; a dict is accepted.
    alpha_pattern: regex -> alpha overrides, first match wins.
    trainable: regexes of other params that train fully (PEFT's
      `modules_to_save`, e.g. a classifier head).
    lora_dtype: dtype of the adapter params.
    init: how a run starts the adapters: 'default' (A as `a_init`, B zero:
      the model starts as its base) or 'loftq' (LoftQ, for a quantized base:
      the base's kernels and A, B are fitted together so that the quantized
      kernel plus the adapter approximates the float kernel; see
      `lora_jax.loftq`).
    loftq_iter: LoftQ's alternations of quantizing and fitting (PEFT's
      `loftq_iter`), >= 1.

  Example:
    >>> config = LoRAConfig(rank=16, alpha=32, rank_pattern={'v_proj': 4})
    >>> config.scale('layers_0/self_attn/q_proj'), config.scale('layers_0/self_attn/v_proj')
    (2.0, 8.0)
  """

  rank: int = 8
  alpha: float = 8.0
  targets: str | tuple[str, ...] = ALL_LINEAR
  exclude: str | tuple[str, ...] = ()
  dropout_rate: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  a_init: str = "kaiming_uniform"
  rank_pattern: tuple[tuple[str, int], ...] = ()
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  trainable: tuple[str, ...] = ()
  lora_dtype: str = "float32"
  init: str = "default"
  loftq_iter: int = 1

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.init not in INITS:
      _fail("init", self.init, f"must be one of {INITS}")
    if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) \
        or self.loftq_iter < 1:
      _fail("loftq_iter", self.loftq_iter, "must be an integer >= 1")
    if self.init == "loftq" and self.use_dora:
      _fail("init", self.init, "does not start DoRA adapters (the magnitude would have to be "
            "refitted to the quantized kernel); use plain LoRA or init='default'")
    spec = AdapterSpec(  # validates the per-layer fields
        rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora,
        dropout_rate=self.dropout_rate, a_init=self.a_init,
        use_dora=self.use_dora, lora_dtype=self.lora_dtype)
    for f in dataclasses.fields(AdapterSpec):
      set_(f.name, getattr(spec, f.name))
    for field in ("targets", "exclude"):
      value = getattr(self, field)
      if isinstance(value, str):
        set_(field, _compile(value, field))
      else:
        set_(field, _rules(value, field, regex=False))
    if self.targets == ():
      _fail("targets", self.targets, "is empty: name at least one layer")
    set_("rank_pattern", _pattern(self.rank_pattern, "rank_pattern", _check_rank))
    set_("alpha_pattern", _pattern(self.alpha_pattern, "alpha_pattern", _check_alpha))
    set_("trainable", _rules(self.trainable, "trainable"))

  # --- path rules -----------------------------------------------------------

  def rules(self, field: str) -> tuple[PathRule, ...]:
    """The rules of one field (`'targets'`, `'exclude'`, `'rank_pattern'`,
    `'alpha_pattern'` or `'trainable'`), in order; `'all-linear'` has none."""
    value = getattr(self, field)
    if field in ("targets", "exclude"):
      if value == ALL_LINEAR:
        return ()
      if isinstance(value, str):
        return (PathRule.whole(field, value),)
      return tuple(PathRule.name(field, v) for v in value)
    if field in ("rank_pattern", "alpha_pattern"):
      return tuple(PathRule.suffix(field, k) for k, _ in value)
    if field == "trainable":
      return tuple(PathRule.suffix(field, v) for v in value)
    raise ValueError(f"LoRAConfig has no rule field {field!r}")

  def selects(self, path: str) -> bool:
    """Whether the linear layer at module `path` gets an adapter."""
    if any(rule.matches(path) for rule in self.rules("exclude")):
      return False
    if self.targets == ALL_LINEAR:
      return path.rsplit("/", 1)[-1] not in HEAD_NAMES
    return any(rule.matches(path) for rule in self.rules("targets"))

  def _pattern_value(self, field: str, path: str, default: Any) -> Any:
    values = (v for (_, v), rule in zip(getattr(self, field), self.rules(field))
              if rule.matches(path))
    return next(values, default)

  def rank_for(self, path: str) -> int:
    """The rank of the layer at module `path` (`rank_pattern`, else `rank`)."""
    return self._pattern_value("rank_pattern", path, self.rank)

  def alpha_for(self, path: str) -> float:
    """The alpha of the layer at module `path` (`alpha_pattern`, else `alpha`)."""
    return self._pattern_value("alpha_pattern", path, self.alpha)

  def adapter_for(self, path: str) -> AdapterSpec:
    """The full adapter settings of the layer at module `path`."""
    return AdapterSpec(
        rank=self.rank_for(path), alpha=self.alpha_for(path),
        use_rslora=self.use_rslora, dropout_rate=self.dropout_rate,
        a_init=self.a_init, use_dora=self.use_dora, lora_dtype=self.lora_dtype)

  def scale(self, path: str) -> float:
    """The adapter scale of the layer at module `path`, patterns resolved."""
    return self.adapter_for(path).scale

  def trainable_rule(self, param_path: str) -> str | None:
    """The `trainable` rule that makes a param train fully, if any.

    A rule matches the param's path or the path of any module above it, so
    `'classifier'` trains every param under `classifier/` (as PEFT's
    `modules_to_save` does).
    """
    parts = param_path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return next((rule.text for rule in self.rules("trainable")
                 if any(map(rule.matches, prefixes))), None)

  def is_trainable(self, param_path: str) -> bool:
    """Whether a non-adapter param (e.g. `classifier/kernel`) trains fully."""
    return self.trainable_rule(param_path) is not None

  def unmatched_rules(self, layers: Iterable[str] | None = None,
                      params: Iterable[str] | None = None) -> list[PathRule]:
    """The rules that match nothing in a model, in field order.

    A `targets` or `exclude` rule must match one of the model's linear layers;
    a `rank_pattern`/`alpha_pattern` key one of the layers the config selects
    (elsewhere it has no effect); a `trainable` rule one of `params` or a
    module above one. Each is checked only when what it must match is given.

    Args:
      layers: module paths of the model's linear layers.
      params: param paths of the model.
    """
    unmatched = []
    if layers is not None:
      layers = list(layers)
      selected = [p for p in layers if self.selects(p)]
      unmatched += [rule for field in ("targets", "exclude") for rule in self.rules(field)
                    if not any(map(rule.matches, layers))]
      unmatched += [rule for field in ("rank_pattern", "alpha_pattern")
                    for rule in self.rules(field) if not any(map(rule.matches, selected))]
    if params is not None:
      modules = {"/".join(p.split("/")[:i]) for p in params for i in range(1, p.count("/") + 2)}
      unmatched += [rule for rule in self.rules("trainable") if not any(map(rule.matches, modules))]
    return unmatched

  # --- serialisation --------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """A plain dict (JSON/YAML friendly) that `from_dict` turns back."""
    out = dataclasses.asdict(self)
    for field in ("targets", "exclude", "trainable"):
      if isinstance(out[field], tuple):
        out[field] = list(out[field])
    out["rank_pattern"] = dict(self.rank_pattern)
    out["alpha_pattern"] = dict(self.alpha_pattern)
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
    """Builds a config; an unknown key raises `ValueError` naming it."""
    if not isinstance(data, Mapping):
      raise ValueError(f"LoRA config must be a mapping, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
      if key not in known:
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {known}"
        raise ValueError(f"unknown LoRA config key {key!r}{hint}")
    return cls(**data)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)  # key order matters: first match wins

  @classmethod
  def from_json(cls, text: str) -> LoRAConfig:
    return cls.from_dict(json.loads(text))

  def to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=False)

  @classmethod
  def from_yaml(cls, text: str) -> LoRAConfig:
    return cls.from_dict(yaml.safe_load(text) or {})


def unmatched_error(rule: PathRule, layers: list[str], params: list[str] | None,
                    config: LoRAConfig | None = None) -> ValueError:
  """The error for a rule that matches nothing, listing what it could have matched."""
  if rule.field == "trainable":
    shown = ", ".join(params[:6]) + (", ..." if len(params) > 6 else "")
    return ValueError(f"{rule} matches no param; params of this model: {shown}")
  if rule.field.endswith("_pattern") and config is not None:
    selected = [p for p in layers if config.selects(p)]
    return ValueError(f"{rule} matches no layer the config selects; it selects: "
                      f"{describe_paths(selected)}")
  return ValueError(f"{rule} matches no linear layer; linear layers of this model: "
                    f"{describe_paths(layers)}")


def describe_paths(paths: Iterable[str]) -> str:
  """Paths with layer indices collapsed, for messages: `layers_*/self_attn/q_proj`."""
  collapsed = (re.sub(r"(^|/|_)\d+(?=/|$)", r"\1*", p) for p in paths)
  return ", ".join(dict.fromkeys(collapsed)) or "(none)"


def join_path(keys: Iterable[Any]) -> str:
  """The `/`-joined path of a pytree key path (dict keys and indices)."""
  parts = []
  for k in keys:
    if hasattr(k, "key"):  # DictKey
      parts.append(str(k.key))
    elif hasattr(k, "idx"):  # SequenceKey
      parts.append(str(k.idx))
    elif hasattr(k, "name"):  # GetAttrKey: metadata boxes hold their value here
      continue
    else:
      parts.append(str(k))
  return "/".join(parts)


def check_adapter_name(name: Any, prefix: str = "") -> str:
  """`name` if it can name an adapter, else `ValueError` after `prefix`.

  A name is a non-empty string that can name a directory (adapters are saved
  in directories of their names), without `=` (`--adapter NAME=DIR`), and not
  `BASE_NAME` (PEFT's name for the base model, no adapter).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"{prefix}adapter name {name!r}: must be a non-empty string")
  if any(c in name for c in "/\\=\0") or name in (".", ".."):
    raise ValueError(f"{prefix}adapter name {name!r}: must not contain '/', '\\' or '=', or be "
                     "'.' or '..' (each adapter is saved in a directory of its name)")
  if name == BASE_NAME:
    raise ValueError(f"{prefix}adapter name {name!r} is reserved for the base model (no adapter)")
  return name
