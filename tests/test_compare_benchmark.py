"""benchmarks/compare.py runs end to end on a tiny Llama and writes sane JSON, markdown and PNG.

No timing is asserted: only that every contender trained the same model (same
logits, same first loss), that the figures exist and hang together, and that
the merged model's forward is the base model's program.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("torch", "transformers", "peft", "qwix", "matplotlib")


def test_compare_benchmark_runs_tiny(tmp_path):
  missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
  if missing:
    pytest.fail(f"benchmarks/compare.py needs {', '.join(missing)}: install the test extra "
                "(pip install -e '.[test]')")
  # The script sets each worker's device count itself (conftest gave this process 8).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--tiny", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr

  r = json.loads((tmp_path / "compare_tiny.json").read_text())
  assert {"machine", "jax", "flax", "torch", "peft", "qwix", "date"} <= set(r)
  train = r["train"]
  assert list(train) == ["lora_jax", "nnx", "qwix", "peft", "full"]
  for name, c in train.items():
    # The same model and weights: the NNX port, qwix and PEFT (torch) give the linen logits.
    assert c["logits_max_abs_diff"] < 1e-4, (name, c["logits_max_abs_diff"])
    assert abs(c["first_loss"] - train["lora_jax"]["first_loss"]) < 1e-4, name
    assert len(c["step_times_s"]) == 2 and c["median_s"] > 0 and c["peak_rss"] > 0
    assert all(l == l for l in c["losses"])  # finite, not NaN
  lora = train["lora_jax"]["trained_params"]
  assert all(train[n]["trained_params"] == lora for n in ("nnx", "qwix", "peft"))
  assert train["full"]["trained_params"] == r["params"] > lora
  assert train["peft"]["torch_threads"] >= 1

  s = r["summary"]
  assert 0 < s["flop_ratio"] < 1.1 and 0 < s["memory_ratio"] < 1
  assert train["lora_jax"]["argument_bytes"] < train["full"]["argument_bytes"]
  f = r["forward"]
  assert f["flops"]["merged"] == f["flops"]["base"] and f["hlo_equal"]["merged_vs_base"]
  assert f["flops"]["unmerged_r8"] < f["flops"]["unmerged_r16"] < f["flops"]["unmerged_r64"]
  assert f["merged_vs_unmerged_max_abs_diff"] < 1e-4
  assert s["targets"]["merged forward FLOPs == base"]
  assert set(r["merge"]) == {"jit", "eager"}
  assert r["merge"]["jit"]["xla_alias_bytes"] > 0  # the donated kernels are reused
  c = r["collectives"]
  assert c["devices"] == 8 and sum(c["frozen"]["collective_bytes"].values()) > 0
  assert sum(c["lora"]["collective_bytes"].values()) >= sum(c["frozen"]["collective_bytes"].values())

  md = (tmp_path / "compare.md").read_text()
  for heading in ("Train step", "Compiled train step", "Forward", "Merge", "Collective bytes",
                  "flax.nnx.LoRA", "HF PEFT", "Targets:", r["machine"]):
    assert heading in md, heading
  png = (tmp_path / "compare.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000
