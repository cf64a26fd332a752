"""benchmarks/stack_placement.py (--tiny) compiles a stack's serve and train programs with the
adapter axis replicated and split over the data axis, and reads what each costs per device."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stack_placement_benchmark_compares_both_placements(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets 8 devices
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "stack_placement.py"), "--tiny", "--out",
       str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  r = json.loads((tmp_path / "stack_placement.json").read_text())
  c = r["models"]["tiny"]["8"]
  assert c["devices"] == 8 and c["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  rep, split = c["by_placement"]["replicated"], c["by_placement"]["split"]
  for program in ("serve", "train"):  # split over data=2: half the adapters on each device
    assert rep[program]["adapters_bytes"] == 2 * split[program]["adapters_bytes"] > 0
  opt_rep, opt_split = rep["train"]["opt_state_bytes"], split["train"]["opt_state_bytes"]
  assert abs(opt_rep - 2 * opt_split) <= 16 and opt_split > 0  # AdamW's step count is whole
  # Split, every device gathers the adapters it lacks for its rows.
  gathered = lambda f: f["collective_bytes"].get("all-gather", 0)
  assert gathered(split["serve"]) > gathered(rep["serve"])
  assert "| tiny | 8 | train | split |" in (tmp_path / "stack_placement.md").read_text()
