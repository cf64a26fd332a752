"""AdapterSet: named adapters on one base; per-name checkpoints; PEFT's multi-adapter layout."""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import lora_jax as lj
from lora_jax import hf
from lora_jax.adapter_set import AdapterSet
from lora_jax.checkpoint import load_adapter

MLP = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5)), jnp.float32)
CONFIGS = {
    "x": lj.LoRAConfig(rank=2, alpha=4.0, targets=["layers_0"]),
    "y": lj.LoRAConfig(rank=1, alpha=2.0, use_dora=True, trainable=["layers_2/bias"]),
}


def random_like(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray((0.5 * rng.standard_normal(s.shape)).astype(s.dtype)),
                      shapes)


@pytest.fixture(scope="module")
def base():
  return random_like(jax.eval_shape(MLP.init, jax.random.key(0), X)["params"], 0)


@pytest.fixture(scope="module")
def full(base):
  """name -> the full params of that adapter (base + adapters, `trainable` replaced)."""
  out = {}
  for seed, (name, config) in enumerate(CONFIGS.items(), 1):
    shapes = jax.eval_shape(lj.inject(MLP, config).init, jax.random.key(0), X)["params"]
    adapters, _ = lj.split(random_like(shapes, seed), config)
    rest = lj.split(base, config)[1]  # less the params the adapter trains fully
    out[name] = lj.combine(adapters, rest)
  return out


@pytest.fixture
def two(full):
  adapter_set = AdapterSet()
  for name in ("y", "x"):  # not sorted: the set keeps this order
    adapter_set.add(name, full[name], CONFIGS[name])
  return adapter_set


def snapshot(tree):
  return jax.tree.map(np.array, tree)


def same_leaves(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- the collection ------------------------------------------------------------

def test_a_set_is_an_ordered_collection_of_adapter_leaves(two, full):
  assert two.names == ("y", "x") and list(two) == ["y", "x"] and len(two) == 2
  assert "x" in two and "z" not in two and repr(two) == "AdapterSet(['y', 'x'])"
  adapters, config = two["y"]
  assert config is CONFIGS["y"]
  assert sorted(lj.tree.leaf_paths(adapters)) == [
      "layers_0/lora_a", "layers_0/lora_b", "layers_0/lora_magnitude", "layers_2/bias",
      "layers_2/lora_a", "layers_2/lora_b", "layers_2/lora_magnitude"]
  assert adapters["layers_0"]["lora_a"] is full["y"]["layers_0"]["lora_a"]  # not copied
  two.add("y", full["x"], CONFIGS["x"], overwrite=True)  # replaced in its place
  assert two.names == ("y", "x") and two["y"][1] is CONFIGS["x"]
  two.remove("y")
  assert two.names == ("x",)


def test_each_name_runs_its_adapter_and_none_the_base(two, base, full):
  before = snapshot(base)
  for name in two:
    params = two.params(base, name)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, full[name])
    y = two.model(MLP, name).apply({"params": params}, X)
    merged = lj.merge(full[name], CONFIGS[name])
    np.testing.assert_allclose(y, MLP.apply({"params": merged}, X), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, MLP.apply({"params": base}, X))
    for layer, leaves in base.items():  # the base's own leaves, as objects
      for key, leaf in leaves.items():
        if not (name == "y" and f"{layer}/{key}" == "layers_2/bias"):
          assert params[layer][key] is leaf
  assert two.params(base, None) is base and two.model(MLP, None) is MLP
  plain = two.model(two.model(MLP, "x"), None)
  np.testing.assert_array_equal(plain.apply({"params": base}, X), MLP.apply({"params": base}, X))
  same_leaves(base, before)


# --- bad input -----------------------------------------------------------------

