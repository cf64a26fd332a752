"""Run configs: schema, overrides, and every shipped config built abstractly."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

import lora_jax as lj
from lora_jax import bases, quantize, recipe, sharding

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_round_trip():
  cfg = recipe.RunConfig()
  assert cfg.lora == lj.LoRAConfig(rank=8, alpha=16.0)
  assert recipe.RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'"),
    ({"train": {"stpes": 3}}, "unknown config key 'train.stpes'; did you mean 'train.steps'"),
    ({"lora": {"rnak": 3}}, "unknown config key 'lora.rnak'; did you mean 'lora.rank'"),
    ({"train": {"steps": "many"}}, "train.steps='many': must be an integer"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate='fast': must be a number"),
    ({"data": {"packing": "yes"}}, "data.packing='yes': must be true or false"),
    ({"model": 3}, "section 'model' must be a mapping"),
    ({"lora": {"rank": 0}}, "rank=0"),
])
def test_bad_configs_name_the_key(data, message):
  with pytest.raises(ValueError, match=message):
    recipe.RunConfig.from_dict(data)


def test_overrides():
  cfg = recipe.load(None, ["train.steps=7", "lora.targets=[q_proj, v_proj]", "output_dir=x",
                           "train.lora_plus_ratio=16", "data.train=a.txt"])
  assert cfg.train.steps == 7 and cfg.output_dir == "x" and cfg.train.lora_plus_ratio == 16.0
  assert cfg.lora.targets == ("q_proj", "v_proj") and cfg.data.train == ("a.txt",)
  with pytest.raises(ValueError, match="is not key=value"):
    recipe.load(None, ["train.steps"])
  with pytest.raises(ValueError, match="keys have the form section.key"):
    recipe.load(None, ["a.b.c=1"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    recipe.load("no/such.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_abstractly(path, monkeypatch):
  cfg = recipe.load(path)
  base = cfg.model.base
  if base.startswith("hf:"):  # TPU configs: a downloaded checkpoint of the file's preset
    cfg = recipe.load(path, [f"model.base=preset:{path.name.split('_')[0]}"])
  elif base.startswith("builtin:"):
    cfg = recipe.load(path, ["model.base=preset:tiny-byte"])
  resolved = bases.resolve(cfg.model)
  llama = resolved.model()
  model = llama if "pretrain" in path.name else lj.inject(llama, cfg.lora)  # pretrain: no LoRA
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract = resolved.abstract_params(model, ids)  # kernels quantized as model.quantize asks
  leaves = jax.tree.leaves(abstract, is_leaf=quantize.is_quantized)
  assert any(map(quantize.is_quantized, leaves)) == (cfg.model.quantize != "none")
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  if -1 in sizes:  # CPU configs: whatever devices there are
    sizes[sizes.index(-1)] = 8 // -(sizes[0] * sizes[1] * sizes[2])
  mesh = AbstractMesh(tuple(sizes), sharding.AXES)
  shardings = sharding.param_shardings(abstract, mesh)
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(abstract))
  assert cfg.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0


def test_default_yaml_is_what_no_config_means():
  shipped = recipe.load(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
  assert shipped == recipe.RunConfig()
