"""LoRA on a quantized frozen base: the same outputs and adapter gradients as on the
dequantized float base, for injected models (scanned or not), LoRA layers and DoRA."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import host_random
import lora_jax as lj
from lora_jax import quantize as q, quantized_base as qb
from lora_jax.layers import LoRADense, LoRADenseGeneral, LoRAEinsum
from lora_jax.models.llama import Llama, config_for, stack_layers

TINY = config_for("tiny", vocab_size=320)
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, 320)


def trained(params):
  """Adapters moved off their zero start, so the update is not trivially zero."""
  def move(kp, x):
    name = getattr(kp[-1], "key", "")
    if name == "lora_b":
      return host_random.normal(len(kp), x.shape, x.dtype, std=0.05)  # no compile per shape
    return x
  return jax.tree_util.tree_map_with_path(move, params)


@pytest.fixture(scope="module")
def base():
  return Llama(TINY).init(jax.random.key(0), IDS)["params"]


@pytest.mark.parametrize("fmt, scan", [("nf4", False), ("nf4", True), ("int4", False),
                                       ("int8", True)])
def test_quantized_base_gives_the_dequantized_base_outputs_and_gradients(base, fmt, scan):
  config = lj.LoRAConfig(rank=4, alpha=8, targets="all-linear")
  llama = Llama(dataclasses.replace(TINY, scan_layers=scan))
  plain = stack_layers(base) if scan else base
  quantized = qb.quantize_params(plain, fmt)
  dense = qb.dequantize_params(quantized)
  model = lj.inject(llama, config)
  adapters, _ = lj.split(trained(lj.init_adapters(model, dense, jax.random.key(2), IDS)), config)

  def loss(adapters, frozen, x):
    logits = model.apply({"params": lj.combine(adapters, frozen)}, IDS)
    return jnp.mean((logits * x) ** 2)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
  x = jnp.ones((1, 1, 320), jnp.float32)
  (v_q, (g_q, gx_q)), (v_d, (g_d, gx_d)) = grad(adapters, quantized, x), grad(adapters, dense, x)
  np.testing.assert_allclose(v_q, v_d, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gx_q, gx_d, rtol=1e-5, atol=1e-7)
  # ... and the quantized base is not the float one: the loss moved.
  original = loss(adapters, plain, x)
  assert abs(float(original) - float(v_q)) > 1e-7 * abs(float(original))


def test_lora_layer_and_dora_on_a_quantized_kernel():
  x = host_random.normal(0, (3, 64))
  for layer in (LoRADense(16, rank=2), LoRADense(16, rank=2, use_dora=True)):
    params = trained(layer.init(jax.random.key(1), x)["params"])
    quantized = {**params, "kernel": q.quantize(params["kernel"], "nf4")}
    dense = {**params, "kernel": quantized["kernel"].dequantize()}
    np.testing.assert_allclose(layer.apply({"params": quantized}, x),
                               layer.apply({"params": dense}, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make, x_shape", [
    (lambda: LoRADenseGeneral((4, 8), axis=-1, rank=2), (3, 64)),        # kernel (64, 4, 8)
    (lambda: LoRADenseGeneral(16, axis=(-2, -1), rank=2), (3, 4, 32)),   # kernel (4, 32, 16)
    (lambda: LoRAEinsum((64, 2, 16), "btd,dnh->btnh", rank=2), (2, 3, 64)),
    (lambda: LoRAEinsum((64, 2, 16), "btd,dnh->btnh", rank=2, use_dora=True), (2, 3, 64)),
])
def test_dense_general_and_einsum_layers_on_quantized_kernels(make, x_shape):
  """Blocks run along the kernel's second-last axis whatever it means; the layer computes
  on exactly the dequantized kernel."""
  layer, x = make(), host_random.normal(0, x_shape)
  params = trained(layer.init(jax.random.key(1), x)["params"])
  quantized = {**params, "kernel": q.quantize(params["kernel"], "nf4", block=2)}
  dense = {**params, "kernel": quantized["kernel"].dequantize()}
  assert np.abs(np.asarray(dense["kernel"]) - np.asarray(params["kernel"])).max() > 0
  np.testing.assert_allclose(layer.apply({"params": quantized}, x),
                             layer.apply({"params": dense}, x), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_dequantizes_to_bfloat16(base):
  config = lj.LoRAConfig(rank=4, alpha=8, targets=["q_proj"])
  model = lj.inject(Llama(dataclasses.replace(TINY, dtype=jnp.bfloat16)), config)
  quantized = qb.quantize_params(base, "nf4")
  params = lj.init_adapters(model, quantized, jax.random.key(2), IDS)
  logits = jax.jit(model.apply)({"params": params}, IDS)
  assert np.isfinite(np.asarray(logits)).all()
  hlo = jax.jit(model.apply).lower({"params": params}, IDS).as_text()
  assert "bf16" in hlo


def test_tree_functions_see_a_quantized_kernel_as_its_weights(base):
  config = lj.LoRAConfig(rank=4, alpha=8, targets="all-linear")
  model = lj.inject(Llama(TINY), config)
  quantized = qb.quantize_params(base, "nf4")
  params = trained(lj.init_adapters(model, quantized, jax.random.key(1), IDS))
  dense = qb.dequantize_params(params)
  assert lj.count(params, config) == lj.count(dense, config)
  adapters, frozen = lj.split(params, config)
  assert q.is_quantized(nn.unbox(frozen)["layers_0"]["mlp"]["up_proj"]["kernel"])
  assert jax.tree.structure(lj.combine(adapters, frozen), is_leaf=q.is_quantized) == \
      jax.tree.structure(params, is_leaf=q.is_quantized)
  # Merge path (a): dequantize, merge in float32 = merging into the dequantized base.
  merged, expected = lj.merge(params, config), lj.merge(dense, config)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert not any(q.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=q.is_quantized))
  np.testing.assert_allclose(Llama(TINY).apply({"params": merged}, IDS),
                             model.apply({"params": params}, IDS), rtol=1e-5, atol=1e-5)


def test_sharded_quantized_base_equals_unsharded(base):
  """Codes and absmax split over the fsdp axis like their kernel (block 8: whole blocks
  per shard); the step's outputs equal the single-device ones."""
  config = lj.LoRAConfig(rank=4, alpha=8, targets="all-linear")
  llama = Llama(TINY)
  model = lj.inject(llama, config)
  mesh = lj.sharding.make_mesh(1, 8, 1)
  boxed = jax.eval_shape(llama.init, jax.random.key(0), IDS)["params"]
  quantized = qb.quantize_params(base, "nf4", block=8)
  shardings = qb.quantized_shardings(quantized, lj.sharding.param_shardings(boxed, mesh))
  # The boxed quantized tree shards itself the same way.
  assert shardings == lj.sharding.param_shardings(quantized, mesh)
  quantized = nn.unbox(quantized)
  spec = shardings["layers_0"]["mlp"]["down_proj"]["kernel"].codes.spec
  assert "fsdp" in jax.tree.leaves(tuple(spec))
  placed = jax.device_put(quantized, shardings)
  adapters, _ = lj.split(trained(lj.init_adapters(model, quantized, jax.random.key(2), IDS)),
                         config)
  apply = jax.jit(lambda a, f: model.apply({"params": lj.combine(a, f)}, IDS))
  np.testing.assert_allclose(apply(adapters, placed), apply(adapters, quantized),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="a block would straddle two shards"):
    qb.quantized_shardings(qb.quantize_params(base, "nf4", block=32),
                          lj.sharding.param_shardings(boxed, mesh))


