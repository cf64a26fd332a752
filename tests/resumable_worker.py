"""A small resumable LoRA training run, for the kill-and-resume tests (test_checkpoint.py).

`python resumable_worker.py RUN_DIR STEPS [SLEEP]`: trains the tiny Llama with LoRA
for STEPS steps, checkpointing every step into RUN_DIR/checkpoints and resuming
from there; prints `step N` after each step and writes RUN_DIR/final.npz at the end.
"""

import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import checkpoint, sharding, train
from lora_jax.models.llama import Llama, config_for

CONFIG = lj.LoRAConfig(rank=4, alpha=8.0, dropout_rate=0.1)  # dropout: the rng must resume too


def batch_at(position: int) -> dict[str, np.ndarray]:
  """The data loader: the batch at a position, the same on every run."""
  return {"input_ids": np.random.default_rng(position).integers(0, 256, (4, 16)).astype(np.int32)}


def main(run_dir: str, steps: int, sleep: float = 0.0) -> None:
  model = lj.inject(Llama(config_for("tiny", scan_layers=True)), CONFIG)
  ids = jnp.zeros((4, 16), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  ts = train.make_train_step(train.causal_lm_loss(model), optax.adamw(3e-3), sharding.make_mesh(),
                             abstract, CONFIG)
  adapters, opt_state, base = ts.place(
      nn.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"]))
  ckpt = checkpoint.TrainCheckpointer(Path(run_dir) / "checkpoints", CONFIG, save_every=1, keep=2)
  fresh = checkpoint.TrainState(0, adapters, opt_state, jax.random.key(1), {"position": 0})
  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  state = ckpt.restore(checkpoint.TrainState(0, shapes(adapters), shapes(opt_state),
                                             fresh.rng)) or fresh
  while state.step < steps:
    position = state.data["position"]
    batch = ts.shard_batch(batch_at(position))
    rng = jax.random.fold_in(state.rng, state.step)
    adapters, opt_state, _ = ts.step(state.adapters, state.opt_state, base, batch, rng)
    state = checkpoint.TrainState(state.step + 1, adapters, opt_state, state.rng,
                                  {"position": position + 1})
    ckpt.save(state)
    print(f"step {state.step}", flush=True)
    time.sleep(sleep)
  ckpt.close()
  np.savez(Path(run_dir) / "final.npz", **{jax.tree_util.keystr(kp): np.asarray(x)
                                           for kp, x in jax.tree_util.tree_leaves_with_path(
                                               state.adapters)})
  print("done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
