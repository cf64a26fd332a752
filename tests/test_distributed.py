"""Two processes x 4 CPU devices (gloo) train exactly like one process x 8 devices: one
adapter, and a stack of adapters on mixed rows."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import multihost_worker
from lora_jax import distributed, hf
from lora_jax.models.llama import Llama, config_for

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  """Two hosts read a transformers checkpoint, train and export merged, and train a stack of
  two adapters on mixed rows, as one host does."""
  tiny = config_for("tiny")
  hf_dir = hf.save_llama(tmp_path / "hf", Llama(tiny).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"], tiny)
  out = tmp_path / "multi"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, str(WORKER), coordinator, "2", str(i), str(hf_dir),
                             str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:  # never leave a worker behind
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
  multi = dict(np.load(out / "adapters.npz"))
  single = multihost_worker.train_tiny(hf_dir, tmp_path / "single")  # 8 devices, one host
  assert multi.keys() == single.keys() and len(single) == 14
  for key in single:
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-7, err_msg=key)
  stack_multi = dict(np.load(out / "stack.npz"))
  stack_single = multihost_worker.train_stack(hf_dir)
  start = multihost_worker.train_stack(hf_dir, steps=0)
  assert stack_multi.keys() == stack_single.keys() and len(stack_single) == 6
  for key in stack_single:
    np.testing.assert_allclose(stack_multi[key], stack_single[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)
    assert not np.array_equal(stack_single[key], start[key]), key  # every stacked leaf trained
  merged_multi = load_file(out / "merged" / "model.safetensors")
  merged_single = load_file(tmp_path / "single" / "model.safetensors")
  assert merged_multi.keys() == merged_single.keys() and len(merged_single) == 21
  for key in merged_single:
    np.testing.assert_allclose(merged_multi[key], merged_single[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)


def test_initialize_checks_its_arguments(monkeypatch):
  for name in distributed.ENV:
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match="give all of coordinator_address"):
    distributed.initialize("127.0.0.1:1234", 2)
  monkeypatch.setenv("LORA_JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="must be integers"):
    distributed.initialize()
  with pytest.raises(ValueError, match=r"process_id=3 is outside \[0, 2\)"):
    distributed.initialize("127.0.0.1:1234", 2, 3)


def test_host_rows_single_process():
  from lora_jax import sharding
  mesh = sharding.make_mesh(2, 2, 2)
  assert distributed.host_rows(sharding.batch_sharding(mesh), 16) == slice(0, 16)