def test_bad_names_and_adapters_are_refused_and_change_nothing(two, full, base):
  entries = {n: two[n] for n in two}
  for name, message in [("", "non-empty string"), (None, "non-empty string"),
                        ("a/b", "must not contain '/'"), ("..", "must not contain '/'"),
                        ("__base__", "reserved for the base model")]:
    with pytest.raises(ValueError, match=message):
      two.add(name, full["x"], CONFIGS["x"])
  with pytest.raises(ValueError, match="an adapter named 'x' is in the set already"):
    two.add("x", full["y"], CONFIGS["y"])
  with pytest.raises(ValueError, match="hold no adapter leaves"):
    two.add("z", base, CONFIGS["x"])
  with pytest.raises(ValueError, match="expected a LoRAConfig"):
    two.add("z", full["x"], {"rank": 2})
  with pytest.raises(ValueError, match="'layers_0' lacks a DoRA magnitude"):
    two.add("z", full["x"], lj.LoRAConfig(rank=2, use_dora=True))
  for call in (lambda: two["z"], lambda: two.remove("z"), lambda: two.params(base, "z"),
               lambda: two.model(MLP, "z")):
    with pytest.raises(KeyError, match=r"no adapter named 'z'; the set holds \['y', 'x'\]"):
      call()
  with pytest.raises(ValueError, match="the base params hold adapters already \\(at 'layers_0'\\)"):
    two.params(full["x"], "y")
  assert {n: two[n] for n in two} == entries and two.names == ("y", "x")


# --- checkpoints ---------------------------------------------------------------

def test_save_and_load_round_trip_in_order(two, base, tmp_path):
  out = two.save(tmp_path / "set")
  assert json.loads((out / "adapter_set.json").read_text())["names"] == ["y", "x"]
  loaded = AdapterSet.load(out, target=base)
  assert loaded.names == ("y", "x")
  for name in two:
    same_leaves(loaded[name][0], two[name][0])
    assert loaded[name][1] == two[name][1]
    alone, config = load_adapter(out / name)  # each name is an ordinary adapter checkpoint
    same_leaves(alone, two[name][0])


def listing(path):
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_saving_over_anything_is_refused_before_writing(two, full, tmp_path):
  out = two.save(tmp_path / "set")
  before = listing(out)
  with pytest.raises(FileExistsError, match=r"an adapter set of \['y', 'x'\].*overwrite=True"):
    two.save(out)
  (tmp_path / "file").write_text("mine")
  with pytest.raises(FileExistsError, match="is a file"):
    two.save(tmp_path / "file")
  with pytest.raises(ValueError, match="holds no adapters: nothing to write"):
    AdapterSet().save(tmp_path / "empty")
  odd = AdapterSet()
  odd.add("adapter_set.json", full["x"], CONFIGS["x"])
  with pytest.raises(ValueError, match="would overwrite the set's index"):
    odd.save(tmp_path / "odd")
  with pytest.raises(FileNotFoundError, match="holds no adapter set"):
    AdapterSet.load(tmp_path)
  assert listing(out) == before and (tmp_path / "file").read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "set"]  # no staging left
  one = AdapterSet()
  one.add("x", *two["x"])
  one.save(out, overwrite=True)  # then the directory holds exactly this set
  assert AdapterSet.load(out).names == ("x",) and not (out / "y").exists()


# --- PEFT ----------------------------------------------------------------------

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
IDS = np.random.default_rng(0).integers(0, 64, (2, 12))
PEFT_ADAPTERS = {
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "second": dict(r=2, lora_alpha=4, use_rslora=True, use_dora=True,
                   target_modules=["k_proj", "down_proj"]),
}


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


def adapter_files(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("adapter_*"))


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
  """A tiny Llama checkpoint; two adapters saved by PEFT; PEFT's logits for each."""
  root = tmp_path_factory.mktemp("peft")
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(root / "llama")
  torch.manual_seed(1)
  model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "llama"),
                         LoraConfig(init_lora_weights=False, **PEFT_ADAPTERS["default"]))
  model.add_adapter("second", LoraConfig(init_lora_weights=False, **PEFT_ADAPTERS["second"]))
  model.eval().save_pretrained(root / "adapters")
  logits = {}
  for name in PEFT_ADAPTERS:
    model.set_adapter(name)
    logits[name] = torch_logits(model)
  return root, logits


