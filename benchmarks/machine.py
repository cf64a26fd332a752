"""Where and with what benchmark figures were taken (every benchmark prints this), and
writing them out."""

import datetime
import json
import os
import platform
from pathlib import Path

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


def write_results(out: str, stem: str, result: dict, text: str) -> None:
  """`result` as `<out>/<stem>.json` and its markdown `text` as `<out>/<stem>.md`."""
  d = Path(out)
  d.mkdir(parents=True, exist_ok=True)
  (d / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
  (d / f"{stem}.md").write_text(text)