def test_a_scanned_step_dequantizes_layer_by_layer_inside_the_loop():
  """XLA must not hoist the (loop-invariant) dequantization of the stacked base out of the
  layer loop: every unpacking of codes in the compiled step is of one layer's slice."""
  config = dataclasses.replace(TINY, scan_layers=True, remat="full", num_layers=3)
  llama = Llama(config)
  ids = jnp.zeros((2, 16), jnp.int32)
  quantized = qb.quantize_params(llama.init(jax.random.key(0), ids)["params"], "nf4")
  lora = lj.LoRAConfig(rank=4, alpha=8, targets="all-linear")
  model = lj.inject(llama, lora)
  adapters, frozen = lj.split(lj.init_adapters(model, quantized, jax.random.key(1), ids), lora)
  loss = lambda a, f: jnp.mean(model.apply({"params": lj.combine(a, f)}, ids) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(adapters, frozen).compile().as_text()
  unpacks = [line for line in hlo.splitlines() if "shift-right-logical(" in line]
  assert unpacks                                         # the dequantization is there...
  stacked = [line for line in unpacks if re.search(r"= u8\[3,", line)]
  assert not stacked, stacked[:2]                        # ...never of the whole stack
  assert all("while/body" in line for line in unpacks)


def test_a_quantized_base_round_trips_through_orbax_bit_exactly(base, tmp_path):
  from lora_jax import checkpoint
  mixed = nn.unbox(qb.quantize_params(stack_layers(base), "nf4", block=8,
                                      exclude=("lm_head", "q_proj")))
  mixed["lm_head"]["kernel"] = q.quantize(base["lm_head"]["kernel"], "int8")
  checkpoint.save_base(tmp_path / "base", mixed)
  back = checkpoint.load_base(tmp_path / "base")
  assert jax.tree.structure(back) == jax.tree.structure(mixed)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(mixed)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  mesh = lj.sharding.make_mesh(1, 8, 1)
  boxed = jax.eval_shape(Llama(dataclasses.replace(TINY, scan_layers=True)).init,
                         jax.random.key(0), IDS)["params"]
  shardings = qb.quantized_shardings(mixed, lj.sharding.param_shardings(boxed, mesh))
  placed = checkpoint.load_base(tmp_path / "base", shardings=shardings)
  codes = placed["layers"]["mlp"]["down_proj"]["kernel"].codes
  assert codes.sharding == shardings["layers"]["mlp"]["down_proj"]["kernel"].codes
  with pytest.raises(FileExistsError):
    checkpoint.save_base(tmp_path / "base", mixed)
  with pytest.raises(FileNotFoundError, match="holds no frozen base"):
    checkpoint.load_base(tmp_path)


def test_a_train_step_on_a_sharded_quantized_base_equals_one_device(base):
  """`make_train_step` takes the quantized base as it takes a float one: its boxed kernels
  shard by their logical axes, and 8 devices give the one-device step."""
  import optax

  from lora_jax import train
  config = lj.LoRAConfig(rank=4, alpha=8, targets="all-linear")
  model = lj.inject(Llama(TINY), config)
  quantized = qb.quantize_params(base, "nf4", block=8)
  params = lj.init_adapters(model, quantized, jax.random.key(2), IDS)
  ids = jax.random.randint(jax.random.key(3), (8, 8), 0, 320)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
  results = []
  for shape in ((1, 1, 1), (1, 8, 1)):
    mesh = lj.sharding.make_mesh(*shape, devices=jax.devices()[:shape[1]])
    step = train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-2), mesh, params,
                                 config)
    adapters, opt_state, frozen = step.place(nn.unbox(params))
    if shape[1] == 8:
      codes = frozen["layers_0"]["mlp"]["up_proj"]["kernel"].codes
      assert len(codes.sharding.device_set) == 8 and not codes.sharding.is_fully_replicated
      # FSDP gathers each kernel's 4-bit codes and dequantizes after: no float kernel
      # crosses the wire.
      hlo = step.step.lower(adapters, opt_state, frozen, batch, jax.random.key(0)
                            ).compile().as_text()
      gathered = [re.search(r"= (\w+)\[([\d,]*)\]", line).groups()
                  for line in hlo.splitlines() if " all-gather(" in line]
      kernels = {tuple(x.shape) for x in jax.tree.leaves(frozen, is_leaf=q.is_quantized)
                 if q.is_quantized(x)}
      assert any(kind == "u8" for kind, _ in gathered)
      floats = {tuple(int(d) for d in dims.split(",")) for kind, dims in gathered
                if kind in ("f32", "bf16")}
      assert not floats & kernels, floats & kernels
    for i in range(2):
      adapters, opt_state, metrics = step.step(adapters, opt_state, frozen, batch,
                                               jax.random.key(i))
    results.append((adapters, float(metrics["loss"])))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
