"""merge_reversibly / unmerge / switch_merged: a merged adapter taken out again."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj
from lora_jax.adapter_set import switch_merged
from lora_jax.layers import merged_kernel
from lora_jax.unmerge import merge_reversibly, unmerge

X = jnp.ones((2, 3, 5))


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.Dense(6, name="proj")(h), None


class Net(nn.Module):
  """Dense, DenseGeneral, a compact and a Gemma-like (full layout) Einsum, a scanned stack."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="dense")(x)
    h = nn.DenseGeneral((2, 4), name="general")(h)
    h = nn.Einsum((2, 4, 6), "btnh,nhd->btd", name="einsum")(h)
    h = nn.Einsum((2, 6, 3), "btd,ndh->btnh", name="gemma")(h).reshape(h.shape)
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="stack")(h, None)[0]


CONFIGS = {
    "lora": lj.LoRAConfig(rank=2, alpha=4.0, use_rslora=True, rank_pattern={"einsum": 3},
                          alpha_pattern={"gemma": 1.5}),
    "dora": lj.LoRAConfig(rank=2, alpha=4.0, use_dora=True, rank_pattern={"stack/proj": 3}),
}
KERNELS = ["dense", "general", "einsum", "gemma", "stack/proj"]


def at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def random_like(shapes, seed):
  """Arrays of these shapes from numpy (compiling jax's initialisers would take longer)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray((0.5 * rng.standard_normal(s.shape)).astype(s.dtype)),
                      shapes)


def with_adapters(base, config, seed):
  """`base` plus random adapters; `dense`'s B keeps column 0 at zero."""
  shapes = jax.eval_shape(lj.inject(Net(), config).init, jax.random.key(0), X)["params"]
  adapters = random_like(lj.split(shapes)[0], seed)
  adapters["dense"]["lora_b"] = adapters["dense"]["lora_b"].at[:, 0].set(0.0)
  return lj.combine(adapters, base)


@pytest.fixture(scope="module")
def base():
  """Float32 base params; `dense` and `general` each have an all-zero kernel column."""
  params = random_like(jax.eval_shape(Net().init, jax.random.key(0), X)["params"], 0)
  params["dense"]["kernel"] = params["dense"]["kernel"].at[:, 0].set(0.0)
  params["general"]["kernel"] = params["general"]["kernel"].at[:, 0, 0].set(0.0)
  return params


@pytest.fixture(scope="module")
def adapted(base):
  """name -> params (float32 base + random adapters)."""
  return {name: with_adapters(base, config, seed)
          for seed, (name, config) in enumerate(CONFIGS.items(), 1)}


def in_dtype(params, dtype):
  """The base's kernels and biases in `dtype`; adapters as they were."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: x if kp[-1].key.startswith("lora_") else x.astype(dtype), params)


_v = jax.jit(merged_kernel, static_argnums=3)  # W + s*A@B in float32


def f32(x):
  return np.asarray(x, np.float32)


def scale_of(*arrays):
  return max(float(np.abs(f32(a)).max()) for a in arrays)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unmerge_recovers_the_base(adapted, name, dtype):
  """Every layer kind, scanned too, rsLoRA and rank/alpha patterns, DoRA with zero kernel
  columns: within float32 round-off, or bf16's for bf16 kernels."""
  config, params = CONFIGS[name], in_dtype(adapted[name], dtype)
  merged, record = merge_reversibly(params, config)
  jax.tree.map(np.testing.assert_array_equal, merged, lj.merge(params, config))
  back = unmerge(merged, record)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for path in KERNELS:
    w, got, w_merged = (at(tree, path)["kernel"] for tree in (params, back, merged))
    assert got.dtype == w.dtype
    assert at(back, path)["bias"] is at(merged, path)["bias"]  # untouched leaves: the same objects
    for leaf in ("lora_a", "lora_b", "lora_magnitude"):
      if leaf in at(params, path):
        np.testing.assert_array_equal(at(back, path)[leaf], at(params, path)[leaf])
    error = np.abs(f32(got) - f32(w))
    if dtype == jnp.float32:
      assert error.max() <= 1e-6 * scale_of(w, w_merged), path
    else:
      # W' = bf16(gain * V), V = W + s*A@B: one rounding of W' (bf16's unit round-off 2**-8,
      # relative to V after dividing by the gain) and one of W.
      layer = at(params, path)
      v = _v(layer["kernel"], layer["lora_a"], layer["lora_b"], config.scale(path))
      assert np.all(error <= 1.01 * 2.0 ** -8 * (np.abs(f32(v)) + np.abs(f32(w)))), path
  if config.use_dora:  # a zero kernel column whose V is zero stays zero; the other, recovered
    assert float(record["dense"]["lora_norm"][0]) == 0.0
    assert float(record["general"]["lora_norm"][0, 0]) > 0.0
    np.testing.assert_array_equal(back["dense"]["kernel"][:, 0], 0.0)


