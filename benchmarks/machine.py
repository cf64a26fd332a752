"""Where and with what benchmark figures were taken (every benchmark prints this)."""

import datetime
import os
import platform

import flax
import jax
import optax


def machine() -> dict:
  """CPU, OS, devices, library versions and the date, as strings and numbers."""
  cpu = platform.processor()
  if not cpu and os.path.exists("/proc/cpuinfo"):  # empty on most Linux systems
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  u = platform.uname()
  devices = jax.devices()
  return dict(
      machine=f"{cpu or u.machine} ({u.system} {u.release} {u.machine})",
      cpu_count=os.cpu_count(),
      devices=f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
      jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
