"""Mistral, Qwen 2, Qwen 3 (the Llama architecture's other families), Gemma 2 and
Gemma 3 against transformers and PEFT in PyTorch: logits, greedy generation,
PEFT adapters out and in, merged checkpoints, saved configs, published sizes
and bad configs."""

import dataclasses
import itertools
import json
import math
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import host_random
import tiny_hf
from cli_runner import lora_jax

import lora_jax as lj
from lora_jax import bases, checkpoint, hf, sharding
from lora_jax.recipe import ModelSection
from lora_jax.models import config_for, model_for
from lora_jax.models.generation import generate
from lora_jax.models.llama import LlamaConfig, stack_layers

IDS = np.random.default_rng(0).integers(0, 64, (2, 24))
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)
# Each exercises what the family adds: windows shorter than the sequence (on some layers
# only, for Qwen), q/k/v biases, q/k norms, tied and untied heads, GQA.
FAMILIES = {
    "mistral": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=4,
                                             max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=12, tie_word_embeddings=False)),
    "qwen3-window": (transformers.Qwen3Config, dict(
        head_dim=8, use_sliding_window=True, sliding_window=6, attention_bias=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # Soft-caps low enough to bite, a query scale apart from head_dim's.
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=0.005,
        final_logit_softcapping=0.05)),
    # Local layers at their own rotary base, global ones scaled linearly; untied.
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        head_dim=8, query_pre_attn_scalar=8, sliding_window=4, rope_theta=50.0,
        rope_local_base_freq=10.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
}
ADAPTER = lj.LoRAConfig(rank=8, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                      "down_proj"), use_rslora=True)


