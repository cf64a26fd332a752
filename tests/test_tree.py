"""Param-tree functions: partition, split/combine, count, merge."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import host_random
import lora_jax as lj


class MLP(nn.Module):
  """A small regression model with LoRA layers and a fully trained head."""

  dense: type = lj.LoRADense
  use_dora: bool = False

  @nn.compact
  def __call__(self, x):
    kw = {"rank": 4, "alpha": 8.0, "use_dora": self.use_dora} if self.dense is not nn.Dense else {}
    x = nn.tanh(self.dense(32, name="hidden_0", **kw)(x))
    x = nn.tanh(self.dense(32, name="hidden_1", **kw)(x))
    x = nn.LayerNorm(name="norm")(x)
    return nn.Dense(1, name="head")(x)


@pytest.fixture(scope="module")
def params():
  return MLP().init(jax.random.key(0), jnp.ones((1, 8)))["params"]


def _randomize(tree, seed=0, size=0.1):
  """Every leaf moved at random (on the host: no compile per leaf shape)."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
      treedef, [host_random.nudge(l, 1000 * seed + i, size) for i, l in enumerate(leaves)])


def test_partition_labels_every_leaf(params):
  labels = lj.partition(params, lj.LoRAConfig(trainable=["head"]))
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert labels["hidden_0"] == {"kernel": "frozen", "bias": "frozen", "lora_a": "lora",
                                "lora_b": "lora"}
  assert labels["head"] == {"kernel": "trainable", "bias": "trainable"}
  assert labels["norm"] == {"scale": "frozen", "bias": "frozen"}
  assert lj.partition(params)["head"] == {"kernel": "frozen", "bias": "frozen"}


def test_split_combine_are_inverses(params):
  adapters, base = lj.split(params)
  assert set(adapters) == {"hidden_0", "hidden_1"}
  assert all(set(v) == {"lora_a", "lora_b"} for v in adapters.values())
  assert "lora_a" not in base["hidden_0"] and set(base) == set(params)
  assert jax.tree.structure(lj.combine(adapters, base)) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(lj.combine(adapters, base)), jax.tree.leaves(params)):
    assert a is b
  # With trainable rules the head moves to the adapter side, and back.
  config = lj.LoRAConfig(trainable=["head"])
  adapters, base = lj.split(params, config)
  assert "head" in adapters and "head" not in base
  assert jax.tree.structure(lj.combine(adapters, base)) == jax.tree.structure(params)


def test_split_keeps_empty_dicts_it_did_not_empty():
  tree = {"a": {}, "b": {"lora_a": 1}, "c": {"kernel": 2, "sub": {"lora_b": 3}}}
  adapters, base = lj.split(tree)
  assert adapters == {"b": {"lora_a": 1}, "c": {"sub": {"lora_b": 3}}}
  assert base == {"a": {}, "c": {"kernel": 2}}
  assert lj.combine(adapters, base) == tree


def test_combine_refuses_conflicts():
  with pytest.raises(ValueError, match="both trees hold 'x/kernel'"):
    lj.combine({"x": {"kernel": 1}}, {"x": {"kernel": 2}})
  with pytest.raises(ValueError, match="both trees hold 'x'"):
    lj.combine({"x": {"lora_a": 1}}, {"x": 5})


def test_count_and_summary(params, capsys):
  n = lj.count(params)
  assert n["lora"] == (8 * 4 + 4 * 32) + (32 * 4 + 4 * 32)
  assert n["frozen"] == (8 * 32 + 32) + (32 * 32 + 32) + 2 * 32 + (32 + 1)
  assert n["trainable"] == 0
  assert lj.count(params, lj.LoRAConfig(trainable=["head"]))["trainable"] == 33
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert lj.count(abstract) == n
  lj.summary(params)
  total = sum(n.values())
  assert capsys.readouterr().out == (
      f"trainable params: {n['lora']:,d} || all params: {total:,d} || "
      f"trainable%: {100 * n['lora'] / total:.4f}\n")


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_returns_the_plain_models_tree_and_outputs(use_dora):
  x = host_random.normal(1, (4, 8))
  params = MLP(use_dora=use_dora).init(jax.random.key(0), x)["params"]
  params = _randomize(params)
  config = lj.LoRAConfig(rank=4, alpha=8.0, use_dora=use_dora)
  merged = lj.merge(params, config)
  plain = MLP(dense=nn.Dense)
  plain_params = plain.init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, plain_params)
  np.testing.assert_allclose(plain.apply({"params": merged}, x),
                             MLP(use_dora=use_dora).apply({"params": params}, x),
                             rtol=1e-5, atol=1e-6)
  # Leaves without adapters pass through untouched.
  assert merged["norm"]["scale"] is params["norm"]["scale"]


