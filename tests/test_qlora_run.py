"""QLoRA end to end: a Hugging Face checkpoint quantized as it is read (sharded), trained
by `lora-jax train model.quantize=nf4`, and the PEFT adapter on PyTorch's bitsandbytes NF4
base giving lora_jax's logits; LoftQ starts; merge paths; what `info` reports; bad input."""

import functools
import json
import re

import bitsandbytes
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel
import tiny_hf
from cli_runner import lora_jax

import lora_jax as lj
from lora_jax import bases, checkpoint, quantize as q, quantized_base as qb, serve, sharding
from lora_jax.hf.checkpoints import load_llama
from lora_jax.recipe import ModelSection

ARGS = ["data.seq_len=64", "train.batch_size=8", "train.learning_rate=0.01",
        "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
        "train.save_every=2", "lora.targets=all-linear", "lora.rank=8", "lora.alpha=16",
        # 64-wide kernels hold one NF4 block per column: the batch splits, the base does not.
        "mesh.data=-1", "mesh.fsdp=1"]
TEXT = "ABSURDITY, n. A statement or belief manifestly inconsistent with one's own opinion."


@pytest.fixture(scope="module")
def ckpt(tiny_llama):
  return tiny_llama


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "chat.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in tiny_hf.chat_rows()[:120]) + "\n")
  return path


def train(ckpt, chat_file, out, *extra):
  return lora_jax("train", "--no-progress", f"model.base=hf:{ckpt}", f"data.train={chat_file}",
                  f"output_dir={out}", *ARGS, *extra)


