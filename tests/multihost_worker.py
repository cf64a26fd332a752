"""One process of the multi-host test (see test_distributed.py), or the one-process reference.

Run as `python multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz` with
4 simulated CPU devices; process 0 writes the trained adapters.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import distributed, sharding, train
from lora_jax.models.llama import Llama, config_for

GLOBAL_BATCH = 16


def global_batch():
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(0, 256, (GLOBAL_BATCH, 16)).astype(np.int32)}


def train_tiny(steps: int = 3) -> dict[str, np.ndarray]:
  """A few sharded LoRA steps on a (2, 2, 2) mesh over every process's devices."""
  config = lj.LoRAConfig(rank=4, alpha=8.0)
  model = lj.inject(Llama(config_for("tiny", scan_layers=True)), config)
  ids = jnp.zeros((GLOBAL_BATCH, 16), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: x + 0.02 if kp[-1].key == "lora_b" else x, params)
  step = train.make_train_step(train.causal_lm_loss(model), optax.adamw(1e-3),
                               sharding.make_mesh(2, 2, 2), abstract, config)
  adapters, opt_state, base = step.place(params)
  rows = distributed.host_rows(step.batch_sharding, GLOBAL_BATCH)
  local = {k: v[rows] for k, v in global_batch().items()}  # only this host's share
  batch = distributed.host_batch(local, step.batch_sharding, GLOBAL_BATCH)
  for i in range(steps):
    adapters, opt_state, _ = step.step(adapters, opt_state, base, batch, jax.random.key(i))
  gathered = jax.jit(lambda a: a, out_shardings=sharding.replicated(step.batch_sharding.mesh))(
      adapters)
  flat = jax.tree_util.tree_leaves_with_path(gathered)
  return {jax.tree_util.keystr(kp): np.asarray(x.addressable_data(0)) for kp, x in flat}


if __name__ == "__main__":
  coordinator, num_processes, process_id, out = sys.argv[1:5]
  distributed.initialize(coordinator, int(num_processes), int(process_id))
  assert jax.process_count() == int(num_processes) and len(jax.devices()) == 8
  result = train_tiny()
  if jax.process_index() == 0:
    np.savez(out, **result)
  print(f"process {process_id}: done", flush=True)