def test_import_peft_gives_each_adapter_peft_logits(peft_saved):
  root, expected = peft_saved
  adapter_set = AdapterSet.import_peft(root / "adapters")
  assert adapter_set.names == ("default", "second")
  assert adapter_set["second"][1].use_rslora and adapter_set["second"][1].use_dora
  model, base = hf.load_llama(root / "llama")
  for name in adapter_set:
    apply = jax.jit(adapter_set.model(model, name).apply)
    logits = apply({"params": adapter_set.params(base, name)}, jnp.asarray(IDS))
    np.testing.assert_allclose(logits, expected[name], atol=1e-4, rtol=0)


def test_export_peft_is_peft_layout_and_loads_in_peft(peft_saved, tmp_path):
  root, expected = peft_saved
  adapter_set = AdapterSet.import_peft(root / "adapters")
  with pytest.warns(hf.ServingWarning) as caught:  # each names its adapter
    out = adapter_set.export_peft(tmp_path / "out", base_model_name_or_path=str(root / "llama"))
  assert any(str(w.message).startswith("adapter 'second': for vLLM: use_dora") for w in caught)
  assert all(str(w.message).startswith(("adapter 'default'", "adapter 'second'")) for w in caught)
  assert adapter_files(out) == adapter_files(root / "adapters") == [
      "adapter_config.json", "adapter_model.safetensors", "second/adapter_config.json",
      "second/adapter_model.safetensors"]
  torch_base = transformers.LlamaForCausalLM.from_pretrained(root / "llama")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_model = PeftModel.from_pretrained(torch_base, out, adapter_name="default")
    loaded = peft_model.load_adapter(out / "second", adapter_name="second")
  assert not [str(w.message) for w in caught if "adapter" in str(w.message).lower()]
  assert not loaded.unexpected_keys
  assert not [k for k in loaded.missing_keys if "lora_" in k and ".second" in k]
  peft_model.eval()
  for name in PEFT_ADAPTERS:
    peft_model.set_adapter(name)
    np.testing.assert_allclose(torch_logits(peft_model), expected[name], atol=1e-4, rtol=0)
  again = AdapterSet.import_peft(out)
  for name in adapter_set:
    same_leaves(again[name][0], adapter_set[name][0])


def test_without_a_default_adapter_every_adapter_is_a_subdirectory_as_in_peft(peft_saved, tmp_path):
  root, _ = peft_saved
  imported = AdapterSet.import_peft(root / "adapters")
  torch.manual_seed(2)
  model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "llama"),
                         LoraConfig(**PEFT_ADAPTERS["default"]), adapter_name="beta")
  model.add_adapter("alpha", LoraConfig(**PEFT_ADAPTERS["second"]))
  model.save_pretrained(tmp_path / "peft")
  adapter_set = AdapterSet()
  adapter_set.add("beta", *imported["default"])
  adapter_set.add("alpha", *imported["second"])
  with pytest.warns(hf.ServingWarning):
    out = adapter_set.export_peft(tmp_path / "ours")
  assert adapter_files(out) == adapter_files(tmp_path / "peft") == [
      "alpha/adapter_config.json", "alpha/adapter_model.safetensors", "beta/adapter_config.json",
      "beta/adapter_model.safetensors"]
  back = AdapterSet.import_peft(out)
  assert back.names == ("alpha", "beta")  # PEFT records no order: sorted
  same_leaves(back["beta"][0], imported["default"][0])


def test_peft_directories_it_cannot_take_are_refused(peft_saved, tmp_path):
  root, _ = peft_saved
  adapter_set = AdapterSet.import_peft(root / "adapters")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "adapter_config.json").write_text("{}")
  with pytest.raises(FileExistsError, match="a PEFT adapter"):
    adapter_set.export_peft(tmp_path / "taken")
  assert [p.name for p in (tmp_path / "taken").iterdir()] == ["adapter_config.json"]
  (tmp_path / "none" / "sub").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="holds no PEFT adapter"):
    AdapterSet.import_peft(tmp_path / "none")
  odd = AdapterSet()
  odd.add("adapter_model.safetensors", *adapter_set["default"])
  with pytest.raises(ValueError, match="named as the root's PEFT file"):
    odd.export_peft(tmp_path / "odd")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["none", "taken"]
