"""benchmarks/fit.py runs end to end on the tiny preset and writes both steps' figures."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The scripts' environment: one XLA compilation cache for this module's runs.

  Without XLA_FLAGS (conftest sets it for this process): the script sets its own
  device count. The QLoRA run's comparison step (LoRA on the bf16 base) is the
  plain run's LoRA step: with the cache it is compiled once. A cached
  executable is the same executable, with the same memory analysis; only the
  reported compile times differ, and no test reads them.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla-cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  return env


def test_fit_benchmark_runs_tiny(tmp_path, env):
  out = tmp_path / "fit.json"
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


def test_fit_benchmark_plans_qlora_against_the_bf16_base(tmp_path, env):
  out = tmp_path / "fit.json"
  # Block 8: the tiny preset's 64-wide input axis over fsdp=8 leaves 8 weights a shard.
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "fit.py"), "--preset", "tiny", "--batch", "8",
       "--seq", "16", "--rank", "2", "--quantize", "nf4", "--quantize-block", "8",
       "--json", str(out)],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "QLoRA (nf4)" in proc.stdout and "bits/weight" in proc.stdout
  report = json.loads(out.read_text())
  qlora, lora = report["lora"], report["lora_float"]
  assert "full" not in report and "quantization" not in lora
  q = qlora["quantization"]
  # 7 kernels a layer, 2 layers: 2 x (2 x 64 x 64 + 2 x 64 x 32 + 3 x 64 x 128) weights.
  assert (q["format"], q["block"], q["double"], q["kernels"]) == ("nf4", 8, True, 7)
  assert q["kernel_weights"] == 73_728
  assert q["kernel_bits_per_weight"] == 8 * q["kernel_bytes"] / q["kernel_weights"]
  # 4-bit codes + an 8-bit absmax code per 8 weights + double quantization's few floats.
  assert 5.0 < q["kernel_bits_per_weight"] < 5.1
  assert q["kernel_float_bytes"] == 2 * q["kernel_weights"]
  assert q["base_float_bytes"] == 2 * q["base_weights"] == lora["frozen_base_global_bytes"]
  assert q["base_bytes"] == qlora["frozen_base_global_bytes"] < q["base_float_bytes"]
  assert qlora["frozen_base_bytes"] < lora["frozen_base_bytes"]
  assert qlora["params_trained"] == lora["params_trained"]
  assert report["ratio_qlora_lora"]["total_bytes"] == qlora["total_bytes"] / lora["total_bytes"]


def test_fit_benchmark_refuses_a_block_for_int8(capsys):
  # Its argument check, in this process: the refusal comes before any device is used.
  sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling `machine`, while it imports
  try:
    spec = importlib.util.spec_from_file_location("fit_benchmark", ROOT / "benchmarks" / "fit.py")
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  with pytest.raises(SystemExit) as exit_:
    fit.parse_args(["--quantize", "int8", "--quantize-block", "64"])
  assert exit_.value.code == 2 and "--quantize-block=64: int8 has no blocks" in capsys.readouterr().err
