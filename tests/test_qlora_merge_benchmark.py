"""benchmarks/qlora_merge.py runs end to end (a few steps) and its merge paths behave as the
README says: (a) is the trained model, (b) and the float base are not."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_qlora_merge_benchmark_runs(tmp_path):
  out = tmp_path / "merge.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run it
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "qlora_merge.py"), "--steps", "20",
       "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  trained = result["trained_on_quantized_base"]["eval_loss"]
  assert result["a_dequantized_merge"]["max_logit_diff"] < 1e-4
  assert abs(result["a_dequantized_merge"]["eval_loss"] - trained) < 1e-5
  for lossy in ("b_requantized", "merged_into_float_base"):
    assert result[lossy]["max_logit_diff"] > 1e-2
  assert 0.01 < result["b_requantized"]["added_kernel_error_mean"] < 0.2