def torch_logits(model, ids=IDS, mask=None) -> np.ndarray:
  with torch.no_grad():
    mask = None if mask is None else torch.tensor(mask)
    return model(torch.tensor(ids), attention_mask=mask).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, the transformers model)."""
  out = {}
  for name, (cls, extra) in FAMILIES.items():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cls(**SMALL, **extra), attn_implementation="eager").eval()
    with torch.no_grad():  # biases and norms off their zero/one init, so they count
      for key, p in model.named_parameters():
        if key.endswith("bias") or key.endswith("norm.weight"):
          p.add_(0.3 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    out[name] = directory, model
  return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
  return {name: hf.load_llama(directory) for name, (directory, _) in checkpoints.items()}


def with_adapters(model, params, config=ADAPTER, seed=1):
  lora_model = lj.inject(model, config)
  full = lj.init_adapters(lora_model, params, jax.random.key(seed), jnp.asarray(IDS))
  seeds = itertools.count(1000 * seed)
  nudge = lambda kp, x: host_random.nudge(x, next(seeds), 0.05) if kp[-1].key == "lora_b" else x
  return lora_model, jax.tree_util.tree_map_with_path(nudge, full)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_equal_transformers(checkpoints, loaded, name):
  _, torch_model = checkpoints[name]
  model, params = loaded[name]
  assert model.config.model_type == name.split("-")[0]
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(IDS)),
                             torch_logits(torch_model), atol=1e-4, rtol=0)
  # Left padding: windows count cache slots, as transformers' masks do.
  mask = np.ones(IDS.shape, np.int64)
  mask[1, :7] = 0
  logits = model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits)[1, 7:], torch_logits(torch_model, mask=mask)[1, 7:],
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mistral", "qwen3-window", "gemma3_text"])
def test_scanned_layers_keep_each_layers_window(loaded, name):
  model, params = loaded[name]
  scanned = model_for(dataclasses.replace(model.config, scan_layers=True))
  np.testing.assert_allclose(scanned.apply({"params": stack_layers(params)}, jnp.asarray(IDS)),
                             model.apply({"params": params}, jnp.asarray(IDS)),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3-window", "gemma2", "gemma3_text"])
def test_greedy_generate_equals_transformers(checkpoints, loaded, name):
  _, torch_model = checkpoints[name]
  model, params = loaded[name]
  prompt = IDS[:, :6]
  # Eight new tokens: past the window, so the cache's masking shows.
  out = generate(model, params, jnp.asarray(prompt), max_new_tokens=8)
  with torch.no_grad():
    expected = torch_model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0).numpy()
  np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_peft_export_loads_in_peft_with_the_same_logits(checkpoints, loaded, tmp_path, name):
  directory, _ = checkpoints[name]
  model, params = loaded[name]
  lora_model, lora_params = with_adapters(model, params)
  expected = np.asarray(lora_model.apply({"params": lora_params}, jnp.asarray(IDS)))
  out = hf.export_peft(tmp_path / "peft", lora_params, ADAPTER, model_config=model.config,
                       base_model_name_or_path=str(directory))
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_model = PeftModel.from_pretrained(torch_base, out).eval()
  assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
  np.testing.assert_allclose(torch_logits(peft_model), expected, atol=1e-4, rtol=0)

  # ... and the merged checkpoint is a plain transformers model of the family.
  merged = hf.export_merged_safetensors(tmp_path / "merged", lora_params, ADAPTER,
                                        model_config=model.config)
  assert json.loads((merged / "config.json").read_text())["model_type"] == name.split("-")[0]
  plain = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager")
  assert type(plain) is type(torch_base)
  np.testing.assert_allclose(torch_logits(plain.eval()), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen2", "qwen3-window", "gemma2", "gemma3_text"])
def test_peft_import_of_a_torch_adapter_gives_peft_logits(checkpoints, loaded, tmp_path, name):
  directory, _ = checkpoints[name]
  torch.manual_seed(1)
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager")
  peft_model = get_peft_model(torch_base, LoraConfig(
      r=4, lora_alpha=8, init_lora_weights=False, use_dora=name == "qwen2",
      target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]))
  peft_model.eval().save_pretrained(tmp_path / "peft")
  adapters, config = hf.import_peft(tmp_path / "peft")
  model, params = loaded[name]
  _, frozen = lj.split(params, config)
  logits = lj.inject(model, config).apply({"params": lj.combine(adapters, frozen)},
                                          jnp.asarray(IDS))
  np.testing.assert_allclose(logits, torch_logits(peft_model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_saved_checkpoint_reloads_as_the_same_family(checkpoints, loaded, tmp_path, name):
  _, torch_model = checkpoints[name]
  model, params = loaded[name]
  hf.save_llama(tmp_path / "saved", params, model.config)
  again, again_params = hf.load_llama(tmp_path / "saved")
  assert again.config == model.config
  reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved",
                                                             attn_implementation="eager")
  assert type(reread) is type(torch_model)
  layer_types = lambda m: getattr(m.config, "layer_types", None)  # Mistral's have none
  assert layer_types(reread) == layer_types(torch_model)
  np.testing.assert_allclose(torch_logits(reread.eval()), torch_logits(torch_model),
                             atol=1e-5, rtol=0)


# Each preset's size by eval_shape equals transformers' model of the published config
# (counted on the meta device), which equals the published totals.
@pytest.mark.parametrize("name, total", [
    ("mistral-7b", 7_241_732_096),
    ("mistral-7b-v0.3", 7_248_023_552),
    ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-7b", 7_615_616_512),
    ("qwen3-0.6b", 596_049_920),
    ("qwen3-8b", 8_190_735_360),
    ("qwen3-32b", 32_762_123_264),
    ("gemma-2-2b", 2_614_341_888),
    ("gemma-2-9b", 9_241_705_984),
    ("gemma-2-27b", 27_227_128_320),
    ("gemma-3-1b", 999_885_952),
    # Gemma 3 4B and larger: the language model (Gemma3ForCausalLM); the published
    # totals add the SigLIP vision encoder.
    ("gemma-3-4b", 3_880_263_168),
    ("gemma-3-12b", 11_766_034_176),
    ("gemma-3-27b", 27_009_346_304),
])
def test_preset_param_counts_equal_published_totals(name, total):
  config = config_for(name, scan_layers=True)
  shapes = jax.eval_shape(model_for(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == total


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"attention_bias": True}, "attention_bias"),  # Qwen 2's o_proj never has a bias
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window=0"),
    ({"use_sliding_window": True, "layer_types": ["sliding_attention"]}, "layer_types"),
])
def test_config_names_what_the_model_cannot_honour(checkpoints, tmp_path, change, message):
  directory, _ = checkpoints["qwen2"]
  target = tmp_path / "bad"
  shutil.copytree(directory, target)
  config = json.loads((target / "config.json").read_text())
  (target / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(ValueError, match=message):
    hf.load_llama(target)


def test_config_checks_its_options():
  with pytest.raises(ValueError, match="model_type='gemma'"):
    LlamaConfig(64, 32, 48, 2, 4, 2, model_type="gemma")
  with pytest.raises(ValueError, match="sliding_window is None"):
    LlamaConfig(64, 32, 48, 2, 4, 2, layer_types=("sliding_attention", "full_attention"))
  with pytest.raises(ValueError, match="for each of the 2 layers"):
    LlamaConfig(64, 32, 48, 2, 4, 2, sliding_window=4, layer_types=("full_attention",))
  c = LlamaConfig(64, 32, 48, 2, 4, 2, sliding_window=4,
                  layer_types=["full_attention", "sliding_attention"])
  assert c.layer_types == ("full_attention", "sliding_attention") and c.windows() == (0, 4)
  assert LlamaConfig(64, 32, 48, 2, 4, 2, sliding_window=4).windows() == (4, 4)
  assert LlamaConfig(64, 32, 48, 2, 4, 2).windows() is None


# --- the command line on a family's checkpoint -----------------------------------------

CLI_FAMILIES = {
    "gemma3_text": ("Gemma3TextConfig", "Gemma 3", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"])),
    "qwen3": ("Qwen3Config", "Qwen 3", dict(head_dim=16, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", sorted(CLI_FAMILIES))
def test_cli_trains_a_family_checkpoint_and_peft_loads_it(tmp_path, name):
  config_class, family, extra = CLI_FAMILIES[name]
  ckpt = tiny_hf.make_checkpoint(tmp_path / "ckpt", config_class=config_class, **extra)
  code, stdout, err = lora_jax("info", f"model.base=hf:{ckpt}")
  assert code == 0, err
  assert f"(Hugging Face checkpoint, {family})" in stdout
  rows = tmp_path / "chat.jsonl"
  rows.write_text("\n".join(json.dumps(r) for r in tiny_hf.chat_rows()[:64]) + "\n")
  out = tmp_path / "run"
  code, stdout, err = lora_jax(
      "train", "--no-progress", f"model.base=hf:{ckpt}", f"data.train={rows}",
      f"output_dir={out}", "data.seq_len=32", "train.batch_size=8", "train.steps=3",
      "train.learning_rate=0.01", "train.warmup_steps=1", "train.eval_every=0",
      "train.eval_batches=1", "lora.targets=all-linear")
  assert code == 0, err
  # The PEFT adapter on transformers' model of the family gives lora_jax's logits.
  base = bases.resolve(ModelSection(base=f"hf:{ckpt}"))
  model, params = base.load()
  adapters, config = checkpoint.load_adapter(out / "adapter", target=params)
  ids = np.asarray(base.tokenizer().encode("ABSURDITY, n. A statement", bos=True))[None]
  ours = lj.inject(model, config).apply({"params": lj.combine(adapters, params)},
                                        jnp.asarray(ids))
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
  peft_model = PeftModel.from_pretrained(torch_base, out / "peft").eval()
  np.testing.assert_allclose(np.asarray(ours), torch_logits(peft_model, ids), atol=1e-4, rtol=0)
  assert json.loads((out / "peft" / "adapter_config.json").read_text())["target_modules"]


def test_a_family_loads_onto_a_mesh_scanned_in_bfloat16(checkpoints):
  directory, torch_model = checkpoints["gemma3_text"]
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  model, params = hf.load_llama(directory, mesh=mesh, scan_layers=True)
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (3, 32, 32) and len(q.sharding.device_set) == 8
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))
  np.testing.assert_allclose(logits, torch_logits(torch_model), atol=1e-4, rtol=0)
  # bf16 params and compute: close to float32, not equal.
  model16, params16 = hf.load_llama(directory, dtype=jnp.bfloat16)
  logits16 = model16.apply({"params": params16}, jnp.asarray(IDS))
  assert params16["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  assert 0 < float(jnp.max(jnp.abs(logits16 - logits))) < 0.1


def test_gemma3_with_its_vision_encoder_loads_its_language_model(tmp_path):
  text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14)
  torch.manual_seed(0)
  torch_model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
  torch_model.save_pretrained(tmp_path / "mm")
  model, params = hf.load_llama(tmp_path / "mm")
  assert model.config.model_type == "gemma3_text" and "vision_tower" not in params
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(IDS)),
                             torch_logits(torch_model), atol=1e-4, rtol=0)


def test_gemma_configs_fill_what_config_json_leaves_out_as_transformers_does():
  # A hub Gemma 3 4B text_config gives a few keys; transformers' defaults give the rest.
  sparse = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0})
  for kind, cls in (("gemma3_text", transformers.Gemma3TextConfig),
                    ("gemma2", transformers.Gemma2Config)):
    fields = {k: v for k, v in sparse.items() if kind == "gemma3_text" or k != "rope_scaling"}
    ours, theirs = hf.gemma_config({"model_type": kind, **fields}), cls(**fields)
    assert (ours.vocab_size, ours.num_heads, ours.num_kv_heads, ours.head_dim,
            ours.query_pre_attn_scalar, ours.rope_theta, ours.max_position_embeddings,
            ours.attn_logit_softcapping, ours.final_logit_softcapping,
            ours.tie_word_embeddings) == (
        theirs.vocab_size, theirs.num_attention_heads, theirs.num_key_value_heads,
        theirs.head_dim, theirs.query_pre_attn_scalar, theirs.rope_theta,
        theirs.max_position_embeddings, theirs.attn_logit_softcapping,
        theirs.final_logit_softcapping, theirs.tie_word_embeddings)
    assert list(ours.layer_types) == theirs.layer_types
  assert hf.gemma_config({"model_type": "gemma3_text", **sparse}) == config_for("gemma-3-4b")


@pytest.mark.parametrize("preset, family", [("qwen3-0.6b", "Qwen 3"), ("gemma-2-2b", "Gemma 2"),
                                            ("mistral-7b", "Mistral")])
def test_a_preset_base_picks_its_family(preset, family):
  code, stdout, err = lora_jax("info", f"model.base=preset:{preset}", "lora.targets=[q_proj]")
  assert code == 0, err
  assert f"(preset (random weights), {family})" in stdout
  total = sum(math.prod(s.shape) for s in jax.tree.leaves(jax.eval_shape(
      model_for(config_for(preset)).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
  trainable = int(re.search(r"trainable: ([\d,]+)", stdout).group(1).replace(",", ""))
  assert f"layers, {total + trainable:,} params" in stdout  # the family's own size, + adapters
