"""The Colab TPU notebook runs top to bottom (on CPU, small setting) and is stored clean."""

import json
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lora_jax_colab_tpu.ipynb"

# Run first: where the kernel's Python and lora_jax come from.
PROBE_START = """
import sys, lora_jax
print(sys.executable)
print(lora_jax.__file__)
"""
# Run last: what the notebook computed, as JSON.
PROBE_END = """
import json, matplotlib
print(json.dumps({
    "small": SMALL, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
    "eval_before": eval_before, "eval_after": eval_after, "merge_diff": diff,
    "plotted_points": len(ax.lines[0].get_xdata()), "backend": matplotlib.get_backend(),
    "base_text": base_text, "lora_text": lora_text, "merged_text": merged_text,
    "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir),
}))
"""


def test_notebook_is_stored_without_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code, "the notebook has no code cells"
  for cell in code:
    assert cell["outputs"] == [], f"cell {cell.get('id')} holds outputs"
    assert cell["execution_count"] is None, f"cell {cell.get('id')} has an execution count"


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")

  # The kernel inherits this environment; jupyter_client starts the native
  # 'python3' kernel with sys.executable, which the first probe checks.
  monkeypatch.setenv("LORA_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE_START))
  nb.cells.append(nbformat.v4.new_code_cell(PROBE_END))
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  elapsed = time.perf_counter() - start

  executable, package = _stdout(nb.cells[0]).split()
  assert Path(executable).resolve() == Path(sys.executable).resolve()
  import lora_jax
  assert Path(package).resolve() == Path(lora_jax.__file__).resolve()

  printed = "".join(_stdout(c) for c in nb.cells[1:-1] if c.cell_type == "code")
  result = json.loads(_stdout(nb.cells[-1]))
  print(f"notebook ran in {elapsed:.1f}s\n{printed}")
  assert "lora_jax is already installed" in printed  # the install cell did not pip install
  assert result["small"] and result["backend"].lower() == "agg"
  assert result["steps"] == result["plotted_points"] == 100
  assert result["last_loss"] < result["first_loss"]
  assert result["eval_after"] < result["eval_before"]
  assert result["merge_diff"] < 1e-3
  assert result["lora_text"].startswith("LAWYER, n. ") and len(result["lora_text"]) > 20
  assert result["merged_text"].startswith("LAWYER, n. ")
  assert Path(result["adapter_dir"]).parent == (tmp_path / "lora-jax-notebook").resolve()
  assert (tmp_path / "lora-jax-notebook" / "adapter").is_dir()
  assert (tmp_path / "lora-jax-notebook" / "merged").is_dir()
