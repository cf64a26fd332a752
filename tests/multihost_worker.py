"""One process of the multi-host test (see test_distributed.py), or the one-process reference.

Run as `python multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID HF_DIR OUT_DIR` with
4 simulated CPU devices: every process reads its shards of the transformers checkpoint
HF_DIR, they train together, then export the merged model to OUT_DIR/merged (process 0
writes) and process 0 writes the trained adapters to OUT_DIR/adapters.npz. Then they
train a stack of two adapters on mixed rows together, and process 0 writes it to
OUT_DIR/stack.npz.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import distributed, hf, sharding, train

GLOBAL_BATCH = 16


def global_batch():
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(0, 256, (GLOBAL_BATCH, 16)).astype(np.int32)}


def train_tiny(hf_dir: str, merged_dir: str, steps: int = 3) -> dict[str, np.ndarray]:
  """A few sharded LoRA steps on a (2, 2, 2) mesh over every process's devices.

  The base comes from a transformers checkpoint, read shard by shard; the merged
  model goes back to one.
  """
  config = lj.LoRAConfig(rank=4, alpha=8.0)
  mesh = sharding.make_mesh(2, 2, 2)
  plain, base = hf.load_llama(hf_dir, mesh=mesh, scan_layers=True)
  model = lj.inject(plain, config)
  ids = jnp.zeros((GLOBAL_BATCH, 16), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: x + 0.02 if kp[-1].key == "lora_b" else x, params)
  params = lj.combine(lj.split(params)[0], base)
  step = train.make_train_step(train.causal_lm_loss(model), optax.adamw(1e-3), mesh, abstract,
                               config)
  adapters, opt_state, base = step.place(params)
  rows = distributed.host_rows(step.batch_sharding, GLOBAL_BATCH)
  local = {k: v[rows] for k, v in global_batch().items()}  # only this host's share
  batch = distributed.host_batch(local, step.batch_sharding, GLOBAL_BATCH)
  for i in range(steps):
    adapters, opt_state, _ = step.step(adapters, opt_state, base, batch, jax.random.key(i))
  hf.export_merged_safetensors(merged_dir, lj.combine(adapters, base), config,
                               model_config=plain.config)
  return _gathered(adapters, mesh)


def train_stack(hf_dir: str, steps: int = 2) -> dict[str, np.ndarray]:
  """Two stacked adapters (different ranks, targets, rsLoRA) trained in one step from
  mixed rows (`train.MixedLoss`) on a (2, 2, 2) mesh over every process's devices."""
  mesh = sharding.make_mesh(2, 2, 2)
  plain, base = hf.load_llama(hf_dir, mesh=mesh, scan_layers=True)
  ids = jnp.zeros((GLOBAL_BATCH, 16), jnp.int32)
  rng = np.random.default_rng(1)  # the same values on every host
  members = {}
  for name, config in {"a": lj.LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"]),
                       "b": lj.LoRAConfig(rank=2, use_rslora=True, targets=["o_proj"])}.items():
    shapes = jax.eval_shape(lj.inject(plain, config).init, jax.random.key(0), ids)["params"]
    members[name] = (jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(x.dtype),
                                  lj.split(nn.unbox(shapes), config)[0]), config)
  stack = lj.stack_adapters(plain, members, ids[:1])
  model = lj.inject(plain, stack.spec)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  step = train.make_train_step(train.MixedLoss(model, stack.spec.count), optax.sgd(0.5), mesh,
                               abstract, layouts=dict(stack.layouts))
  adapters, opt_state, base = step.place(lj.combine(stack.params, base))
  rows = distributed.host_rows(step.batch_sharding, GLOBAL_BATCH)
  local = {"input_ids": global_batch()["input_ids"][rows],
           "adapter_ids": (np.arange(GLOBAL_BATCH) % 3 - 1).astype(np.int32)[rows]}  # -1: base
  batch = distributed.host_batch(local, step.batch_sharding, GLOBAL_BATCH)
  for i in range(steps):
    adapters, opt_state, _ = step.step(adapters, opt_state, base, batch, jax.random.key(i))
  return _gathered(adapters, mesh)


def _gathered(tree, mesh) -> dict[str, np.ndarray]:
  """Every leaf whole on this host, by its path."""
  gathered = jax.jit(lambda a: a, out_shardings=sharding.replicated(mesh))(tree)
  flat = jax.tree_util.tree_leaves_with_path(gathered)
  return {jax.tree_util.keystr(kp): np.asarray(x.addressable_data(0)) for kp, x in flat}


if __name__ == "__main__":
  coordinator, num_processes, process_id, hf_dir, out = sys.argv[1:6]
  distributed.initialize(coordinator, int(num_processes), int(process_id))
  assert jax.process_count() == int(num_processes) and len(jax.devices()) == 8
  result = train_tiny(hf_dir, f"{out}/merged")
  stack = train_stack(hf_dir)
  if jax.process_index() == 0:
    np.savez(f"{out}/adapters.npz", **result)
    np.savez(f"{out}/stack.npz", **stack)
  print(f"process {process_id}: done", flush=True)
