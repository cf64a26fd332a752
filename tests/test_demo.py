"""The README's main job and the benchmark scripts run end to end (tiny sizes)."""

import os
import subprocess
import sys
from pathlib import Path

from lora_jax import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_fine_tunes_adapters_and_merges(capsys):
  result = demo.main(["--pretrain-steps", "60", "--steps", "60"])
  out = capsys.readouterr().out
  assert "trainable params:" in out and "merged into the plain MLP" in out
  assert result["after"] < 0.5 * result["before"]
  assert result["frozen_equal"] == 1.0
  assert abs(result["merged"] - result["after"]) <= 1e-4 + 1e-3 * result["after"]


def test_step_cost_benchmark_runs_tiny(tmp_path):
  out = tmp_path / "step_cost.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--width", "64", "--batch", "8",
       "--no-time", "--json", str(out)],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "FLOP ratio LoRA/full" in proc.stdout
  assert out.exists() and out.stat().st_size > 0