def test_dora_magnitude_zero_where_the_column_is_not_is_refused(adapted):
  """The merge zeroes such a column of the kernel: the base's column would be lost."""
  params = jax.tree.map(lambda x: x, adapted["dora"])
  params["general"]["lora_magnitude"] = params["general"]["lora_magnitude"].at[1, 2].set(0.0)
  with pytest.raises(ValueError, match="layer 'general': the DoRA magnitude is 0 on 1"):
    merge_reversibly(params, CONFIGS["dora"])


def test_merged_jitted_and_the_record_saved_with_orbax(adapted, tmp_path):
  config, params = CONFIGS["dora"], adapted["dora"]
  merged, record = merge_reversibly(params, config)
  jit_merged, jit_record = jax.jit(merge_reversibly, static_argnums=1)(params, config)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  jax.tree.map(close, (jit_merged, jit_record), (merged, record))
  jax.tree.map(close, jax.jit(unmerge)(merged, record), unmerge(merged, record))

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "record", record)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "record")
  jax.tree.map(np.testing.assert_array_equal, unmerge(merged, restored), unmerge(merged, record))


def test_switching_merged_adapters_equals_merging_into_the_base(base, adapted):
  """X -> Y -> X never reads the base: each equals merging into the original base."""
  x, y = (lj.split(adapted[n], CONFIGS[n])[0] for n in ("lora", "dora"))
  merged_x, record_x = merge_reversibly(adapted["lora"], CONFIGS["lora"])
  merged_y, record_y = switch_merged(merged_x, record_x, y, CONFIGS["dora"])
  want_y, want_record_y = merge_reversibly(adapted["dora"], CONFIGS["dora"])
  for got, want in ((merged_y, want_y), (record_y, want_record_y)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale_of(b)),
                 got, want)
  again_x, _ = switch_merged(merged_y, record_y, x, CONFIGS["lora"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=4e-6 * scale_of(b)),
               again_x, merged_x)
  assert again_x["stack"]["proj"]["bias"] is merged_x["stack"]["proj"]["bias"]


def test_a_quantized_base_comes_back_dense():
  mlp = nn.Sequential([nn.Dense(64), nn.Dense(64)])
  x = jnp.ones((1, 64))
  dense = random_like(jax.eval_shape(mlp.init, jax.random.key(0), x)["params"], 5)
  quantized = lj.quantize_params(dense, "int8")
  config = lj.LoRAConfig(rank=2, alpha=4.0)
  shapes = jax.eval_shape(lj.inject(mlp, config).init, jax.random.key(0), x)["params"]
  params = lj.combine(random_like(lj.split(shapes)[0], 6), quantized)
  back = unmerge(*merge_reversibly(params, config))
  want = lj.dequantize_params(quantized)
  for layer in ("layers_0", "layers_1"):
    w = want[layer]["kernel"]
    np.testing.assert_allclose(back[layer]["kernel"], w, rtol=0, atol=1e-6 * scale_of(w))


def test_trainable_params_stay_merged_and_must_be_replaced_when_switching(base, adapted):
  config = dataclasses.replace(CONFIGS["lora"], trainable=("dense/bias",))
  params = jax.tree.map(lambda a: a, adapted["lora"])
  params["dense"]["bias"] = params["dense"]["bias"] + 1.0
  merged, record = merge_reversibly(params, config)
  assert record["dense"]["bias"] is params["dense"]["bias"]
  np.testing.assert_array_equal(unmerge(merged, record)["dense"]["bias"], params["dense"]["bias"])
  y = lj.split(adapted["dora"], CONFIGS["dora"])[0]
  with pytest.raises(ValueError, match=r"trained \['dense/bias'\] fully"):
    switch_merged(merged, record, y, CONFIGS["dora"])


def snapshot(tree):
  return jax.tree.map(np.array, tree)


def test_unmerge_refuses_what_is_not_its_merge(base, adapted):
  merged, record = merge_reversibly(adapted["lora"], CONFIGS["lora"])
  other, other_record = merge_reversibly(adapted["dora"], CONFIGS["dora"])
  before = snapshot((merged, record))
  cases = [
      ((adapted["lora"], record), "the merged params hold adapters"),
      ((other, record), "'dense' is not the one this record merged"),
      ((merged, {"dense": record["dense"]} | {"x": {"lora_a": record["dense"]["lora_a"],
                                                    "lora_b": record["dense"]["lora_b"]}}),
       "record layer 'x' lacks lora_scale, merged_colsum"),
      ((merged, {"extra": record["dense"]}), "no kernel at 'extra'"),
      ((merged, {"dense": record["einsum"]}), "layer 'dense': .*another model"),
      ((base, {}), "the record holds no adapters"),
  ]
  for args, message in cases:
    with pytest.raises(ValueError, match=message):
      unmerge(*args)
  mlp = nn.Sequential([nn.Dense(8)])
  small = random_like(jax.eval_shape(mlp.init, jax.random.key(0), X)["params"], 3)
  with pytest.raises(ValueError, match="no kernel at 'dense'"):
    unmerge(small, record)
  with pytest.raises(ValueError, match="another merge"):
    switch_merged(other, record, lj.split(adapted["dora"], CONFIGS["dora"])[0], CONFIGS["dora"])
  jax.tree.map(np.testing.assert_array_equal, snapshot((merged, record)), before)
