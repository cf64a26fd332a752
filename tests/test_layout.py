"""Adapter layouts: made from a layer's contraction, followed through lifted
transforms, read back from shapes only where that is unambiguous."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import host_random
import lora_jax as lj
from lora_jax.layout import (
    Layout, dense_contraction, einsum_contraction, layout_of, read_layout)
from tests.test_layers import KINDS, _perturb


@pytest.mark.parametrize("kind", list(KINDS))
def test_layout_read_back_from_shapes(kind):
  """Where no record is at hand, the shapes give back the layer's own layout."""
  _, lora_fn, shape = KINDS[kind]
  params = jax.eval_shape(lora_fn(rank=2, use_dora=True).init, jax.random.key(0),
                          jnp.ones(shape))["params"]
  k, a, b, m = (params[n].shape for n in ("kernel", "lora_a", "lora_b", "lora_magnitude"))
  layout = read_layout(k, a, b, m)
  assert layout.shapes(k, 2) == (a, b, m)


def test_contraction_helpers():
  assert dense_contraction(3) == ("abc", "cd", "abd")
  c = einsum_contraction("...d,dh->...h", (2, 3, 6), (6, 4))
  assert c.kernel == "dh" and len(c.inputs) == 3 and c.outputs.endswith("h")
  with pytest.raises(ValueError, match="contracts no input axis"):
    layout_of(einsum_contraction("bd,h->bdh", (2, 3), (4,)))
  with pytest.raises(ValueError, match="every kernel axis"):
    layout_of(einsum_contraction("bd,dk->b", (2, 3), (3, 4)))
  with pytest.raises(ValueError, match="do not fit kernel"):
    read_layout((6, 5), (4, 2), (2, 5))


def test_add_axis_follows_a_lifted_transform():
  dense = layout_of(dense_contraction(2))
  i, o, r = dense.kernel[0], dense.kernel[1], dense.rank
  assert (dense.a, dense.b, dense.m, dense.contract) == (i + r, r + o, o, i)
  lifted = dense.add_axis(1)  # nn.scan(variable_axes={'params': 1})
  assert lifted.shapes((3, 7, 4), 2) == ((3, 7, 2), (2, 7, 4), (4, 7))
  assert lifted.shared == lifted.kernel[1] and lifted.contract == i
  read = read_layout((3, 7, 4), (3, 7, 2), (2, 7, 4), (4, 7))  # its own letters, same axes
  assert read._meaning((3, 7, 4)) == lifted._meaning((3, 7, 4))


def test_shapes_that_fit_two_different_layouts_are_refused():
  # A Dense stacked at axis 1 whose sizes all coincide also reads as a batched DenseGeneral.
  with pytest.raises(ValueError, match="fit kernel \\(4, 4, 4\\) in .* layouts that compute "
                     "different things"):
    read_layout((4, 4, 4), (4, 4, 4), (4, 4, 4))


class Block(nn.Module):
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(self.dense(5, name="proj")(x)), None


class Stack(nn.Module):
  """Layers stacked on axis 1 of every param (not the usual leading axis)."""

  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    return nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True},
                   length=3)(self.dense, name="layers")(x, None)[0]


