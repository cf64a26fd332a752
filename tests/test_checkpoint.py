"""Orbax checkpoints: adapters, training state, merged export, and surviving kills."""

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj
from lora_jax import checkpoint, sharding, train
from lora_jax.models.llama import Llama, config_for

CONFIG = lj.LoRAConfig(rank=4, alpha=8.0, use_dora=True, trainable=["norm"])
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 8)), jnp.int32)
WORKER = Path(__file__).with_name("resumable_worker.py")


@pytest.fixture(scope="module")
def llama():
  return Llama(config_for("tiny", scan_layers=True))


@pytest.fixture(scope="module")
def params(llama):
  model = lj.inject(llama, CONFIG)
  p = nn.unbox(model.init(jax.random.key(0), IDS)["params"])
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: x + 0.01 if kp[-1].key == "lora_b" else x, p)


def _files_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_adapter_round_trip_is_small_and_exact(tmp_path, params):
  adapters, base = lj.split(params, CONFIG)
  checkpoint.save_adapter(tmp_path / "adapter", params, CONFIG)
  plain = lj.split(params)[1]  # the plain model's params: the target
  restored, config = checkpoint.load_adapter(tmp_path / "adapter", target=plain)
  assert config == CONFIG
  assert jax.tree.structure(restored) == jax.tree.structure(adapters)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(a, b)
  leaf_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
  assert _files_bytes(tmp_path / "adapter") <= 1.1 * leaf_bytes + 16_384
  assert leaf_bytes < base_bytes  # the base is not in there
  assert "norm" in restored  # the trainable extra is
  # The base side of split(params, config) lacks the trainable params: still a valid target.
  checkpoint.load_adapter(tmp_path / "adapter", target=base)


def test_adapter_never_overwrites_and_missing_is_clear(tmp_path, params):
  checkpoint.save_adapter(tmp_path / "a", params, CONFIG)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    checkpoint.save_adapter(tmp_path / "a", params, CONFIG)
  checkpoint.save_adapter(tmp_path / "a", params, CONFIG, overwrite=True)
  with pytest.raises(FileNotFoundError, match="holds no lora_jax adapter checkpoint"):
    checkpoint.load_adapter(tmp_path / "nothing")


def test_adapter_that_does_not_fit_names_the_path(tmp_path, params):
  checkpoint.save_adapter(tmp_path / "a", params, CONFIG)
  other = Llama(config_for("tiny", scan_layers=True, intermediate_size=96))
  base = nn.unbox(jax.eval_shape(other.init, jax.random.key(0), IDS)["params"])
  with pytest.raises(ValueError, match="adapter 'layers/mlp/down_proj/lora_a' does not fit "
                     "kernel \\(2, 96, 64\\)"):
    checkpoint.load_adapter(tmp_path / "a", target=base)
  unscanned = nn.unbox(jax.eval_shape(Llama(config_for("tiny")).init, jax.random.key(0),
                                      IDS)["params"])
  with pytest.raises(ValueError, match="adapter 'layers' has no layer in the base params"):
    checkpoint.load_adapter(tmp_path / "a", target=unscanned)


def test_a_target_holding_adapters_defines_what_fits(tmp_path, params, llama):
  """A rank-4 adapter must not load silently into params that hold rank-8 adapters."""
  checkpoint.save_adapter(tmp_path / "a", params, CONFIG)
  rank8 = lj.LoRAConfig(rank=8, alpha=8.0, use_dora=True, trainable=["norm"])
  held = nn.unbox(jax.eval_shape(lj.inject(llama, rank8).init, jax.random.key(0), IDS)["params"])
  with pytest.raises(ValueError, match="adapter 'layers/mlp/down_proj/lora_a' has shape "
                     "\\(2, 128, 4\\), the target's adapter there has \\(2, 128, 8\\)"):
    checkpoint.load_adapter(tmp_path / "a", target=held)
  fewer = lj.LoRAConfig(rank=4, alpha=8.0, use_dora=True, trainable=["norm"], targets=["q_proj"])
  held = nn.unbox(jax.eval_shape(lj.inject(llama, fewer).init, jax.random.key(0), IDS)["params"])
  with pytest.raises(ValueError, match="the target holds adapters, and the target lacks adapter "
                     "'layers/mlp/down_proj/lora_a'"):
    checkpoint.load_adapter(tmp_path / "a", target=held)
  checkpoint.load_adapter(tmp_path / "a", target=params)  # its own adapters fit


