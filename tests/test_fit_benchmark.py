"""benchmarks/fit.py runs end to end on the tiny preset and writes both steps' figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fit_benchmark_runs_tiny(tmp_path):
  out = tmp_path / "fit.json"
  # Without XLA_FLAGS (conftest sets it for this process): the script sets its own device count.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Rank 2: at the default rank 16 the tiny preset's (64-wide) adapters outweigh its kernels.
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "fit.py"), "--preset", "tiny", "--batch", "8",
       "--seq", "16", "--rank", "2", "--json", str(out)],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "total = arg + temp + out - alias" in proc.stdout and "CAVEAT" in proc.stdout
  report = json.loads(out.read_text())
  assert report["devices"].startswith("8 x ")
  lora, full = report["lora"], report["full"]
  for step in (lora, full):
    assert step["argument_bytes"] > 0 and step["temp_bytes"] > 0
    assert step["total_bytes"] == (step["argument_bytes"] + step["temp_bytes"] +
                                   step["output_bytes"] - step["alias_bytes"])
    assert step["flops_loop_aware_dots"] > 0 and set(step["fits"]) == {"v5e", "v4", "v5p"}
  assert (lora["temp_bytes"] + lora["argument_bytes"] <
          full["temp_bytes"] + full["argument_bytes"])
  assert lora["params_trained"] < full["params_trained"]
