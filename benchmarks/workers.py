"""Runs benchmark workers in subprocesses and talks to them over pipes (`@@ {json}` lines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
EXTRA_ENV: dict[str, str] = {}  # set by the driver for every worker, e.g. a compilation cache


def worker_env(devices: int | None = None) -> dict:
  """This environment with the simulated CPU device count set to `devices` (or removed)."""
  env = dict(os.environ, **EXTRA_ENV)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
  if devices is not None:
    flags.append(f"{_DEVICE_FLAG}={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
  return env


class Worker:
  """`python SCRIPT *args` with a line protocol: we write commands, it answers `@@ {json}`."""

  def __init__(self, script: str, *args: str, devices: int | None = None, log=None):
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), *args], cwd=HERE, env=worker_env(devices),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL,
        text=True, bufsize=1)
    self.args = args

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@ "):
        return json.loads(line[3:])
    code = self.proc.wait()
    raise RuntimeError(f"worker {os.path.basename(self.proc.args[1])} {self.args[:1]} exited "
                       f"with status {code} before answering; see the log in the workdir")

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()


def run_once(script: str, *args: str, devices: int | None = None, log=None) -> dict:
  """Starts a worker that answers once and exits; returns its answer."""
  w = Worker(script, *args, devices=devices, log=log)
  try:
    return w.read()
  finally:
    w.close()


def interleave(workers: dict[str, Worker], steps: int, pause: float) -> dict[str, list[dict]]:
  """`steps` rounds; each round steps every worker once, the order reversed every other
  round (A B C, C B A, ...) so that no contender always follows the same one."""
  order, results = list(workers), {name: [] for name in workers}
  for i in range(steps):
    for name in (order if i % 2 == 0 else order[::-1]):
      time.sleep(pause)  # lets the previous worker's spinning threads go idle
      results[name].append(workers[name].ask("step"))
  return results
