"""The `lora-jax` command: a real run on a tiny model, and one-line errors for bad input."""

import numpy as np
import pytest

from lora_jax import cli, run, serve
from lora_jax.recipe import ModelSection

TINY = ["model.base=preset:tiny-byte", "data.train=builtin:devil", "data.seq_len=32",
        "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1", "train.save_every=2"]


def lora_jax(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "r"
  code = cli.main(["train", *TINY, "train.steps=4", f"output_dir={out}", "--no-progress"])
  assert code == 0
  return out


def test_train_writes_adapter_and_merged_model_and_resumes(finished_run, capsys):
  assert (finished_run / "adapter").is_dir() and (finished_run / "merged" / "model.json").exists()
  assert sorted(p.name for p in (finished_run / "checkpoints").iterdir() if p.name.isdigit()) == [
      "2", "4"]
  code, out, _ = lora_jax(capsys, "train", *TINY, "train.steps=6", f"output_dir={finished_run}",
                          "--no-progress")
  assert code == 0 and "resuming from step 4" in out


def test_merged_model_generates_like_base_plus_adapter(finished_run):
  base = ModelSection(base="preset:tiny-byte")
  with_adapter = serve.generate_text(base, "ABSURDITY, n.", adapter=str(finished_run / "adapter"),
                                   max_new_tokens=16)
  merged = serve.generate_text(ModelSection(base=str(finished_run / "merged")), "ABSURDITY, n.",
                             max_new_tokens=16)
  assert with_adapter == merged


def test_info_lists_adapted_layers(capsys):
  code, out, _ = lora_jax(capsys, "info", "model.base=preset:tiny-byte", "lora.targets=[q_proj]")
  assert code == 0
  assert "adapted layers (4):" in out and "layers_3/self_attn/q_proj" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["train", "train.stpes=3"], "did you mean 'train.steps'"),
    (["train", *TINY, "mesh.data=3"], "8 devices do not divide by 3"),
    (["train", *TINY, "mesh.data=2", "mesh.fsdp=8"], "needs 16 devices, but there are 8"),
    (["train", *TINY, "train.batch_size=12"], "batch_size=12 must divide by the data x fsdp"),
    (["train", "model.base=nowhere"], "nowhere is not a model directory"),
    (["train", *TINY, "model.base=preset:tiny"], "its vocabulary (256) is smaller than the 259 "
     "ids of the byte tokenizer"),
    (["train", *TINY, "data.train=nothing.txt"], "nothing.txt"),
    (["generate", "--adapter", "no/adapter", "--base", "preset:tiny-byte"],
     "holds no lora_jax adapter checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
  code, _, err = lora_jax(capsys, *argv, *([f"output_dir={tmp_path}/o"] if argv[0] == "train"
                                           else []))
  assert code == 2
  assert err.count("\n") == 1 and err.startswith(f"lora-jax {argv[0]}: error:")
  assert message in err


def test_output_dir_of_another_run_is_refused(finished_run, capsys):
  code, _, err = lora_jax(capsys, "train", *TINY, "lora.rank=4", f"output_dir={finished_run}")
  assert code == 2 and "holds a different run's checkpoints" in err


def test_python_dash_m_help():
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "lora_jax", "--help"], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and "train" in proc.stdout and "generate" in proc.stdout
  np.testing.assert_equal(proc.stderr, "")


def test_default_run_on_the_shipped_model_learns(tmp_path, capsys):
  """The built-in demo, shortened: the shipped model loads and the loss drops."""
  code, out, _ = lora_jax(capsys, "train", "train.steps=30", "train.eval_every=0",
                          "train.eval_batches=2", f"output_dir={tmp_path}/d", "--no-progress")
  assert code == 0
  before, after = (float(x) for x in out.split("eval loss: ")[1].split()[::2][:2])
  assert after < before - 0.3


def test_a_model_directory_run_writes_no_peft_adapter_unless_asked(finished_run):
  assert not (finished_run / "peft").exists()


def test_export_settings_have_their_effect(tmp_path):
  """export.peft / merged / merged_dtype / base_model_name_or_path, on a preset base."""
  import json

  import jax
  import jax.numpy as jnp

  import lora_jax as lj
  from lora_jax import bases, recipe
  from lora_jax.models.llama import Llama
  cfg = recipe.load(None, ["model.base=preset:tiny-byte", "lora.targets=[q_proj]",
                           "export.peft=true", "export.merged=true",
                           "export.merged_dtype=bfloat16",
                           "export.base_model_name_or_path=org/tiny"])
  base_model = bases.resolve(cfg.model)
  model = lj.inject(Llama(base_model.config), cfg.lora)
  _, base = base_model.load()
  params = lj.init_adapters(model, base, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  written = run._export(cfg, base_model, params, cfg.lora, tmp_path)
  assert set(written) == {"adapter", "peft", "merged"}
  peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert peft["base_model_name_or_path"] == "org/tiny"
  import orbax.checkpoint as ocp
  stored = ocp.StandardCheckpointer().metadata(tmp_path / "merged" / "params").item_metadata
  assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
  off = recipe.load(None, ["model.base=preset:tiny-byte", "export.merged=false"])
  assert set(run._export(off, base_model, params, cfg.lora, tmp_path / "off")) == {"adapter"}