@pytest.fixture(scope="module")
def qlora(ckpt, chat_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("qlora") / "r"
  return out, train(ckpt, chat_file, out, "model.quantize=nf4", "train.steps=3")


@pytest.fixture(scope="module")
def loftq(ckpt, chat_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("loftq") / "r"
  first = train(ckpt, chat_file, out, "model.quantize=nf4", "lora.init=loftq",
                "lora.loftq_iter=2", "train.steps=2")
  start = jax.device_put(checkpoint.load_base(out / "loftq"), jax.devices()[0])  # 1 device
  second = train(ckpt, chat_file, out, "model.quantize=nf4", "lora.init=loftq",
                 "lora.loftq_iter=2", "train.steps=3")
  return out, first, second, start


def ids_of(ckpt):
  tok = bases.resolve(ModelSection(base=f"hf:{ckpt}")).tokenizer()
  return np.asarray(tok.encode(TEXT, bos=True))[None]


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


def bnb_nf4_model(directory):
  """The checkpoint as PyTorch users load it for QLoRA: bitsandbytes NF4, double-quantized.

  Its NF4 layers compute `x @ W.T` in float32 with W as bitsandbytes dequantizes
  it: on CPUs with AVX512-BF16 bitsandbytes' own fused CPU kernel rounds the
  input and the absmax to bfloat16, which is no exact reference.
  """
  config = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)
  model = transformers.LlamaForCausalLM.from_pretrained(
      directory, quantization_config=config, dtype=torch.float32, device_map="cpu").eval()
  for module in model.modules():
    if isinstance(module, bitsandbytes.nn.Linear4bit):
      module.forward = functools.partial(_dequantized_forward, module)
  return model


def _dequantized_forward(module, x):
  w = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
  return torch.nn.functional.linear(x, w.to(x.dtype), module.bias)


def float_model(directory):
  return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_the_quantized_base_is_bitsandbytes_nf4(ckpt):
  """lora_jax's NF4 base gives the logits transformers gives on a bitsandbytes NF4 load."""
  ids = ids_of(ckpt)
  model, params = bases.resolve(ModelSection(base=f"hf:{ckpt}", quantize="nf4")).load()
  ours = np.asarray(lj.quantized_model(model).apply({"params": params}, jnp.asarray(ids)))
  theirs = torch_logits(bnb_nf4_model(ckpt), ids)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert np.abs(torch_logits(float_model(ckpt), ids) - theirs).max() > 1e-3  # not the float base


@pytest.mark.parametrize("scan", [False, True])
def test_loading_quantizes_on_the_mesh_as_quantize_params_does(ckpt, scan):
  mesh = sharding.make_mesh(1, 8, 1)
  _, dense = load_llama(ckpt, scan_layers=scan)
  expected = qb.quantize_params(dense, "nf4", block=8)
  _, loaded = load_llama(ckpt, scan_layers=scan, mesh=mesh, quantize="nf4", quantize_block=8)
  leaves = lambda t: jax.tree_util.tree_leaves_with_path(t, is_leaf=q.is_quantized)
  kinds = 0
  for (path, got), (_, want) in zip(leaves(loaded), leaves(expected)):
    assert q.is_quantized(got) == q.is_quantized(want), path
    if q.is_quantized(got):
      kinds += 1
      assert (got.shape, got.block, got.double) == (want.shape, 8, True)
      # Bit-equal: the double quantization's mean is summed whole, as unsharded.
      for field in ("codes", "absmax", "absmax2", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                      np.asarray(getattr(want, field)))
      assert len(got.codes.sharding.device_set) == 8 and not got.codes.sharding.is_fully_replicated
    else:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert kinds == (7 if scan else 14)
  assert not q.is_quantized((loaded["lm_head"]["kernel"]))


def test_quantize_block_and_format_take_effect(ckpt):
  load = lambda **kw: nn.unbox(bases.resolve(ModelSection(base=f"hf:{ckpt}", **kw)).load()[1])
  kernel = lambda p: p["layers_0"]["mlp"]["down_proj"]["kernel"]  # (128, 64)
  assert kernel(load(quantize="nf4")).absmax.shape == (2, 64)
  assert kernel(load(quantize="nf4", quantize_block=32)).absmax.shape == (4, 64)
  int8 = kernel(load(quantize="int8"))
  assert int8.format == "int8" and int8.codes.dtype == jnp.int8
  assert not q.is_quantized(kernel(load()))


def test_peft_on_a_bitsandbytes_nf4_base_gives_the_qlora_logits(ckpt, qlora):
  out, (code, stdout, err) = qlora
  assert code == 0, err
  assert "peft:" in stdout and "merged:" not in stdout
  ids = ids_of(ckpt)
  base = bases.resolve(ModelSection(base=f"hf:{ckpt}", quantize="nf4"))
  model, params = base.load()
  adapters, config = serve.load_adapter(out / "adapter", params)
  assert float(jnp.abs(jax.tree.leaves(adapters)[1]).max()) > 0
  ours = np.asarray(lj.inject(model, config).apply({"params": lj.combine(adapters, params)},
                                                   jnp.asarray(ids)))
  theirs = torch_logits(PeftModel.from_pretrained(bnb_nf4_model(ckpt), out / "peft").eval(), ids)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # On the float base the same adapter gives other logits: the base was NF4 in training.
  float_peft = PeftModel.from_pretrained(float_model(ckpt), out / "peft").eval()
  assert np.abs(torch_logits(float_peft, ids) - theirs).max() > 1e-3


def test_generate_and_merge_on_the_quantized_base(ckpt, qlora, tmp_path):
  out = qlora[0]
  code, stdout, err = lora_jax("generate", "--base", f"hf:{ckpt}", "--quantize", "nf4",
                               "--adapter", str(out / "peft"), "--prompt", "ABSURDITY",
                               "--max-new-tokens", "5")
  assert code == 0, err
  code, _, err = lora_jax("merge", "--base", f"hf:{ckpt}", "--quantize", "nf4", "--adapter",
                          str(out / "adapter"), "--output", str(tmp_path / "merged"))
  assert code == 0, err
  # Merge path (a): the adapter folded into the dequantized NF4 kernels, a float model.
  ids = ids_of(ckpt)
  theirs = torch_logits(PeftModel.from_pretrained(bnb_nf4_model(ckpt), out / "peft").eval(), ids)
  np.testing.assert_allclose(torch_logits(float_model(tmp_path / "merged"), ids), theirs,
                             atol=1e-4)


def test_merge_quantize_block_takes_effect(ckpt, qlora, tmp_path):
  out = qlora[0]
  code, _, err = lora_jax("merge", "--base", f"hf:{ckpt}", "--quantize", "nf4",
                          "--quantize-block", "32", "--adapter", str(out / "adapter"),
                          "--output", str(tmp_path / "m32"))
  assert code == 0, err
  _, dense = bases.resolve(ModelSection(base=f"hf:{ckpt}")).load()
  merged = {}
  for block in (32, 64):
    quantized = qb.quantize_params(dense, "nf4", block=block)
    adapters, config = serve.load_adapter(out / "adapter", quantized)
    merged[block] = lj.merge(lj.combine(adapters, quantized), config)
  from safetensors.numpy import load_file
  written = load_file(tmp_path / "m32" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
  ours = lambda block: np.asarray(merged[block]["layers_0"]["mlp"]["up_proj"]["kernel"]).T
  np.testing.assert_allclose(written, ours(32), atol=1e-6)
  assert np.abs(written - ours(64)).max() > 1e-4


def test_requantizing_a_merge_reports_the_error_it_adds(ckpt, qlora):
  base = bases.resolve(ModelSection(base=f"hf:{ckpt}"))
  _, dense = base.load()
  for double in (False, True):
    quantized = qb.quantize_params(dense, "nf4", double=double)
    adapters, config = serve.load_adapter(qlora[0] / "adapter", quantized)
    zero = jax.tree.map(jnp.zeros_like, adapters)
    # Zero adapters: the merge is the dequantized base, which requantizes to itself.
    again, errors = lj.requantize_like(lj.merge(lj.combine(zero, quantized), config), quantized)
    kernel = lambda p: p["layers_1"]["self_attn"]["o_proj"]["kernel"]
    if not double:
      np.testing.assert_array_equal(np.asarray(kernel(again).codes),
                                    np.asarray(kernel(quantized).codes))
    # Double quantization quantizes the (already 8-bit) absmax values again around a new
    # mean: within a step of the 8-bit code.
    bound = 1e-3 if double else 1e-6
    np.testing.assert_allclose(np.asarray(kernel(again).dequantize()),
                               np.asarray(kernel(quantized).dequantize()), rtol=bound, atol=1e-9)
    assert max(errors.values()) < bound and len(errors) == 14
    # Trained adapters: path (b) requantizes the merged kernels, with the error it adds.
    merged = lj.merge(lj.combine(adapters, quantized), config)
    again, errors = lj.requantize_like(merged, quantized)
    assert q.is_quantized(kernel(again)) and kernel(again).double == double
    path = "layers_1/self_attn/o_proj/kernel"
    m = np.asarray(kernel(merged))
    expected = np.linalg.norm(np.asarray(kernel(again).dequantize()) - m) / np.linalg.norm(m)
    assert errors[path] == pytest.approx(expected, rel=1e-4) and 0.01 < errors[path] < 0.2


def test_a_loftq_run_fits_once_resumes_and_exports_its_own_base(ckpt, loftq):
  out, (code, stdout, err), (code2, stdout2, err2), start = loftq
  assert code == 0, err
  assert code2 == 0, err2
  assert "LoftQ: fitting the nf4 base and the adapters (2 iteration(s))" in stdout
  assert "LoftQ" not in stdout2
  assert "resuming from step 2" in stdout2
  # The start: a quantized base, and adapters that are not zero.
  kernel = start["layers_0"]["mlp"]["up_proj"]
  assert q.is_quantized(kernel["kernel"]) and np.abs(np.asarray(kernel["lora_b"])).max() > 0
  # PEFT on the exported LoftQ base gives lora_jax's logits on its quantized base.
  peft_config = json.loads((out / "peft" / "adapter_config.json").read_text())
  assert peft_config["base_model_name_or_path"] == str(out / "loftq_base")
  assert peft_config["init_lora_weights"] is True
  ids = ids_of(ckpt)
  base = bases.resolve(ModelSection(base=f"hf:{ckpt}", quantize="nf4"))
  model, _ = base.load()
  adapters, config = checkpoint.load_adapter(out / "adapter")
  _, frozen = lj.split(start, config)
  params = jax.device_put(lj.combine(adapters, frozen), jax.devices()[0])
  ours = np.asarray(lj.inject(model, config).apply({"params": params}, jnp.asarray(ids)))
  peft = PeftModel.from_pretrained(float_model(out / "loftq_base"), out / "peft").eval()
  np.testing.assert_allclose(ours, torch_logits(peft, ids), atol=1e-4)


def test_a_loftq_start_is_nearer_the_float_model_than_plain_nf4(ckpt, loftq):
  start = loftq[3]
  config = lj.LoRAConfig(rank=8, alpha=16, targets="all-linear")
  model, dense = bases.resolve(ModelSection(base=f"hf:{ckpt}")).load()
  ids = jnp.asarray(ids_of(ckpt))
  reference = model.apply({"params": dense}, ids)
  injected = lj.inject(model, config)
  plain = lj.init_adapters(injected, qb.quantize_params(dense, "nf4"), jax.random.key(0), ids)
  gap = lambda p: float(jnp.abs(injected.apply({"params": p}, ids) - reference).mean())
  assert gap(start) < 0.8 * gap(plain)


def test_info_shows_the_stored_bytes_beside_bfloat16(ckpt):
  code, stdout, err = lora_jax("info", f"model.base=hf:{ckpt}", "model.quantize=nf4")
  assert code == 0, err
  line = next(l for l in stdout.splitlines() if l.startswith("frozen base:"))
  stored, bits, bf16 = re.search(r"([\d.]+) MiB stored \(nf4: ([\d.]+) bits per weight .*"
                                 r", ([\d.]+) MiB in bfloat16", line).groups()
  # 14 kernels of 64 x 64 ... at 4.5 bits (absmax per 64 weights, 256-groups padded), the
  # embeddings and head in float32.
  _, dense = bases.resolve(ModelSection(base=f"hf:{ckpt}")).load()
  footprint = qb.footprint(qb.quantize_params(dense, "nf4"))
  assert float(stored) == pytest.approx(footprint["bytes"] / 2**20, abs=0.01)
  assert float(bits) == pytest.approx(8 * footprint["quantized_bytes"]
                                      / footprint["quantized_weights"], abs=1e-3)
  n = sum(x.size for x in jax.tree.leaves(dense))
  assert float(bf16) == pytest.approx(2 * n / 2**20, abs=0.01)
  code, plain, _ = lora_jax("info", f"model.base=hf:{ckpt}")
  assert "bits per weight" not in plain and f"{4 * n / 2**20:.2f} MiB stored" in plain


def test_a_trainable_rule_cannot_select_a_quantized_kernel():
  import optax
  from lora_jax import train
  model = lj.inject(nn.Dense(8), lj.LoRAConfig(rank=2, trainable=("kernel",)))
  x = jnp.ones((1, 64))
  params = model.init(jax.random.key(0), x)["params"]
  quantized = {**params, "kernel": q.quantize(params["kernel"], "int8")}
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="trainable rule 'kernel' selects the quantized kernel "
                     "'kernel': a quantized base is frozen"):
    train.make_train_step(lambda p, b, r: 0.0, optax.sgd(0.1), mesh, quantized,
                          lj.LoRAConfig(rank=2, trainable=("kernel",)))


@pytest.mark.parametrize("overrides, message", [
    (["model.quantize=fp4"], "model.quantize='fp4': must be one of none, nf4, int4, int8"),
    (["model.quantize=int8", "model.quantize_block=64"],
     "model.quantize_block=64: int8 has no blocks"),
    (["model.quantize=nf4", "model.quantize_block=33"],
     "model.quantize_block=33: must be an even number"),
    (["lora.init=pissa"], "LoRA init='pissa': must be one of"),
    (["lora.init=loftq"], "lora.init=loftq fits the adapters to a quantized base's error"),
    (["model.quantize=nf4", "lora.init=loftq", "lora.use_dora=true"],
     "does not start DoRA adapters"),
    (["model.quantize=nf4", "model.quantize_block=256"],
     "down_proj/kernel: a block of 256 weights does not divide its input axis of 384"),
])
def test_bad_quantization_settings_are_named(tmp_path, overrides, message):
  code, _, err = lora_jax("train", "--no-progress", f"output_dir={tmp_path / 'r'}",
                          "train.steps=1", *overrides)
  assert code == 2 and message in err, err
  assert not (tmp_path / "r" / "checkpoints").exists()


def test_full_training_refuses_a_quantized_base(tmp_path):
  code, _, err = lora_jax("pretrain", "--no-progress", f"output_dir={tmp_path / 'r'}",
                          "model.quantize=nf4", "train.steps=1")
  assert code == 2 and "full training needs float params" in err
