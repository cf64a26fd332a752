"""Invariants of the LoRA layers against flax's own linear layers."""

import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import host_random
import lora_jax as lj

# (name, plain layer factory, LoRA layer factory, input shape)
KINDS = {
    "dense": (lambda **kw: nn.Dense(5, **kw), lambda **kw: lj.LoRADense(5, **kw), (2, 3, 6)),
    "dense_general": (
        lambda **kw: nn.DenseGeneral((4, 5), axis=(-2, -1), **kw),
        lambda **kw: lj.LoRADenseGeneral((4, 5), axis=(-2, -1), **kw), (2, 3, 6)),
    "dense_general_batch": (
        lambda **kw: nn.DenseGeneral(4, axis=-1, batch_dims=(0,), **kw),
        lambda **kw: lj.LoRADenseGeneral(4, axis=-1, batch_dims=(0,), **kw), (2, 3, 6)),
    "dense_general_unsorted_axes": (
        lambda **kw: nn.DenseGeneral(4, axis=(-1, -2), **kw),
        lambda **kw: lj.LoRADenseGeneral(4, axis=(-1, -2), **kw), (2, 3, 6)),
    "einsum": (
        lambda **kw: nn.Einsum((6, 3, 5), "btd,dnh->btnh", **kw),
        lambda **kw: lj.LoRAEinsum((6, 3, 5), "btd,dnh->btnh", **kw), (2, 3, 6)),
    "einsum_interleaved": (
        lambda **kw: nn.Einsum((3, 6, 5), "btd,ndh->btnh", **kw),
        lambda **kw: lj.LoRAEinsum((3, 6, 5), "btd,ndh->btnh", **kw), (2, 3, 6)),
    "einsum_shared": (
        lambda **kw: nn.Einsum((3, 6, 4), "bnd,ndh->bnh", **kw),
        lambda **kw: lj.LoRAEinsum((3, 6, 4), "bnd,ndh->bnh", **kw), (2, 3, 6)),
    "einsum_ellipsis": (
        lambda **kw: nn.Einsum((6, 4), "...d,dh->...h", **kw),
        lambda **kw: lj.LoRAEinsum((6, 4), "...d,dh->...h", **kw), (2, 3, 6)),
}
THREE_KINDS = ["dense", "dense_general", "einsum"]


@pytest.fixture(autouse=True)
def strict_dtypes():
  """The layers promise no implicit dtype promotion (e.g. no bf16 -> f32)."""
  with jax.numpy_dtype_promotion("strict"):
    yield


def _inputs(shape, dtype=jnp.float32):
  return host_random.normal(1, shape, dtype)