def test_merge_accumulates_in_float32_and_casts_once():
  """A bf16 kernel merges to the bf16 value nearest the exact sum (one rounding)."""
  ka, kb, kw = jax.random.split(jax.random.key(0), 3)
  kernel = (1 + jax.random.uniform(kw, (64, 64))).astype(jnp.bfloat16)
  a = jax.random.normal(ka, (64, 8)) * 0.05
  b = jax.random.normal(kb, (8, 64)) * 0.05
  params = {"layer": {"kernel": kernel, "lora_a": a, "lora_b": b}}
  merged = lj.merge(params, lj.LoRAConfig(rank=8, alpha=8.0))["layer"]["kernel"]
  assert merged.dtype == jnp.bfloat16
  exact = np.asarray(kernel, np.float64) + np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  half_ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 8)  # bf16 keeps 8 significant bits
  err = np.abs(np.asarray(merged, np.float64) - exact)
  assert np.all(err <= half_ulp * (1 + 1e-3))
  # Adding a bf16 update to a bf16 kernel (two roundings) is measurably worse.
  naive = np.asarray(kernel + (a @ b).astype(jnp.bfloat16), np.float64)
  assert np.any(np.abs(naive - exact) > half_ulp * (1 + 1e-3))
  as_f32 = lj.merge(params, lj.LoRAConfig(rank=8, alpha=8.0), dtype=jnp.float32)["layer"]["kernel"]
  np.testing.assert_allclose(np.asarray(as_f32), exact, rtol=1e-6)


def test_merge_dtype_casts_every_float_leaf(params):
  merged = lj.merge(params, lj.LoRAConfig(rank=4, alpha=8.0), dtype=jnp.bfloat16)
  assert {l.dtype for l in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_merge_safe_names_non_finite_layer(params):
  bad = jax.tree.map(lambda x: x, params)
  bad["hidden_1"] = dict(bad["hidden_1"], lora_b=jnp.full_like(bad["hidden_1"]["lora_b"], jnp.inf))
  config = lj.LoRAConfig(rank=4, alpha=8.0)
  with pytest.raises(ValueError, match="layer 'hidden_1' has non-finite values"):
    lj.merge(bad, config, safe=True)
  lj.merge(params, config, safe=True)  # finite: no error
  with pytest.raises(ValueError, match="cannot run under jit"):
    jax.jit(lambda p: lj.merge(p, config, safe=True))(params)


def test_merge_refuses_mismatched_config(params):
  with pytest.raises(ValueError, match="'hidden_0' has a rank-4 adapter but the config gives rank 8"):
    lj.merge(params, lj.LoRAConfig(rank=8))
  with pytest.raises(ValueError, match="'hidden_0' lacks a DoRA magnitude"):
    lj.merge(params, lj.LoRAConfig(rank=4, use_dora=True))
  with pytest.raises(ValueError, match="no adapters"):
    lj.merge(lj.split(params)[1], lj.LoRAConfig(rank=4))
  broken = {"layer": {"kernel": jnp.ones((3, 4)), "lora_a": jnp.ones((5, 2)),
                      "lora_b": jnp.ones((2, 4))}}
  with pytest.raises(ValueError, match="'layer'.*do not fit kernel"):
    lj.merge(broken, lj.LoRAConfig(rank=2))
  with pytest.raises(ValueError, match="'layer' has adapters but no kernel"):
    lj.merge({"layer": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 4))}},
             lj.LoRAConfig(rank=2))


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_merge_under_jit_with_donation_keeps_one_copy():
  """Donated, every output buffer reuses an input buffer: no second model copy."""
  model = MLP()
  params = _randomize(model.init(jax.random.key(0), jnp.ones((1, 8)))["params"])
  config = lj.LoRAConfig(rank=4, alpha=8.0)
  merge = jax.jit(lj.merge, static_argnums=1, donate_argnums=0)
  compiled = merge.lower(params, config).compile()
  expected = lj.merge(params, config)
  merged_bytes = sum(l.nbytes for l in jax.tree.leaves(expected))
  assert compiled.memory_analysis().alias_size_in_bytes == merged_bytes
  out = merge(jax.tree.map(jnp.copy, params), config)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_functions_work_on_variables_and_boxed_trees():
  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return lj.LoRADense(6, rank=2, kernel_init=init, name="proj")(x)

  x = jnp.ones((2, 4))
  variables = Boxed().init(jax.random.key(0), x)
  assert isinstance(variables["params"]["proj"]["kernel"], nn.LogicallyPartitioned)
  labels = lj.partition(variables)
  assert jax.tree.leaves(labels["params"]["proj"]["kernel"]) == ["frozen"]
  variables = jax.tree.map(lambda l: l + 0.1, variables)
  merged = lj.merge(variables, lj.LoRAConfig(rank=2))
  assert isinstance(merged["params"]["proj"]["kernel"], nn.LogicallyPartitioned)
  assert merged["params"]["proj"]["kernel"].names == ("embed", "mlp")
  plain = nn.Dense(6).apply({"params": nn.unbox(merged["params"]["proj"])}, x)
  np.testing.assert_allclose(plain, Boxed().apply(variables, x), rtol=1e-5)


def test_combine_returns_plain_dicts_for_frozen_dicts(params):
  from flax.core import freeze
  adapters, base = lj.split(freeze(params))
  combined = lj.combine(adapters, base)
  assert jax.tree.structure(combined) == jax.tree.structure(params)


def test_merge_dtype_leaves_non_float_leaves_alone(params):
  tree = dict(params, step=3, ids=jnp.arange(3))
  merged = lj.merge(tree, lj.LoRAConfig(rank=4, alpha=8.0), dtype=jnp.bfloat16)
  assert merged["step"] == 3 and merged["ids"].dtype == jnp.int32
  assert merged["head"]["kernel"].dtype == jnp.bfloat16