@pytest.mark.parametrize("use_dora", [False, True])
def test_scan_with_layer_axis_1_merges(use_dora):
  x = host_random.normal(0, (2, 5))
  config = lj.LoRAConfig(rank=2, use_dora=use_dora)
  model = lj.inject(Stack(), config)
  params = _perturb(model.init(jax.random.key(1), x)["params"])
  layer = params["layers"]["proj"]
  assert layer["kernel"].shape == (5, 3, 5) and layer["lora_b"].shape == (2, 3, 5)
  merged = lj.merge(params, config)
  np.testing.assert_allclose(Stack().apply({"params": merged}, x),
                             model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_einsum_with_a_size_1_contracting_axis_merges():
  layer = lambda cls: cls((3, 1, 4), "btd,ndh->btnh", name="e")
  x = host_random.normal(0, (2, 5, 1))
  for use_dora in (False, True):
    config = lj.LoRAConfig(rank=2, use_dora=use_dora)
    model = lj.inject(layer(nn.Einsum), config)
    params = _perturb(model.init(jax.random.key(1), x)["params"])
    assert params["lora_a"].shape == (1, 1, 1, 2) and params["lora_b"].shape == (3, 1, 4, 2)
    merged = lj.merge(params, config)
    np.testing.assert_allclose(layer(nn.Einsum).apply({"params": merged}, x),
                               model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_layout_is_hashable_and_readable():
  layout = Layout("ab", "a", "c", "ac", "cb", "b")
  assert hash(layout) == hash(Layout("ab", "a", "c", "ac", "cb", "b"))
  assert str(layout) == "kernel ab: A ac, B cb, magnitude b (rank c)"


def test_a_recorded_layout_merges_what_shapes_cannot_tell():
  """Every size 4: the shapes also read as a batched DenseGeneral; the record is exact."""
  class Square(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True},
                     length=4)(nn.Dense, name="layers")(x, None)[0]

  class Block(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(self.dense(4, name="proj")(x)), None

  x = host_random.normal(0, (2, 4))
  config = lj.LoRAConfig(rank=4, use_dora=True)
  model = lj.inject(Square(), config)
  params = _perturb(model.init(jax.random.key(1), x)["params"])
  with pytest.raises(ValueError, match="merge: layer 'layers/proj': .* layouts that compute "
                     "different things"):
    lj.merge(params, config)
  record = lj.layouts(model, x)
  assert record["layers/proj"].shapes((4, 4, 4), 4) == ((4, 4, 4), (4, 4, 4), (4, 4))
  merged = lj.merge(params, config, layouts=record)
  np.testing.assert_allclose(Square().apply({"params": merged}, x),
                             model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not stored as the recorded layout says"):
    lj.merge(params, config, layouts={"layers/proj": layout_of(dense_contraction(2))})
  with pytest.raises(ValueError, match="the layouts hold no record of layer 'layers/proj'"):
    lj.merge(params, config, layouts={})


def test_recorded_layouts_shard_adapters_like_their_kernels():
  """Annotated kernels, layer axis 1: the record and the names agree."""
  class Annotated(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return jnp.tanh(nn.Dense(8, kernel_init=init, name="proj")(x)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Annotated, variable_axes={"params": 1}, split_rngs={"params": True},
                     length=2, metadata_params={nn.PARTITION_NAME: "layers"})(name="layers")(
                         x, None)[0]

  x = jnp.ones((2, 8))
  model = lj.inject(Model(), lj.LoRAConfig(rank=2, use_dora=True))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  mesh = lj.sharding.make_mesh(data=1, fsdp=4, tensor=2)
  read = lj.sharding.param_shardings(abstract, mesh)
  recorded = lj.sharding.param_shardings(abstract, mesh, layouts=lj.layouts(model, x))
  specs = jax.tree.map(lambda s: s.spec, recorded["layers"]["proj"])
  assert specs == jax.tree.map(lambda s: s.spec, read["layers"]["proj"])
  assert specs["kernel"] == P("fsdp", None, "tensor")
  assert specs["lora_a"] == P("fsdp", None, None) and specs["lora_b"] == P(None, None, "tensor")
  assert specs["lora_magnitude"] == P("tensor", None)


@pytest.mark.parametrize("axis, use_dora", [(2, False), (-1, True)])  # a 1-D magnitude has no axis 2
def test_a_layer_axis_after_the_rank(axis, use_dora):
  """Stacked last: the rank is no longer A's last axis."""
  class Last(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": axis}, split_rngs={"params": True},
                     length=3)(name="layers")(x, None)[0]

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(5, use_bias=False, name="proj")(x)), None

  x = host_random.normal(0, (2, 5))
  config = lj.LoRAConfig(rank=2, use_dora=use_dora)
  model = lj.inject(Last(), config)
  params = _perturb(model.init(jax.random.key(1), x)["params"])
  assert params["layers"]["proj"]["lora_a"].shape == (5, 2, 3)
  for layouts in (None, lj.layouts(model, x)):
    merged = lj.merge(params, config, layouts=layouts)
    np.testing.assert_allclose(Last().apply({"params": merged}, x),
                               model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