def _perturb(params, seed=3, size=0.2):
  """Random non-zero values for every adapter leaf (drawn on the host: no compiles)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = lj.config.join_path(path).rsplit("/", 1)[-1]
    if name in ("lora_a", "lora_b"):
      leaf = host_random.nudge(leaf, 1000 * seed + i, size)
    elif name == "lora_magnitude":
      leaf = host_random.scale(leaf, 1000 * seed + i, size)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_zero_init_equals_plain_layer_bit_for_bit(kind, dtype, use_dora):
  plain_fn, lora_fn, shape = KINDS[kind]
  kw = dict(dtype=dtype, param_dtype=dtype)
  plain, lora = plain_fn(**kw), lora_fn(rank=2, use_dora=use_dora, **kw)
  x = _inputs(shape, dtype)
  params = lora.init(jax.random.key(0), x)
  plain_params = plain.init(jax.random.key(0), x)
  # The plain layer's params are exactly the LoRA layer's non-adapter params.
  adapters, base = lj.split(params)
  assert jax.tree.map(jnp.shape, base) == jax.tree.map(jnp.shape, plain_params)
  y_lora = lora.apply(params, x)
  y_plain = plain.apply(base, x)
  assert y_lora.dtype == y_plain.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y_lora, np.float32), np.asarray(y_plain, np.float32))
  # A checkpoint of the plain layer loads into the LoRA layer unchanged.
  y_loaded = lora.apply(lj.combine(adapters, plain_params), x)
  np.testing.assert_array_equal(
      np.asarray(y_loaded, np.float32), np.asarray(plain.apply(plain_params, x), np.float32))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merged_equals_unmerged(kind, variant):
  plain_fn, lora_fn, shape = KINDS[kind]
  opts = dict(rank=3, alpha=5.0, use_rslora=variant == "rslora", use_dora=variant == "dora")
  lora = lora_fn(**opts)
  x = _inputs(shape)
  params = _perturb(lora.init(jax.random.key(0), x))
  config = lj.LoRAConfig(**opts)
  merged = lj.merge(params["params"], config)
  y = lora.apply(params, x)
  y_merged = plain_fn().apply({"params": merged}, x)
  assert not np.allclose(y, plain_fn().apply(lj.split(params)[1], x), atol=1e-3)  # adapters matter
  np.testing.assert_allclose(y_merged, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_matches_hand_written_formula(use_rslora):
  rank, alpha = 4, 6.0
  layer = lj.LoRADense(3, rank=rank, alpha=alpha, use_rslora=use_rslora)
  x = _inputs((5, 7))
  params = _perturb(layer.init(jax.random.key(0), x))["params"]
  scale = alpha / (math.sqrt(rank) if use_rslora else rank)
  w, b, a, bb = (np.asarray(params[k], np.float64) for k in ("kernel", "bias", "lora_a", "lora_b"))
  expected = np.asarray(x, np.float64) @ w + b[None] + scale * (np.asarray(x, np.float64) @ a) @ bb
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
  assert layer.adapter_spec.scale == pytest.approx(scale)


def _dora_reference(params, x, scale):
  """DoRA as written in the paper: the weight norm is a constant for backprop."""
  w = params["kernel"] + scale * params["lora_a"] @ params["lora_b"]
  norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
  return (params["lora_magnitude"] / norm)[None] * (x @ w) + params["bias"][None]


def test_dora_forward_and_gradients_match_reference():
  layer = lj.LoRADense(4, rank=2, alpha=4.0, use_dora=True)
  x = _inputs((6, 5))
  params = _perturb(layer.init(jax.random.key(0), x))["params"]
  np.testing.assert_allclose(layer.apply({"params": params}, x),
                             _dora_reference(params, x, 2.0), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p)))
  grads = jax.grad(loss(lambda p: layer.apply({"params": p}, x)))(params)
  ref = jax.grad(loss(lambda p: _dora_reference(p, x, 2.0)))(params)
  for name in ("lora_a", "lora_b", "lora_magnitude"):
    np.testing.assert_allclose(grads[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_dora_magnitude_starts_at_column_norms():
  layer = lj.LoRADense(4, rank=2, use_dora=True)
  params = layer.init(jax.random.key(0), _inputs((2, 5)))["params"]
  np.testing.assert_allclose(params["lora_magnitude"], jnp.linalg.norm(params["kernel"], axis=0),
                             rtol=1e-6)


@pytest.mark.parametrize("fan_in", [16, 400])
def test_kaiming_init_within_peft_bound(fan_in):
  layer = lj.LoRADense(64, rank=32)
  params = layer.init(jax.random.key(0), jnp.ones((1, fan_in)))["params"]
  a, bound = np.asarray(params["lora_a"]), 1 / math.sqrt(fan_in)
  assert a.shape == (fan_in, 32)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.95 * bound  # spans the whole range, not a smaller one
  assert np.std(a) == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform's std
  assert not np.any(params["lora_b"])


def test_gaussian_init_std_is_one_over_rank():
  layer = lj.LoRADense(64, rank=16, a_init="gaussian")
  params = layer.init(jax.random.key(0), jnp.ones((1, 512)))["params"]
  assert np.std(params["lora_a"]) == pytest.approx(1 / 16, rel=0.05)
  assert np.mean(params["lora_a"]) == pytest.approx(0, abs=0.01)
  assert not np.any(params["lora_b"])


def test_adapter_dtype_defaults_to_float32_under_bf16_base():
  layer = lj.LoRADense(4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, use_dora=True)
  params = layer.init(jax.random.key(0), jnp.ones((1, 3), jnp.bfloat16))["params"]
  assert params["kernel"].dtype == jnp.bfloat16
  assert {params[k].dtype for k in ("lora_a", "lora_b", "lora_magnitude")} == {jnp.dtype("float32")}
  layer16 = lj.LoRADense(4, lora_dtype="bfloat16")
  assert layer16.init(jax.random.key(0), jnp.ones((1, 3)))["params"]["lora_a"].dtype == jnp.bfloat16


def test_bf16_base_matmul_is_not_upcast():
  layer = lj.LoRADense(8, rank=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x = jnp.ones((4, 16), jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  hlo = jax.jit(layer.apply).lower(params, x).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  assert len(dots) == 3  # base, x@A, h@B
  assert all("f32" not in line.split("=")[-1] or "bf16" in line for line in dots)
  assert not any("tensor<4x16xf32>" in line for line in dots)  # x never upcast
  assert layer.apply(params, x).dtype == jnp.bfloat16


def test_dropout_only_with_rng_and_not_deterministic():
  layer = lj.LoRADense(8, rank=4, dropout_rate=0.5)
  x = _inputs((4, 16))
  params = _perturb(layer.init(jax.random.key(0), x))
  y_eval = layer.apply(params, x)
  np.testing.assert_array_equal(y_eval, layer.apply(params, x, deterministic=True))
  np.testing.assert_array_equal(
      y_eval, layer.apply(params, x, deterministic=True, rngs={"dropout": jax.random.key(1)}))
  y1 = layer.apply(params, x, rngs={"dropout": jax.random.key(1)})
  y2 = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(y1, y_eval) and not np.allclose(y1, y2)
  # Dropout touches only the adapter path: with B = 0 the output is the base output.
  zero = layer.init(jax.random.key(0), x)
  np.testing.assert_array_equal(layer.apply(zero, x, rngs={"dropout": jax.random.key(1)}),
                                layer.apply(zero, x))
  with pytest.raises(ValueError, match="'dropout' rng"):
    layer.apply(params, x, deterministic=False)


def _dropped_input(x, key, rate):
  """The dropped-out input a top-level LoRA layer sees with this dropout key.

  A probe layer with A = B = identity and scale 1 outputs base(x) + dropout(x).
  """
  n = x.shape[-1]
  probe = lj.LoRADense(n, rank=n, alpha=float(n), dropout_rate=rate)
  params = probe.init(jax.random.key(0), x)
  params["params"]["lora_a"] = params["params"]["lora_b"] = jnp.eye(n)
  base = x @ params["params"]["kernel"] + params["params"]["bias"][None]
  return probe.apply(params, x, rngs={"dropout": key}) - base


def test_dora_with_dropout_follows_peft():
  rate, key = 0.3, jax.random.key(7)
  layer = lj.LoRADense(4, rank=2, alpha=2.0, use_dora=True, dropout_rate=rate)
  x = _inputs((6, 5))
  params = _perturb(layer.init(jax.random.key(0), x))
  p = params["params"]
  xd = _dropped_input(x, key, rate)
  assert np.any(np.isclose(np.asarray(xd), 0.0)) and not np.allclose(xd, x)
  w = p["kernel"] + p["lora_a"] @ p["lora_b"]
  g = (p["lora_magnitude"] / jnp.linalg.norm(w, axis=0))[None]
  base = x @ p["kernel"] + p["bias"][None]
  # PEFT: base(x) + (g - 1) * dropout(x) @ W + g * scale * dropout(x) @ A @ B
  expected = base + (g - 1) * (xd @ p["kernel"]) + g * ((xd @ p["lora_a"]) @ p["lora_b"])
  np.testing.assert_allclose(layer.apply(params, x, rngs={"dropout": key}), expected,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", THREE_KINDS)
def test_init_under_eval_shape_allocates_nothing(kind):
  _, lora_fn, shape = KINDS[kind]
  layer = lora_fn(rank=4, use_dora=True)
  abstract = jax.eval_shape(layer.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  leaves = jax.tree.leaves(abstract)
  assert leaves and all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)
  concrete = layer.init(jax.random.key(0), jnp.ones(shape))
  assert jax.tree.map(lambda l: (l.shape, l.dtype), abstract) == jax.tree.map(
      lambda l: (l.shape, l.dtype), concrete)


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "rank=0"),
    ("rank", 2.5, "rank=2.5"),
    ("alpha", 0.0, "alpha=0.0"),
    ("alpha", -1, "alpha=-1"),
    ("dropout_rate", 1.0, "dropout_rate=1.0"),
    ("dropout_rate", -0.1, "dropout_rate=-0.1"),
    ("a_init", "xavier", "a_init='xavier'"),
    ("lora_dtype", "int32", "lora_dtype='int32'"),
])
def test_invalid_layer_fields_raise_naming_the_field(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    lj.LoRADense(4, **{field: value})


@pytest.mark.parametrize("cls", [lj.LoRADense, lj.LoRADenseGeneral, lj.LoRAEinsum])
def test_lora_fields_are_keyword_only_and_flax_fields_kept(cls):
  plain = {lj.LoRADense: nn.Dense, lj.LoRADenseGeneral: nn.DenseGeneral,
           lj.LoRAEinsum: nn.Einsum}[cls]
  params = inspect.signature(cls).parameters
  lora_fields = ("rank", "alpha", "use_rslora", "dropout_rate", "a_init", "use_dora",
                 "lora_dtype", "deterministic")
  for name in lora_fields:
    assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
  plain_params = inspect.signature(plain).parameters
  assert [p for p in params if p not in lora_fields] == list(plain_params)


def test_scan_stacks_adapters_and_merge_understands_them():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      body = nn.scan(lambda mdl, c, _: (mdl(c), None), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)
      x, _ = body(lj.LoRADense(6, rank=2, use_dora=True, name="layer"), x, None)
      return x

  class PlainStack(nn.Module):
    @nn.compact
    def __call__(self, x):
      body = nn.scan(lambda mdl, c, _: (mdl(c), None), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)
      x, _ = body(nn.Dense(6, name="layer"), x, None)
      return x

  x = _inputs((2, 6))
  params = Stack().init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params["params"]["layer"]) == {
      "kernel": (3, 6, 6), "bias": (3, 6), "lora_a": (3, 6, 2), "lora_b": (3, 2, 6),
      "lora_magnitude": (3, 6)}
  params = _perturb(params)
  merged = lj.merge(params["params"], lj.LoRAConfig(rank=2, use_dora=True))
  np.testing.assert_allclose(PlainStack().apply({"params": merged}, x), Stack().apply(params, x),
                             rtol=1e-5, atol=1e-5)


def test_adapters_inherit_the_kernels_partitioning():
  """Annotated kernels give annotated adapters: never silently replicated."""
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
  layer = lj.LoRADense(6, rank=2, use_dora=True, kernel_init=init)
  specs = nn.get_partition_spec(layer.init(jax.random.key(0), jnp.ones((2, 4))))["params"]
  assert (specs["lora_a"], specs["lora_b"], specs["lora_magnitude"]) == (
      P("embed", None), P(None, "mlp"), P("mlp"))

  einsum_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                             ("heads", "embed", "kv"))
  layer = lj.LoRAEinsum((3, 4, 5), "btd,ndh->btnh", rank=2, use_bias=False,
                        kernel_init=einsum_init)
  specs = nn.get_partition_spec(layer.init(jax.random.key(0), jnp.ones((1, 2, 4))))["params"]
  assert specs["lora_a"] == P(None, "embed", None, None)
  assert specs["lora_b"] == P("heads", None, "kv", None)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      body = nn.scan(lambda mdl, c, _: (mdl(c), None), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2,
                     metadata_params={nn.PARTITION_NAME: "layers"})
      return body(lj.LoRADense(4, rank=2, kernel_init=init, name="layer"), x, None)[0]

  specs = nn.get_partition_spec(Stack().init(jax.random.key(0), jnp.ones((2, 4))))["params"]
  assert specs["layer"]["lora_a"] == P("layers", "embed", None)
  assert specs["layer"]["lora_b"] == P("layers", None, "mlp")


def test_dora_zero_init_exact_with_bf16_magnitude():
  x = _inputs((2, 5))
  layer = lj.LoRADense(8, rank=2, use_dora=True, lora_dtype="bfloat16")
  params = layer.init(jax.random.key(0), x)
  assert params["params"]["lora_magnitude"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(layer.apply(params, x),
                                nn.Dense(8).apply(lj.split(params)[1], x))
  merged = lj.merge(params["params"], lj.LoRAConfig(rank=2, use_dora=True))
  np.testing.assert_array_equal(merged["kernel"], params["params"]["kernel"])


def test_dora_small_magnitude_updates_survive_bf16_compute():
  """In bf16 the gain m/||W'|| is within 2**-7 of 1; gain - 1 must not round to 0."""
  x = _inputs((4, 16), jnp.bfloat16)
  layer = lj.LoRADense(32, rank=2, use_dora=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  nudged = jax.tree.map(lambda v: v, params)
  nudged["params"]["lora_magnitude"] = params["params"]["lora_magnitude"] * 1.003
  y0 = np.asarray(layer.apply(params, x), np.float32)
  y1 = np.asarray(layer.apply(nudged, x), np.float32)
  merged = lj.merge(nudged["params"], lj.LoRAConfig(rank=2, use_dora=True), dtype=jnp.float32)
  expected = np.asarray(x, np.float32) @ np.asarray(merged["kernel"]) + np.asarray(merged["bias"])[None]
  change, expected_change = y1 - y0, expected - y0
  assert np.abs(change).mean() > 0.5 * np.abs(expected_change).mean() > 0


@pytest.mark.parametrize("kind", ["dense", "einsum_interleaved"])
def test_dora_on_a_zero_output_column_is_finite_and_starts_as_the_base(kind):
  """Zero-initialised projections (adaLN-Zero, zero residual branches): no 0/0."""
  plain_fn, lora_fn, shape = KINDS[kind]
  x = host_random.normal(0, shape)
  init = lambda key, shape, dtype: nn.initializers.lecun_normal()(key, shape, dtype).at[..., 0].set(0)
  layer = lora_fn(rank=2, use_dora=True, kernel_init=init)
  params = jax.jit(layer.init)(jax.random.key(1), x)["params"]
  assert float(jnp.abs(params["lora_magnitude"][..., 0]).max()) == 0.0
  apply = jax.jit(lambda p: layer.apply({"params": p}, x))
  base = plain_fn().apply({"params": {k: params[k] for k in ("kernel", "bias")}}, x)
  y = apply(params)
  np.testing.assert_allclose(y, base, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(y[..., 0]).max()) == 0.0  # the zero column stays the base's zero
  grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["lora_b"]).max()) > 0  # the zero column trains, as plain LoRA
  config = lj.LoRAConfig(rank=2, use_dora=True)
  merged = lj.merge(params, config)
  np.testing.assert_allclose(merged["kernel"], params["kernel"], rtol=1e-6, atol=1e-7)
  trained = _perturb(params)
  np.testing.assert_allclose(plain_fn().apply({"params": lj.merge(trained, config)}, x),
                             apply(trained), rtol=1e-5, atol=1e-5)
