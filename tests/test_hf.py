"""Hugging Face interop against transformers' LlamaForCausalLM and PEFT (torch CPU)."""

import dataclasses
import itertools
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

import host_random
import lora_jax as lj
from lora_jax import cli, hf, sharding
from lora_jax.checkpoint import load_adapter, save_adapter

IDS = np.random.default_rng(0).integers(0, 64, (2, 24))
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                 rms_norm_eps=1e-5),
    # Llama 3.1 rope scaling with a short original context, so scaling shows at 24 tokens.
    "llama3-rope": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                        rope_theta=500_000.0, max_position_embeddings=128,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}),
}


def torch_logits(model, ids=IDS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def no_warnings(fn, *args, **kwargs):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args, **kwargs)
  assert not [str(w.message) for w in caught]
  return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, transformers logits); llama3-rope saved in shards with an index."""
  out = {}
  for name, extra in CONFIGS.items():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, **extra)).eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, max_shard_size="20KB" if name == "llama3-rope" else "5GB")
    out[name] = directory, torch_logits(model)
  assert (out["llama3-rope"][0] / "model.safetensors.index.json").is_file()
  return out


@pytest.fixture(scope="module")
def base(checkpoints):
  return hf.load_llama(checkpoints["gqa"][0])


def with_trained_adapters(model, base_params, config, seed=1):
  """Adapters made non-trivial (B and DoRA magnitudes moved off their init)."""
  lora_model = lj.inject(model, config)
  params = lj.init_adapters(lora_model, base_params, jax.random.key(seed), jnp.asarray(IDS))
  seeds = itertools.count(1000 * (seed + 1))

  def nudge(kp, x):  # on the host: no compile per shape
    moved = kp[-1].key in ("lora_b", "lora_magnitude") or config.is_trainable(
        "/".join(k.key for k in kp))
    return host_random.nudge(x, next(seeds), 0.05) if moved else x
  return lora_model, jax.tree_util.tree_map_with_path(nudge, params)


# --- checkpoints in ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_llama_gives_transformers_logits(checkpoints, name):
  directory, expected = checkpoints[name]
  model, params = hf.load_llama(directory)
  assert model.config.tie_word_embeddings == (name == "tied")
  assert ("lm_head" in params) == (name != "tied")
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(IDS)), expected,
                             atol=1e-4, rtol=0)


def test_load_llama_onto_mesh_reads_shards(checkpoints):
  directory, expected = checkpoints["llama3-rope"]
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  model, params = hf.load_llama(directory, mesh=mesh, scan_layers=True)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  want = sharding.param_shardings(boxed, mesh)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(s, x.ndim), path
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (2, 32, 48) and q.addressable_shards[0].data.shape == (2, 8, 24)
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_load_llama_bfloat16(checkpoints, tmp_path):
  directory, expected = checkpoints["gqa"]
  model, params = hf.load_llama(directory, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(IDS)), expected,
                             atol=0.05, rtol=0)
  # A checkpoint stored in bfloat16, read into float32: the same values, exactly.
  transformers.LlamaForCausalLM.from_pretrained(directory).to(torch.bfloat16).save_pretrained(
      tmp_path / "bf16")
  _, widened = hf.load_llama(tmp_path / "bf16", dtype=jnp.float32)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.float32)),
               widened, params)


def copy_checkpoint(source, target, *, config=None, drop=None):
  shutil.copytree(source, target)
  if config is not None:
    hf_config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**hf_config, **config}))
  if drop is not None:
    tensors = load_file(target / "model.safetensors")
    del tensors[drop]
    save_file(tensors, target / "model.safetensors")
  return target


@pytest.mark.parametrize("change, message", [
    (dict(config={"model_type": "gpt_neox"}), "model_type 'gpt_neox'"),
    (dict(config={"mlp_bias": True}), "mlp_bias"),
    (dict(config={"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}), "yarn"),
    (dict(config={"intermediate_size": 40}), "has shape"),
    (dict(drop="model.norm.weight"), "missing tensors \\['model.norm.weight'\\]"),
])
def test_load_llama_names_what_is_wrong(checkpoints, tmp_path, change, message):
  directory = copy_checkpoint(checkpoints["gqa"][0], tmp_path / "copy", **change)
  with pytest.raises(ValueError, match=message):
    hf.load_llama(directory)


def test_load_llama_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_llama(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**SMALL, "num_attention_heads": 4}))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_llama(tmp_path)


# --- checkpoints out ---------------------------------------------------------

def test_save_llama_round_trip_in_shards(base, checkpoints, tmp_path):
  model, params = base
  out = hf.save_llama(tmp_path / "out", params, model.config, max_shard_bytes=20_000)
  assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
  model2, params2 = hf.load_llama(out)
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    hf.save_llama(out, params, model.config)
  halved = jax.tree.map(lambda x: x / 2, params)
  hf.save_llama(out, halved, model.config, overwrite=True)  # replaced only once complete
  jax.tree.map(np.testing.assert_array_equal, hf.load_llama(out)[1], halved)
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
  tied = dataclasses.replace(model.config, tie_word_embeddings=True)
  with pytest.raises(ValueError, match="unexpected tensors \\['lm_head.weight'\\]"):
    hf.save_llama(tmp_path / "tied", params, tied)


def test_export_merged_safetensors_is_a_plain_transformers_model(base, tmp_path):
  model, params = base
  config = lj.LoRAConfig(rank=4, alpha=8.0, use_dora=True)
  lora_model, lora_params = with_trained_adapters(model, params, config)
  expected = lora_model.apply({"params": lora_params}, jnp.asarray(IDS))
  out = hf.export_merged_safetensors(tmp_path / "merged", lora_params, config,
                                     model_config=model.config)
  merged = no_warnings(transformers.LlamaForCausalLM.from_pretrained, out).eval()
  np.testing.assert_allclose(torch_logits(merged), expected, atol=1e-4, rtol=0)
  bf16 = hf.export_merged_safetensors(tmp_path / "bf16", lora_params, config, jnp.bfloat16,
                                      model_config=model.config)
  assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
  auto = transformers.LlamaForCausalLM.from_pretrained(bf16, torch_dtype="auto")
  assert auto.dtype == torch.bfloat16


# --- PEFT adapters out and back ------------------------------------------------

EXPORTS = {
    "patterns": lj.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"),
                              rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0},
                              use_rslora=True),
    "dora-head": lj.LoRAConfig(rank=8, alpha=16.0, use_dora=True, trainable=("lm_head",),
                               exclude=("layers_1/mlp/up_proj",)),
    "path-rules": lj.LoRAConfig(rank=16, alpha=16.0,
                                rank_pattern={"layers_0/self_attn/q_proj": 8}),
    # First match wins in both libraries, but PEFT sorts the keys first.
    "overlapping": lj.LoRAConfig(rank=8, alpha=8.0, targets=("q_proj", "v_proj"),
                                 rank_pattern={"v_proj": 2, ".*_proj": 4},
                                 alpha_pattern={"v_proj": 2.0, ".*_proj": 32.0}),
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_peft_loads_in_peft_with_the_same_logits(base, checkpoints, tmp_path, name):
  config = EXPORTS[name]
  model, params = base
  lora_model, lora_params = with_trained_adapters(model, params, config)
  expected = np.asarray(lora_model.apply({"params": lora_params}, jnp.asarray(IDS)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", hf.ServingWarning)
    out = hf.export_peft(tmp_path / "peft", lora_params, config, base_model_name_or_path="tiny")

  text = (out / "adapter_config.json").read_text()
  assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
  torch_base = transformers.LlamaForCausalLM.from_pretrained(checkpoints["gqa"][0])
  peft_model = no_warnings(PeftModel.from_pretrained, torch_base, out).eval()
  np.testing.assert_allclose(torch_logits(peft_model), expected, atol=1e-4, rtol=0)

  adapters, imported = hf.import_peft(out)
  jax.tree.map(np.testing.assert_array_equal, adapters, lj.split(lora_params, config)[0])
  layers = lj.targets(model, config, jnp.asarray(IDS))
  assert lj.targets(model, imported, jnp.asarray(IDS)) == layers
  for layer in layers:
    assert imported.adapter_for(layer) == config.adapter_for(layer)
  assert imported.trainable == config.trainable


def test_export_peft_keeps_short_rules_and_torch_layout(base, tmp_path):
  model, params = base
  config = EXPORTS["patterns"]
  _, lora_params = with_trained_adapters(model, params, config)
  with pytest.warns(hf.ServingWarning):
    out = hf.export_peft(tmp_path / "peft", lora_params, config)
  saved = json.loads((out / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert saved["rank_pattern"] == {"v_proj": 2} and saved["alpha_pattern"] == {"down_proj": 3}
  tensors = load_file(out / "adapter_model.safetensors")
  a = lora_params["layers_1"]["self_attn"]["v_proj"]["lora_a"]
  np.testing.assert_array_equal(
      tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"], a.T)
  assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 2)


def test_export_peft_warns_about_each_setting_vllm_cannot_serve(base, tmp_path):
  model, params = base
  config = lj.LoRAConfig(rank=12, alpha=8.0, use_dora=True, trainable=("lm_head",),
                         rank_pattern={"v_proj": 8}, targets=("q_proj", "v_proj"))
  _, lora_params = with_trained_adapters(model, params, config)
  with pytest.warns(hf.ServingWarning) as caught:
    hf.export_peft(tmp_path / "a", lora_params, config)
  messages = "\n".join(str(w.message) for w in caught)
  assert len(caught) == 4
  for word in ("use_dora", "modules_to_save ['lm_head']", "rank_pattern {'v_proj': 8}",
               "rank(s) [12]"):
    assert word in messages
  servable = lj.LoRAConfig(rank=16, alpha=32.0, targets=("q_proj", "v_proj"))
  _, lora_params = with_trained_adapters(model, params, servable)
  no_warnings(hf.export_peft, tmp_path / "b", lora_params, servable)


def test_export_peft_refuses_what_peft_cannot_name(base, tmp_path):
  model, params = base
  _, lora_params = with_trained_adapters(model, params, EXPORTS["patterns"])
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "mine.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    hf.export_peft(tmp_path / "taken", lora_params, EXPORTS["patterns"])
  assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
  odd = {"encoder": {"dense": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1)),
                               "lora_b": jnp.ones((1, 2))}}}
  with pytest.raises(ValueError, match="'encoder/dense' is not a module of the reference Llama"):
    hf.export_peft(tmp_path / "odd", odd, lj.LoRAConfig(rank=1))


def test_export_peft_from_a_scanned_model(checkpoints):
  """Rules are resolved on the stacked paths the config was written for."""
  directory, _ = checkpoints["gqa"]
  model, params = hf.load_llama(directory, scan_layers=True)
  config = lj.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                         alpha_pattern={"layers/self_attn/q_proj": 32.0})
  lora_model, lora_params = with_trained_adapters(model, params, config)
  expected = np.asarray(lora_model.apply({"params": lora_params}, jnp.asarray(IDS)))
  out = directory.parent / "scanned-peft"
  with pytest.warns(hf.ServingWarning):
    hf.export_peft(out, lora_params, config)
  peft_model = no_warnings(PeftModel.from_pretrained,
                           transformers.LlamaForCausalLM.from_pretrained(directory), out).eval()
  np.testing.assert_allclose(torch_logits(peft_model), expected, atol=1e-4, rtol=0)


def test_export_peft_from_adapters_alone(base, checkpoints, tmp_path):
  """Without the base, short target names are used only where they are provably exact."""
  model, params = base
  every = lj.LoRAConfig(rank=8, alpha=8.0, targets=("q_proj",))
  some = lj.LoRAConfig(rank=8, alpha=8.0, targets=("q_proj",), exclude=("layers_1/self_attn/q_proj",))
  for name, config, expected in (("every", every, ["q_proj"]),
                                 ("some", some, "model\\.layers\\.0\\.self_attn\\.q_proj")):
    _, lora_params = with_trained_adapters(model, params, config)
    out = hf.export_peft(tmp_path / name, lj.split(lora_params, config)[0], config)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == expected
    no_warnings(PeftModel.from_pretrained,
                transformers.LlamaForCausalLM.from_pretrained(checkpoints["gqa"][0]), out)


def test_export_peft_refuses_a_trained_embedding_tied_to_the_head(checkpoints, tmp_path):
  model, params = hf.load_llama(checkpoints["tied"][0])
  config = lj.LoRAConfig(rank=8, targets=("q_proj",), trainable=("embed_tokens",))
  _, lora_params = with_trained_adapters(model, params, config)
  with pytest.raises(ValueError, match="lm_head is tied"):
    hf.export_peft(tmp_path / "out", lora_params, config)
  assert not (tmp_path / "out").exists()


# --- PEFT adapters in ---------------------------------------------------------

IMPORTS = {
    # layer 1's up_proj is saved whole, so PEFT gives it no adapter.
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                     rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 2},
                     use_rslora=True, modules_to_save=["layers.1.mlp.up_proj"]),
    "regex-dora-head": dict(r=2, lora_alpha=4, use_dora=True, modules_to_save=["lm_head"],
                            target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"),
    "layers-to-transform": dict(r=8, lora_alpha=8, layers_to_transform=0,
                                target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                rank_pattern={"^model.layers.0.mlp.*": 4}),
}


@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_import_peft_gives_peft_logits(base, checkpoints, tmp_path, name):
  torch.manual_seed(1)
  torch_base = transformers.LlamaForCausalLM.from_pretrained(checkpoints["gqa"][0])
  peft_model = get_peft_model(torch_base, LoraConfig(init_lora_weights=False, **IMPORTS[name]))
  with torch.no_grad():  # train the saved copies a little
    for module in peft_model.modules():
      if isinstance(getattr(module, "modules_to_save", None), torch.nn.ModuleDict):
        saved = module.modules_to_save["default"].weight
        saved.add_(0.1 * torch.randn_like(saved))
  peft_model.eval().save_pretrained(tmp_path / "peft")
  expected = torch_logits(peft_model)

  adapters, config = hf.import_peft(tmp_path / "peft")
  model, params = base
  _, frozen = lj.split(params, config)
  lora_model = lj.inject(model, config)
  logits = lora_model.apply({"params": lj.combine(adapters, frozen)}, jnp.asarray(IDS))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  adapted = {hf.jax_module(n.removeprefix("base_model.model."))
             for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
  assert set(lj.targets(model, config, jnp.asarray(IDS))) == adapted


def test_import_peft_names_what_it_cannot_read(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    hf.import_peft(tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    hf.import_peft(tmp_path)
  save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((2, 4),
                                                                                 np.float32)},
            str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="peft_type 'IA3'"):
    hf.import_peft(tmp_path)
  lora = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["up_proj"]}
  (tmp_path / "adapter_config.json").write_text(json.dumps({**lora, "bias": "all"}))
  with pytest.raises(ValueError, match="'bias': 'all'"):
    hf.import_peft(tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps({**lora, "init_lora_weights": "pissa"}))
  with pytest.raises(ValueError, match="'pissa', which rewrites the base weights"):
    hf.import_peft(tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps(lora))
  with pytest.raises(ValueError, match="lacks lora_A or lora_B"):
    hf.import_peft(tmp_path)
  save_file({"base_model.model.model.encoder.dense.lora_A.weight": np.ones((2, 4), np.float32)},
            str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="tensor 'base_model.model.model.encoder.dense"):
    hf.import_peft(tmp_path)


# --- the command line -----------------------------------------------------------

def test_cli_export_and_import_peft(base, tmp_path, capsys):
  model, params = base
  config = lj.LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
  _, lora_params = with_trained_adapters(model, params, config)
  save_adapter(tmp_path / "adapter", lora_params, config)
  assert cli.main(["export-peft", "--adapter", str(tmp_path / "adapter"),
                   "--output", str(tmp_path / "peft"), "--base-model", "org/tiny"]) == 0
  saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert saved["base_model_name_or_path"] == "org/tiny"
  assert cli.main(["import-peft", "--adapter", str(tmp_path / "peft"),
                   "--output", str(tmp_path / "back")]) == 0
  adapters, back = load_adapter(tmp_path / "back")
  jax.tree.map(np.testing.assert_array_equal, adapters, lj.split(lora_params, config)[0])
  assert back.targets == config.targets and back.alpha == config.alpha
  assert cli.main(["import-peft", "--adapter", str(tmp_path / "peft"),
                   "--output", str(tmp_path / "back")]) == 2
  assert "refusing to overwrite" in capsys.readouterr().err
