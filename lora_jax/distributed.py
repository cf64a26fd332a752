"""Multi-host runs: one process per host, each loading only its share of a batch.

On a TPU VM slice every worker runs the same script; `initialize()` finds the
coordinator, the process count and this process's id from the TPU metadata.
Elsewhere (CPU or GPU hosts, tests) pass them, or set `LORA_JAX_COORDINATOR`,
`LORA_JAX_NUM_PROCESSES` and `LORA_JAX_PROCESS_ID` (`tpu/launch.sh` does).

After that, `jax.devices()` lists every host's devices, a mesh from
`lora_jax.sharding.make_mesh` spans them all, and each host feeds only the
rows of the global batch that its own devices hold (`host_rows`,
`host_batch`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

ENV = ("LORA_JAX_COORDINATOR", "LORA_JAX_NUM_PROCESSES", "LORA_JAX_PROCESS_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs: Any) -> None:
  """`jax.distributed.initialize`, auto-detected on TPU VMs, explicit elsewhere.

  Arguments left `None` come from the `LORA_JAX_*` environment variables, and
  failing those from JAX's own cluster detection (TPU VMs, SLURM, ...). A
  second call does nothing. On CPU, collectives between processes use gloo.

  Args:
    coordinator_address: `host:port` of process 0.
    num_processes: how many processes (hosts) take part.
    process_id: this process's index, from 0.
    **kwargs: passed on to `jax.distributed.initialize` (e.g.
      `local_device_ids`, `initialization_timeout`).

  Raises:
    ValueError: when only some of the three are known, or they are malformed.
  """
  if jax.distributed.is_initialized():
    return
  env = [os.environ.get(name) for name in ENV]
  coordinator_address = coordinator_address or env[0]
  try:
    num_processes = num_processes if num_processes is not None else (
        int(env[1]) if env[1] else None)
    process_id = process_id if process_id is not None else (int(env[2]) if env[2] else None)
  except ValueError as e:
    raise ValueError(f"{ENV[1]}/{ENV[2]} must be integers: {e}") from None
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given) and any(v is None for v in given):
    raise ValueError(
        "give all of coordinator_address, num_processes and process_id (or the "
        f"{', '.join(ENV)} variables), or none of them on a TPU VM; got {given}")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def host_rows(sharding: Sharding, global_batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold.

  Args:
    sharding: the batch's sharding (e.g. `TrainStep.batch_sharding`).
    global_batch_size: rows in the global batch.

  Raises:
    ValueError: when this process's rows are not one contiguous block (a mesh
      whose batch axes interleave hosts); build the mesh with `make_mesh`.
  """
  indices = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = sorted({i for index in indices.values()
                 for i in range(*index[0].indices(global_batch_size))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds batch rows {rows}, not one block")
  return slice(rows[0], rows[-1] + 1)


def host_batch(local_batch: Mapping[str, Any], sharding: Sharding, global_batch_size: int
               ) -> dict[str, jax.Array]:
  """Global arrays from the rows this host loaded (`host_rows`), without gathering.

  Args:
    local_batch: this host's rows of each input, e.g. `{'input_ids': (rows, seq)}`.
    sharding: the batch sharding.
    global_batch_size: rows in the global batch.
  """
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, (global_batch_size,) + value.shape[1:])
  return out
