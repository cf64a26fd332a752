"""benchmarks/weighted_adapters.py runs (--tiny) and its figures say what the README says:
lora_jax's cat and full-rank svd are exact whichever adapter comes first, its svd reaches the
best rank-r error, PEFT's results are off by the rsLoRA scale it inherits when the rsLoRA
adapter comes first, and both tools' `linear` agree when it does not."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_weighted_adapters_benchmark_runs(tmp_path):
  out = tmp_path / "weighted.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run it
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "weighted_adapters.py"), "--tiny", "--out",
       str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  rank = result["rank"]
  for order, rows in result["orders"].items():
    assert rows["cat"]["lora_jax"] < 1e-5, order
    assert rows[f"svd_r{2 * rank}"]["lora_jax"] < 1e-5, order
    truncated = rows[f"svd_r{rank}"]
    assert abs(truncated["lora_jax"] - truncated["best_possible"]) < 1e-4, order
    assert 0.01 < truncated["best_possible"] < 1, order
    assert rows["linear"]["lora_jax"] > 0.01, order  # an approximation, in both tools
  rs_first, plain_first = result["orders"]["rs_first"], result["orders"]["plain_first"]
  assert rs_first["cat"]["peft"] > 0.5  # PEFT's result scaled by sqrt(2 r) / 1
  assert plain_first["cat"]["peft"] < 1e-5
  assert plain_first["linear"]["linear_tools_apart"] < 1e-5
  assert "cat" in proc.stdout and "lora_jax" in proc.stdout
