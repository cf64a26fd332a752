"""The sharded train step on 8 simulated devices: equal to one device, compiled once."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import sharding, train
from lora_jax.models.llama import Llama, config_for

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 16)), jnp.int32)
MASK = jnp.asarray(np.arange(16)[None, :] < np.array([16, 12] * 8)[:, None], jnp.int32)
BATCH = {"input_ids": IDS, "attention_mask": MASK}


@functools.cache
def setup(scan=True, config=lj.LoRAConfig(rank=4, alpha=8.0), **llama_overrides):
  """An injected tiny Llama, its abstract params, and concrete params with live adapters."""
  model = lj.inject(Llama(config_for("tiny", scan_layers=scan, **llama_overrides)), config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  params = nn.unbox(model.init(jax.random.key(0), IDS)["params"])
  # B = 0 would make A's gradient zero: start from a trained-looking adapter.
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: x + 0.02 if kp[-1].key == "lora_b" else x, params)
  return model, config, abstract, params


@functools.cache
def trainer(shape, accum_steps=1, scan=True):
  model, config, abstract, _ = setup(scan)
  mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
  return train.make_train_step(train.causal_lm_loss(model), optax.adamw(1e-3), mesh, abstract,
                               config, accum_steps=accum_steps)


def run(t, steps=1, scan=True):
  params = setup(scan)[3]
  adapters, opt_state, base = t.place(params)
  batch = t.shard_batch(BATCH)
  for i in range(steps):
    adapters, opt_state, metrics = t.step(adapters, opt_state, base, batch, jax.random.key(i))
  return jax.tree.map(np.asarray, adapters), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def single_device():
  return run(trainer((1, 1, 1)))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)], ids=str)
def test_sharded_step_equals_single_device_step(shape, single_device):
  adapters, metrics = run(trainer(shape))
  ref_adapters, ref_metrics = single_device
  assert metrics["tokens"] == ref_metrics["tokens"] == 16 * 15 - 8 * 4
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(ref_adapters)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The step changed the adapters (a test that moves nothing proves nothing).
  start = lj.split(setup()[3])[0]
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(adapters),
                                                   jax.tree.leaves(start)))


def test_compiled_once_no_host_round_trips_base_not_returned():
  t = trainer((2, 2, 2))
  _, metrics = run(t, steps=3)
  assert t.step._cache_size() == 1  # three steps, one compilation
  adapters, opt_state, base = t.place(setup()[3])
  compiled = t.step.lower(adapters, opt_state, base, t.shard_batch(BATCH),
                          jax.random.key(0)).compile()
  hlo = compiled.as_text()
  for marker in ("callback", "outfeed", "infeed", "send(", "recv("):
    assert marker not in hlo, marker
  mem = compiled.memory_analysis()
  per_device = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                                for s in x.addressable_shards[:1])
  trained = per_device(adapters) + per_device(opt_state)
  assert mem.output_size_in_bytes < trained + 1024  # no copy of the base comes out
  assert per_device(base) > trained + 1024  # so a copy of the base could not hide
  assert mem.alias_size_in_bytes >= per_device(adapters)  # donated buffers are reused


def test_gradient_accumulation_equals_full_batch():
  full, m_full = run(trainer((2, 2, 2)))
  accumulated, m_acc = run(trainer((2, 2, 2), accum_steps=2))
  assert m_full["tokens"] == m_acc["tokens"]
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_must_divide_by_the_data_axes():
  t = trainer((2, 2, 2), accum_steps=2)
  adapters, opt_state, base = t.place(setup()[3])
  small = t.shard_batch({"input_ids": IDS[:4]})  # 4 rows: 2 micro-batches of 2 on 4 shards
  with pytest.raises(ValueError, match=r"divisible by accum_steps \(2\) x the data and fsdp"):
    t.step(adapters, opt_state, base, small, jax.random.key(0))


def test_bf16_compute_with_fp32_adapters_learns():
  config = lj.LoRAConfig(rank=4, alpha=8.0)
  model = lj.inject(Llama(config_for("tiny", dtype="bfloat16", param_dtype="bfloat16")), config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  params = nn.unbox(model.init(jax.random.key(0), IDS)["params"])
  dtypes = {kp[-1].key: x.dtype for kp, x in jax.tree_util.tree_leaves_with_path(params)}
  assert dtypes["kernel"] == jnp.bfloat16 and dtypes["lora_a"] == jnp.float32
  t = train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-2),
                            sharding.make_mesh(2, 2, 2), abstract, config)
  adapters, opt_state, base = t.place(params)
  batch = t.shard_batch({"input_ids": IDS[:, :8]})
  losses = []
  for i in range(8):
    adapters, opt_state, metrics = t.step(adapters, opt_state, base, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.1
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))


def _compiled_step(model, config, mesh):
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  t = train.make_train_step(train.causal_lm_loss(model), optax.adamw(1e-3), mesh, abstract, config)
  adapters, opt_state, base = t.place(nn.unbox(model.init(jax.random.key(0), IDS)["params"]))
  return t.step.lower(adapters, opt_state, base, t.shard_batch(BATCH), jax.random.key(0)).compile()


def test_lora_moves_few_more_collective_bytes_than_the_frozen_model():
  """The reference trains only the first norm's scale: the same forward and backward
  through the frozen model, without adapters. LoRA may add O(tokens x rank) per layer."""
  shape, rank = (1, 2, 4), 4
  mesh = sharding.make_mesh(*shape)
  lora_config = lj.LoRAConfig(rank=rank)
  llama = Llama(config_for("tiny"))
  lora = sharding.collective_bytes(_compiled_step(lj.inject(llama, lora_config), lora_config, mesh))
  ref = sharding.collective_bytes(
      _compiled_step(llama, lj.LoRAConfig(trainable=["layers_0/input_layernorm"]), mesh))
  lora_bytes, ref_bytes = sum(lora.values()), sum(ref.values())
  tokens = IDS.size // (shape[0] * shape[1])  # per device: the batch is split over data x fsdp
  n_adapted = 2 * 7
  adapter_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(
      lj.split(setup(scan=False)[3])[0]))
  bound = ref_bytes + n_adapted * 4 * (tokens * rank * 4) + 2 * adapter_bytes
  print(f"collective bytes per device: LoRA {lora_bytes:,} ({lora}), frozen {ref_bytes:,}, "
        f"bound {bound:,}")
  assert ref_bytes > 0
  assert lora_bytes <= bound


def test_explicit_axis_mesh_works():
  from jax.sharding import AxisType
  model, config, abstract, params = setup(scan=False)
  t = train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-3),
                            sharding.make_mesh(2, 2, 2, axis_types=AxisType.Explicit), abstract,
                            config)
  adapters, opt_state, base = t.place(params)
  _, _, metrics = t.step(adapters, opt_state, base, t.shard_batch(BATCH), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))


def test_trainable_rule_typo_is_refused():
  model, _, abstract, _ = setup()
  with pytest.raises(ValueError, match="trainable rule 'lm_haed' matches no param"):
    train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-3), sharding.make_mesh(),
                          abstract, lj.LoRAConfig(rank=4, alpha=8.0, trainable=["lm_haed"]))