def test_adapter_loads_onto_a_mesh(tmp_path, params, llama):
  checkpoint.save_adapter(tmp_path / "a", params, CONFIG)
  model = lj.inject(llama, CONFIG)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  ts = train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-3),
                             sharding.make_mesh(2, 2, 2), abstract, CONFIG)
  restored, _ = checkpoint.load_adapter(tmp_path / "a", shardings=ts.adapter_shardings)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(ts.adapter_shardings)):
    assert x.sharding == s


_ONE_DEVICE_READER = """
import sys
import numpy as np
from lora_jax import checkpoint
adapters, _ = checkpoint.load_adapter(sys.argv[1])
base = checkpoint.load_base(sys.argv[2])
import jax
print(len(jax.devices()), repr(sum(float(np.abs(np.asarray(x, np.float64)).sum())
                                   for x in jax.tree.leaves((adapters, base)))))
"""


def test_what_eight_devices_wrote_loads_on_one(tmp_path, params, llama):
  # A run's adapter (and base), sharded over a mesh of 8, read by a one-device process.
  model = lj.inject(llama, CONFIG)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  ts = train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-3),
                             sharding.make_mesh(2, 2, 2), abstract, CONFIG)
  adapters, _, base = ts.place(params)
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(base))
  checkpoint.save_adapter(tmp_path / "a", adapters, CONFIG)
  checkpoint.save_base(tmp_path / "base", base)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", _ONE_DEVICE_READER, str(tmp_path / "a"),
                        str(tmp_path / "base")], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  devices, total = out.stdout.split()
  expected = sum(float(np.abs(np.asarray(x, np.float64)).sum())
                 for x in jax.tree.leaves((adapters, base)))
  assert (int(devices), float(total)) == (1, expected)


