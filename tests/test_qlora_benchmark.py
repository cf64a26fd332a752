"""benchmarks/qlora.py: its step timing runs end to end on a small batch, and its verdict
reads eval losses as documented (the training runs themselves are the library's, tested
in test_qlora_run.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_qlora():
  """benchmarks/qlora.py as a module (its sibling `machine` on the path while it imports)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    spec = importlib.util.spec_from_file_location("qlora_benchmark",
                                                  ROOT / "benchmarks" / "qlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def test_qlora_benchmark_times_the_nf4_step(tmp_path):
  out = tmp_path / "qlora.json"
  # One device, as on a plain CPU (conftest gave this process 8), and quick compiles.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "qlora.py"), "--no-quality", "--timed-steps",
       "1", "--set", "data.seq_len=32", "train.batch_size=4", "--json", str(out)],
      capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  s = json.loads(out.read_text())["speed"]
  assert s["batch_shape"] == [4, 32]
  for fmt in ("none", "nf4"):
    assert s[fmt]["flops"] > 0 and len(s[fmt]["step_times_s"]) == 1 and s[fmt]["median_s"] > 0
  # Dequantizing adds elementwise work, never a matmul's worth; the base shrinks ~4.6x.
  assert 1 <= s["flop_ratio"] < 1.1
  assert 0.15 < s["base_bytes_ratio"] < 0.3
  assert "NF4 / float" in proc.stdout


def test_qlora_verdict_and_config():
  qlora = load_qlora()
  q = {"none": {"eval_before": 2.95, "eval_after": 1.83},
       "nf4": {"eval_before": 3.00, "eval_after": 1.84},
       "int4": {"eval_before": 3.40, "eval_after": 1.90}}
  v = qlora.verdict(q, tolerance=0.02)
  assert set(v) == {"nf4", "int4"}
  assert abs(v["nf4"]["gap_before"] - 0.05) < 1e-9 and abs(v["nf4"]["gap_after"] - 0.01) < 1e-9
  assert v["nf4"]["matches"] and not v["int4"]["matches"]
  text = qlora.report({"quality": q, "verdict": v, "tolerance": 0.02})
  assert "nf4: LoRA on the nf4 base matches" in text
  assert "int4: LoRA on the int4 base does NOT match" in text

  cfg = qlora.load_config("nf4", "/tmp/unused", None)
  assert cfg.model.quantize == "nf4" and cfg.model.base == "builtin:tiny-kjv"
  assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seed) == (300, 16, 0)
  assert cfg.train.eval_every == 0 and cfg.train.save_every == 300
