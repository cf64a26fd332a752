"""Adapter stacks: K adapters on one base, for mixed batches and hot swaps.

`stack_adapters(model, adapters, *sample_args)` pads each adapter to one rank and
stacks them, with their own scales, into the params of `inject(model,
stack.spec)` (see `lora_jax.mixed`). The stack is an ordinary pytree: pass
`combine(stack.params, base)` to the jitted function that runs the model with
`adapter_ids`; `stack.swap(...)` puts another adapter in a slot and gives
params of the same shapes, so the compiled program is reused; `stack.adapter(...)`
gives a member back exactly as it went in.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> from lora_jax import LoRAConfig, init_adapters, inject, split, combine
  >>> mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
  >>> x = jnp.ones((3, 6))
  >>> base = mlp.init(jax.random.key(0), x)['params']
  >>> def fresh(config, seed):  # an adapter; B made nonzero as if trained
  ...   params = init_adapters(inject(mlp, config), base, jax.random.key(seed), x)
  ...   adapters = split(params)[0]
  ...   return jax.tree.map(lambda a: a + 0.1, adapters), config
  >>> adapters = {'fr': fresh(LoRAConfig(rank=2), 1), 'de': fresh(LoRAConfig(rank=4), 2)}
  >>> s = stack_adapters(mlp, adapters, x)
  >>> y = inject(mlp, s.spec).apply({'params': combine(s.params, base)}, x,
  ...                               adapter_ids=s.ids(['fr', 'de', None]))
  >>> y.shape
  (3, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lora_jax.config import (ADAPTER_LEAVES, BASE_NAME, LoRAConfig, check_adapter_name,
                             join_path)
from lora_jax.layers import Recorded, recording_layouts
from lora_jax.layout import Layout
from lora_jax.mixed import BASE_ID, DORA, SCALE, StackSpec
from lora_jax.tree import leaf_paths, split



@dataclasses.dataclass(frozen=True)
class Member:
  """One adapter in a stack: its name, config and the layers it adapts."""

  name: str
  config: LoRAConfig
  layers: tuple[str, ...]


class AdapterStack(struct.PyTreeNode):
  """K adapters stacked for one model (see the module docstring).

  Attributes:
    params: the stacked adapter leaves by layer path (`lora_a`, `lora_b`,
      `lora_scale`, and with DoRA `lora_magnitude`, `lora_dora`).
    spec: the static shape (`inject(model, spec)` runs it).
    members: the adapter in each slot, `None` for an empty slot.
    layouts: each layer's stacked layout, as `(path, Layout)` pairs.
  """

  params: dict
  spec: StackSpec = struct.field(pytree_node=False)
  members: tuple[Member | None, ...] = struct.field(pytree_node=False)
  layouts: tuple[tuple[str, Layout], ...] = struct.field(pytree_node=False)

  @property
  def names(self) -> tuple[str | None, ...]:
    """The name in each slot (`None`: empty)."""
    return tuple(None if m is None else m.name for m in self.members)

  def slot(self, name_or_slot: str | int) -> int:
    """The slot of an adapter, by name or by slot number."""
    if isinstance(name_or_slot, (int, jnp.integer)) and not isinstance(name_or_slot, bool):
      if not 0 <= name_or_slot < self.spec.count:
        raise ValueError(f"slot {name_or_slot} is out of range: the stack has "
                         f"{self.spec.count} slots")
      return int(name_or_slot)
    if name_or_slot not in self.names or name_or_slot is None:
      known = [n for n in self.names if n is not None]
      raise ValueError(f"no adapter named {name_or_slot!r} in the stack; it holds {known}")
    return self.names.index(name_or_slot)

  def ids(self, names: Sequence[str | int | None]) -> jax.Array:
    """Adapter ids for a batch from names (or slots); `None` or '__base__' runs the base."""
    return jnp.asarray([BASE_ID if n is None or n == BASE_NAME else self.slot(n) for n in names],
                       jnp.int32)

  def adapter(self, name_or_slot: str | int) -> tuple[dict, LoRAConfig]:
    """The adapter in a slot, exactly as it was stacked: `(adapters, config)`."""
    k = self.slot(name_or_slot)
    member = self.members[k]
    if member is None:
      raise ValueError(f"slot {k} of the stack is empty")
    layouts = dict(self.layouts)
    flat = {}
    for path in member.layers:
      layout, rank = layouts[path], member.config.rank_for(path)
      for leaf in ADAPTER_LEAVES:
        if leaf == "lora_magnitude" and not member.config.use_dora:
          continue
        which = leaf[5]  # a, b or m
        x = _leaf(self.params, f"{path}/{leaf}")
        x = jnp.take(x, k, axis=layout.stack_axis(which))
        member_letters = getattr(layout.member(), which)
        if layout.rank in member_letters:
          x = jax.lax.slice_in_dim(x, 0, rank, axis=member_letters.index(layout.rank))
        flat[f"{path}/{leaf}"] = x.astype(member.config.lora_dtype)
    return _nest(flat), member.config

  def swap(self, name_or_slot: str | int, adapters: Mapping, config: LoRAConfig, *,
           name: str | None = None) -> AdapterStack:
    """The stack with another adapter in a slot; same shapes, so no recompiling.

    Args:
      name_or_slot: the slot to fill (an empty slot by number, or an adapter's name).
      adapters: the new adapter's leaves (or params holding them).
      config: its config.
      name: its name (default: the slot's current name).
    """
    k = self.slot(name_or_slot)
    name = name if name is not None else self.names[k]
    if name is None:
      raise ValueError(f"slot {k} is empty: give the adapter a name")
    if name in self.names and self.names.index(name) != k:
      raise ValueError(f"the stack holds an adapter named {name!r} in slot "
                       f"{self.names.index(name)} already")
    member, values = _member(name, adapters, config)
    _check_member(member, values, self.spec, dict(self.layouts), self.params)
    params = _fill(self.params, dict(self.layouts), self.spec, k, member, values)
    members = self.members[:k] + (member,) + self.members[k + 1:]
    return self.replace(params=params, members=members)


def _leaf(tree: Mapping, path: str) -> Any:
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def _member(name: Any, adapters: Any, config: Any) -> tuple[Member, dict[str, Any]]:
  """A member and its adapter leaves by path, checked."""
  check_adapter_name(name)
  if not isinstance(config, LoRAConfig):
    raise ValueError(f"adapter {name!r}: expected a LoRAConfig, got {type(config).__name__}")
  if not isinstance(adapters, Mapping):
    raise ValueError(f"adapter {name!r}: expected nested mappings of adapter leaves, got "
                     f"{type(adapters).__name__}")
  tree, rest = split(nn.unbox(adapters), config)
  trained = [p for p in leaf_paths(tree) if p.rsplit("/", 1)[-1] not in ADAPTER_LEAVES]
  if trained:
    raise ValueError(f"adapter {name!r} trains {trained[0]} besides its adapters: a stack "
                     "shares one base, so it holds adapters only")
  values = {join_path(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(tree)}
  layers = tuple(sorted({p.rsplit("/", 1)[0] for p in values}))
  if not layers:
    raise ValueError(f"adapter {name!r} holds no adapters (lora_a/lora_b)")
  return Member(name, config, layers), values


def _check_member(member: Member, values: Mapping[str, Any], spec: StackSpec,
                  layouts: Mapping[str, Layout], params: Mapping) -> None:
  """Raises `ValueError` unless the adapter fits the stack's shape."""
  c = member.config
  if c.use_dora and not spec.use_dora:
    raise ValueError(f"adapter {member.name!r} is DoRA but the stack holds no DoRA "
                     "magnitudes: build it with use_dora=True")
  for path in member.layers:
    if path not in layouts:
      raise ValueError(f"adapter {member.name!r} adapts '{path}', which the stack does not "
                       f"({', '.join(spec.layers[:4])}{', ...' if len(spec.layers) > 4 else ''})")
    layout = layouts[path]
    rank = c.rank_for(path)
    if rank > spec.max_rank:
      raise ValueError(f"adapter {member.name!r} has rank {rank} at '{path}', above the "
                       f"stack's max_rank {spec.max_rank}")
    if (f"{path}/lora_magnitude" in values) != c.use_dora:
      raise ValueError(f"adapter {member.name!r}: layer '{path}' and use_dora={c.use_dora} "
                       "disagree about a DoRA magnitude")
    for leaf in ("lora_a", "lora_b", "lora_magnitude")[:3 if c.use_dora else 2]:
      which = leaf[5]
      stacked = jnp.shape(_leaf(params, f"{path}/{leaf}"))
      axis = layout.stack_axis(which)
      expected = list(stacked[:axis] + stacked[axis + 1:])
      letters = getattr(layout.member(), which)
      if layout.rank in letters:
        expected[letters.index(layout.rank)] = rank
      got = tuple(jnp.shape(values[f"{path}/{leaf}"])) if f"{path}/{leaf}" in values else None
      if got != tuple(expected):
        raise ValueError(f"adapter {member.name!r}: layer '{path}' holds {leaf} {got}, which "
                         f"does not fit the model's layer (rank {rank}: {tuple(expected)})")


def _fill(params: Mapping, layouts: Mapping[str, Layout], spec: StackSpec, k: int,
          member: Member | None, values: Mapping[str, Any]) -> dict:
  """`params` with slot `k` holding the member (or emptied)."""
  flat = {join_path(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(params)}
  for path, layout in layouts.items():
    adapted = member is not None and path in member.layers
    for leaf in ADAPTER_LEAVES + (SCALE, DORA):
      key = f"{path}/{leaf}"
      if key not in flat:
        continue
      stacked = flat[key]
      if leaf in (SCALE, DORA):
        value = 0.0
        if adapted:
          value = member.config.scale(path) if leaf == SCALE else float(member.config.use_dora)
        flat[key] = stacked.at[..., k].set(value)
        continue
      which = leaf[5]
      axis = layout.stack_axis(which)
      slot_shape = stacked.shape[:axis] + stacked.shape[axis + 1:]
      if adapted and key in values:
        x = jnp.asarray(values[key], stacked.dtype)
        letters = getattr(layout.member(), which)
        if layout.rank in letters:
          r = letters.index(layout.rank)
          x = jnp.pad(x, [(0, slot_shape[r] - x.shape[r]) if i == r else (0, 0)
                          for i in range(x.ndim)])
      elif leaf == "lora_magnitude":
        x = jnp.ones(slot_shape, stacked.dtype)  # a plain adapter's gain is 1 whatever this is
      else:
        x = jnp.zeros(slot_shape, stacked.dtype)
      index = (slice(None),) * axis + (k,)
      flat[key] = stacked.at[index].set(x)
  return _nest(flat)


def _trace(model: nn.Module, spec: StackSpec, sample_args, sample_kwargs):
  """The stacked model's abstract params and each layer's stacked layout."""
  from lora_jax.inject import _plain, inject  # inject imports mixed, not stack
  injected = inject(_plain(model), spec)
  with recording_layouts():
    variables = jax.eval_shape(lambda: injected.init(jax.random.key(0), *sample_args,
                                                     **sample_kwargs))
  layouts, shapes = {}, {}
  for kp, leaf in jax.tree_util.tree_leaves_with_path(
      variables.get("params", {}), is_leaf=lambda x: isinstance(x, Recorded)):
    path = join_path(kp)
    if isinstance(leaf, Recorded):
      layouts[path.rsplit("/", 1)[0]] = leaf.layout
      leaf = leaf.value
    shapes[path] = nn.meta.unbox(leaf)
  return layouts, shapes


def stack_adapters(model: nn.Module, adapters: Mapping[str, tuple[Mapping, LoRAConfig]],
          *sample_args, max_rank: int | None = None, count: int | None = None,
          use_dora: bool | None = None, dropout_rate: float = 0.0,
          **sample_kwargs) -> AdapterStack:
  """Stacks named adapters of one model for mixed batches and hot swaps.

  Args:
    model: the plain model (or an injected one: its adapters are ignored).
    adapters: name -> `(adapters, config)`, in slot order; each tree holds a
      model's adapter leaves (or its params: base leaves are dropped).
    *sample_args: arguments for one call of the model (shapes are what count).
    max_rank: the rank every adapter is padded to (default: the largest);
      declare one to swap larger adapters in later.
    count: number of slots (default: one per adapter); extra slots start
      empty, ready for `swap`.
    use_dora: hold DoRA magnitudes (default: whether any adapter is DoRA).
    dropout_rate: adapter dropout when training the stack.
    **sample_kwargs: keyword arguments for that call.

  Returns:
    An `AdapterStack`.

  Raises:
    ValueError: naming the adapter and layer, for a bad name, a rank above
      `max_rank`, shapes that do not fit the model, or more adapters than slots.
  """
  if not isinstance(adapters, Mapping) or not adapters:
    raise ValueError("stack expects a non-empty mapping of name -> (adapters, config)")
  members, values = [], []
  for name, pair in adapters.items():
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"adapter {name!r}: expected an (adapters, config) pair")
    member, leaves = _member(name, *pair)
    members.append(member)
    values.append(leaves)
  count = len(members) if count is None else count
  if isinstance(count, bool) or not isinstance(count, int) or count < len(members):
    raise ValueError(f"count={count!r}: must be an integer >= the {len(members)} adapters given")
  ranks = [m.config.rank_for(p) for m in members for p in m.layers]
  if use_dora is None:
    use_dora = any(m.config.use_dora for m in members)
  dtypes = {m.config.lora_dtype for m in members}
  spec = StackSpec(layers=tuple(p for m in members for p in m.layers), count=count,
                   max_rank=max(ranks) if max_rank is None else max_rank, use_dora=use_dora,
                   lora_dtype=dtypes.pop() if len(dtypes) == 1 else "float32",
                   dropout_rate=dropout_rate)
  layouts, shapes = _trace(model, spec, sample_args, sample_kwargs)
  params = _nest({p: jnp.zeros(s.shape, s.dtype) for p, s in shapes.items()
                  if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES + (SCALE, DORA)})
  for k, (member, leaves) in enumerate(zip(members, values)):
    _check_member(member, leaves, spec, layouts, params)
    params = _fill(params, layouts, spec, k, member, leaves)
  return AdapterStack(params, spec, tuple(members) + (None,) * (count - len(members)),
                      tuple(sorted(layouts.items())))