def test_merged_export_restores_into_the_plain_model(tmp_path, params, llama):
  checkpoint.export_merged(tmp_path / "merged", params, CONFIG)
  abstract = nn.unbox(jax.eval_shape(llama.init, jax.random.key(0), IDS)["params"])
  restored = ocp.StandardCheckpointer().restore(tmp_path / "merged", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  np.testing.assert_allclose(llama.apply({"params": restored}, IDS),
                             lj.inject(llama, CONFIG).apply({"params": params}, IDS),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(FileExistsError):
    checkpoint.export_merged(tmp_path / "merged", params, CONFIG)


def test_merged_export_from_a_sharded_tree_stays_sharded(tmp_path, params, llama):
  model = lj.inject(llama, CONFIG)
  shardings = sharding.param_shardings(
      jax.eval_shape(model.init, jax.random.key(0), IDS)["params"], sharding.make_mesh(1, 2, 4))
  placed = jax.device_put(params, shardings)
  checkpoint.export_merged(tmp_path / "merged", placed, CONFIG, dtype=jnp.bfloat16)
  plain_shardings = sharding.param_shardings(
      jax.eval_shape(llama.init, jax.random.key(0), IDS)["params"], sharding.make_mesh(1, 2, 4))
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=sh),
                          nn.unbox(jax.eval_shape(llama.init, jax.random.key(0), IDS)["params"]),
                          plain_shardings)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "merged", abstract)
  kernel = restored["layers"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.dtype == jnp.bfloat16 and kernel.sharding == (
      plain_shardings["layers"]["self_attn"]["q_proj"]["kernel"])


@pytest.fixture
def train_setup(llama):
  config = lj.LoRAConfig(rank=4)
  model = lj.inject(llama, config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  params = nn.unbox(model.init(jax.random.key(0), IDS)["params"])

  def make(shape):
    ts = train.make_train_step(train.causal_lm_loss(model), optax.adam(1e-3),
                               sharding.make_mesh(*shape), abstract, config)
    return ts, ts.place(params)
  return config, make


def _abstract_state(ts, adapters, opt_state):
  spec = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  return checkpoint.TrainState(0, spec(adapters, ts.adapter_shardings),
                               spec(opt_state, ts.opt_shardings), jax.random.key(0))


def test_train_state_restores_onto_another_mesh(tmp_path, train_setup):
  config, make = train_setup
  ts, (adapters, opt_state, _) = make((8, 1, 1))
  ckpt = checkpoint.TrainCheckpointer(tmp_path, config, save_every=2, handle_sigterm=False)
  state = checkpoint.TrainState(3, adapters, opt_state, jax.random.key(7), {"position": 3})
  assert not ckpt.save(state)  # step 3 is not due
  state.step = 4
  assert ckpt.save(state)
  ckpt.close()
  ts2, (adapters2, opt2, _) = make((2, 2, 2))
  ckpt = checkpoint.TrainCheckpointer(tmp_path, config, handle_sigterm=False)
  restored = ckpt.restore(_abstract_state(ts2, adapters2, opt2))
  ckpt.close()
  assert restored.step == 4 and restored.data == {"position": 3}
  assert jax.random.key_data(restored.rng).tolist() == jax.random.key_data(
      jax.random.key(7)).tolist()
  for x, y, s in zip(jax.tree.leaves(restored.adapters), jax.tree.leaves(adapters),
                     jax.tree.leaves(ts2.adapter_shardings)):
    np.testing.assert_array_equal(x, y)
    assert x.sharding == s


def test_damaged_and_unfinished_checkpoints_are_skipped(tmp_path, train_setup, caplog):
  config, make = train_setup
  ts, (adapters, opt_state, _) = make((8, 1, 1))
  ckpt = checkpoint.TrainCheckpointer(tmp_path, config, save_every=1, keep=5,
                                      handle_sigterm=False)
  for step in (1, 2, 3):
    ckpt.save(checkpoint.TrainState(step, adapters, opt_state, jax.random.key(0)))
  ckpt.close()
  for f in (tmp_path / "3").rglob("*"):  # damage the newest: truncate its data files
    if f.is_file() and "ocdbt" in str(f):
      f.write_bytes(b"")
  (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()  # a write that never finished
  ckpt = checkpoint.TrainCheckpointer(tmp_path, config, handle_sigterm=False)
  with caplog.at_level(logging.WARNING, logger="lora_jax.checkpoint"):
    restored = ckpt.restore(_abstract_state(ts, adapters, opt_state))
  ckpt.close()
  assert restored.step == 2
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "skipping damaged checkpoint" in messages and "/3" in messages
  assert "skipping unfinished checkpoint" in messages


def test_directory_of_another_run_is_refused(tmp_path):
  checkpoint.TrainCheckpointer(tmp_path, lj.LoRAConfig(rank=4), handle_sigterm=False).close()
  with pytest.raises(ValueError, match="holds checkpoints of a run with another LoRA config"):
    checkpoint.TrainCheckpointer(tmp_path, lj.LoRAConfig(rank=8), handle_sigterm=False)


# --- reliability: kill the run, resume, end bit-identical --------------------------------

STEPS = 10


def _start(run_dir, sleep=0.0):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Restarts reuse compiled programs, as a pre-empted TPU job would with a persistent cache.
  env.update(JAX_COMPILATION_CACHE_DIR=str(Path(run_dir).parent / "xla-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), str(STEPS), str(sleep)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _wait_for_step(proc, step, deadline):
  for line in proc.stdout:
    if line.startswith("step ") and int(line.split()[1]) >= step:
      return int(line.split()[1])
    if time.monotonic() > deadline:
      break
  return None


def _final(run_dir):
  return dict(np.load(Path(run_dir) / "final.npz"))


def test_killed_runs_resume_bit_identical(tmp_path):
  deadline = time.monotonic() + 600
  ref = _start(tmp_path / "ref")
  assert ref.wait(timeout=300) == 0
  expected = _final(tmp_path / "ref")

  run, rng, kills, step = tmp_path / "run", random.Random(0), [], 0
  try:
    for _ in range(5):  # SIGKILL at a random step, at a random moment within it
      proc = _start(run)
      step = _wait_for_step(proc, min(step + rng.randint(1, 2), STEPS - 1), deadline)
      time.sleep(rng.uniform(0, 0.05))
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
      kills.append(step)
    proc = _start(run, sleep=0.3)  # SIGTERM: it saves and exits 0
    _wait_for_step(proc, min(step + 1, STEPS - 1), deadline)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    proc = _start(run)
    assert proc.wait(timeout=300) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert kills and saved >= kills[-1]
  got = _final(run)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_rng_implementations_and_replaced_steps(tmp_path, train_setup):
  config, make = train_setup
  ts, (adapters, opt_state, _) = make((8, 1, 1))
  ckpt = checkpoint.TrainCheckpointer(tmp_path, config, save_every=1, handle_sigterm=False)
  key = jax.random.key(5, impl="rbg")
  ckpt.save(checkpoint.TrainState(1, adapters, opt_state, key, {"position": 1}))
  ckpt.save(checkpoint.TrainState(1, adapters, opt_state, key, {"position": 7}))  # redone
  ckpt.wait()
  abstract = _abstract_state(ts, adapters, opt_state)
  abstract.rng = key
  restored = ckpt.restore(abstract)
  ckpt.close()
  assert restored.data == {"position": 7}
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(key)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(key))
