"""benchmarks/mixed.py runs (--tiny) and writes every section: mixed-batch generation beside
the single-adapter and merged models, the gather vs grouped layer, K adapters trained in one
step vs K steps, and a hot swap that reuses the compiled program. Never a timing."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mixed_benchmark_runs_every_section(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run it
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "mixed.py"), "--tiny", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  r = json.loads((tmp_path / "mixed.json").read_text())
  s = r["settings"]

  g = r["generation"]["variants"]
  assert set(g) == {"merged", "single", *(f"K={k}" for k in s["ks"])}
  for name, v in g.items():
    assert v["median_s"] > 0 and v["tokens_per_s"] > 0 and len(v["times_s"]) == s["reps"]
    assert v["generate"]["flops"] > 0 and v["generate"]["argument_bytes"] > 0
    assert v["decode_step"]["flops"] > 0 and v["decode_step_median_s"] > 0
    # Rows on adapter 0 continue exactly as the single-adapter model's.
    assert v["rows_equal_single"] == 1.0, name
  base = r["generation"]["base_bytes"]
  assert g["merged"]["param_bytes"] == base
  for k in s["ks"]:  # the stack holds K adapters: its bytes grow with K
    assert g[f"K={k}"]["adapter_bytes"] >= k * g["single"]["adapter_bytes"]

  layer = r["layer"]["rows"]
  assert [row["tokens_per_example"] for row in layer] == list(s["layer_tokens"])
  for row in layer:
    assert set(row["by_k"]) == {str(k) for k in s["layer_ks"]}
    assert row["max_abs_diff"] < 1e-4  # gather and ragged_dot compute the same update
    for v in row["by_k"].values():
      assert v["gather_ms"] > 0 and v["grouped_ms"] > 0 and v["gather_flops"] > 0

  t = r["training"]["by_k"]
  assert set(t) == {str(k) for k in s["train_ks"]}
  for v in t.values():
    assert v["mixed"]["flops"] > 0 and v["single"]["flops"] > 0 and v["time_ratio"] > 0
    assert 0.5 < v["flop_ratio"] < 2  # the same examples' work, one program or K

  h = r["hot_swap"]
  assert h["jit_cache_after"] == h["jit_cache_before"]
  assert h["swapped_rows_equal_alone"] == 1.0
  assert h["fresh_compile_s"] > 0 and all(x["swap_s"] > 0 for x in h["swaps"])

  md = (tmp_path / "mixed.md").read_text()
  for heading in ("## Generation", "## Layer", "## Training", "## Hot swap"):
    assert heading in md and heading in proc.stdout
