"""The main job on a Hugging Face checkpoint: a tiny random Llama saved by transformers with a
BPE tokenizer trained here and a chat template, fine-tuned by `lora-jax train` on chat JSONL,
out to a PEFT adapter that PyTorch's PEFT loads with the same logits and continuation."""

import json
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
import tiny_hf
from cli_runner import lora_jax
from tiny_hf import make_checkpoint

import lora_jax as lj
from lora_jax import bases, checkpoint, serve
from lora_jax.recipe import ModelSection

ARGS = ["data.seq_len=64", "train.batch_size=8", "train.learning_rate=0.01",
        "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=2",
        "train.save_every=2", "lora.targets=all-linear"]
QUESTION = "Define LAWYER."


def chat_rows(n: int) -> list[dict]:
  return tiny_hf.chat_rows(system="You are a cynical lexicographer.")[:n]


@pytest.fixture(scope="module")
def ckpt(tiny_llama):
  return tiny_llama


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "chat.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in chat_rows(240)) + "\n")
  return path


@pytest.fixture(scope="module")
def finished(ckpt, chat_file, tmp_path_factory):
  """4 steps, then resumed to 6 with a merged export too."""
  out = tmp_path_factory.mktemp("run") / "r"
  common = [f"model.base=hf:{ckpt}", f"data.train={chat_file}", f"output_dir={out}", *ARGS]
  first = lora_jax("train", "--no-progress", *common, "train.steps=4")
  second = lora_jax("train", "--no-progress", *common, "train.steps=6", "export.merged=true")
  return out, first, second


def torch_model(directory):
  return transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()


def test_train_from_a_checkpoint_resumes_and_lowers_the_eval_loss(finished):
  out, (code, stdout, err), (code2, stdout2, err2) = finished
  assert code == 0, err
  assert code2 == 0, err2
  before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", stdout).groups())
  assert after < before - 0.05, (before, after)
  assert "resuming from step 4" in stdout2
  assert {p.name for p in out.iterdir()} >= {"adapter", "peft", "merged", "checkpoints"}
  peft_config = json.loads((out / "peft" / "adapter_config.json").read_text())
  assert peft_config["peft_type"] == "LORA" and peft_config["base_model_name_or_path"]


def test_without_asking_a_checkpoint_run_writes_no_merged_copy(finished):
  out, (_, stdout, _), _ = finished
  assert "peft:" in stdout and "merged:" not in stdout


def test_peft_in_pytorch_gives_lora_jax_logits(ckpt, finished):
  out = finished[0]
  base = bases.resolve(ModelSection(base=f"hf:{ckpt}"))
  model, params = base.load()
  adapters, config = checkpoint.load_adapter(out / "adapter", target=params)
  assert np.abs(np.asarray(jax_leaves(adapters, "lora_b"))).max() > 0  # trained, not zero
  ids = np.asarray(base.tokenizer().encode("ABSURDITY, n. A statement or belief", bos=True))
  ours = lj.inject(model, config).apply({"params": lj.combine(adapters, params)},
                                        jnp.asarray(ids)[None])
  peft = PeftModel.from_pretrained(torch_model(ckpt), out / "peft").eval()
  with torch.no_grad():
    theirs = peft(torch.as_tensor(ids)[None]).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)
  plain = torch_model(ckpt)
  with torch.no_grad():
    assert np.abs(plain(torch.as_tensor(ids)[None]).logits.numpy() - theirs).max() > 1e-3


def jax_leaves(tree, name):
  import jax
  return [x for kp, x in jax.tree_util.tree_leaves_with_path(tree)
          if getattr(kp[-1], "key", None) == name][0]


def peft_reply(ckpt, adapter_dir, max_new_tokens, system=None):
  tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": QUESTION}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
  model = PeftModel.from_pretrained(torch_model(ckpt), adapter_dir).eval()
  config = json.loads((ckpt / "generation_config.json").read_text())
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=config["eos_token_id"],
                         pad_token_id=config["eos_token_id"][0])
  return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("adapter", ["adapter", "peft"])
def test_generate_chat_equals_peft_greedy(ckpt, finished, adapter):
  out = finished[0]
  code, stdout, err = lora_jax("generate", "--base", f"hf:{ckpt}", "--adapter",
                               str(out / adapter), "--chat", "--prompt", QUESTION,
                               "--max-new-tokens", "12")
  assert code == 0, err
  expected = peft_reply(ckpt, out / "peft", 12)
  assert expected.strip() and stdout == expected + "\n"


def test_merged_export_is_a_complete_hugging_face_model(ckpt, finished):
  merged = finished[0] / "merged"
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= {p.name for p in merged.iterdir()}
  tok = transformers.AutoTokenizer.from_pretrained(merged)
  ids = tok("ABSURDITY, n. A statement", return_tensors="pt").input_ids
  peft = PeftModel.from_pretrained(torch_model(ckpt), finished[0] / "peft").eval()
  with torch.no_grad():
    np.testing.assert_allclose(torch_model(merged)(ids).logits.numpy(),
                               peft(ids).logits.numpy(), atol=1e-4, rtol=1e-4)
  assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"
  code, stdout, err = lora_jax("generate", "--base", f"hf:{merged}", "--chat", "--prompt",
                               QUESTION, "--max-new-tokens", "12")
  assert code == 0, err
  assert stdout == peft_reply(ckpt, finished[0] / "peft", 12) + "\n"


def test_info_names_the_checkpoint(ckpt):
  code, stdout, err = lora_jax("info", f"model.base={ckpt}", "lora.targets=[q_proj]")
  assert code == 0, err
  assert "Hugging Face checkpoint" in stdout and "adapted layers (2):" in stdout


def test_generate_never_yields_the_padded_vocabulary(ckpt, tmp_path):
  """The embedding has rows past the tokenizer's ids; make them the likeliest."""
  config = json.loads((ckpt / "config.json").read_text())
  tok = bases.resolve(ModelSection(base=f"hf:{ckpt}")).tokenizer()
  assert config["vocab_size"] > tok.vocab_size
  biased = tmp_path / "biased"
  biased.mkdir()
  for f in ckpt.iterdir():
    (biased / f.name).write_bytes(f.read_bytes())
  weights = load_file(biased / "model.safetensors")
  weights["lm_head.weight"][tok.vocab_size:] *= 1000.0
  save_file(weights, str(biased / "model.safetensors"), metadata={"format": "pt"})
  base = ModelSection(base=f"hf:{biased}")
  text = serve.generate_text(base, "ABSURDITY", max_new_tokens=6)
  sampled = serve.generate_text(base, "ABSURDITY", max_new_tokens=6, temperature=1.0, top_p=0.9)
  assert isinstance(text, str) and isinstance(sampled, str)  # decode refuses padded ids


@pytest.fixture(scope="module")
def wrong_inputs(ckpt, tmp_path_factory):
  root = tmp_path_factory.mktemp("wrong")
  (root / "empty").mkdir()
  gpt2 = root / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300}))
  (root / "bad-json").mkdir()
  (root / "bad-json" / "config.json").write_text('{"model_type": "llama",')
  (root / "data.parquet").write_bytes(b"PAR1")
  small = make_checkpoint(root / "small-vocab", vocab_size=256)
  (root / "blank.jsonl").write_text("\n\n")
  (root / "chat.jsonl").write_text(json.dumps(chat_rows(1)[0]) + "\n")
  return root, small


@pytest.mark.parametrize("case, message", [
    ("no-config", "is not a Hugging Face checkpoint (no config.json)"),
    ("architecture", "model_type 'gpt2'"),
    ("small-vocab", "its vocabulary (256) is smaller than the 300 ids of the tokenizer in"),
    ("chat-without-template", "chat.jsonl, line 1: a chat row needs a tokenizer with a chat "
     "template"),
    ("no-rows", "blank.jsonl"),
    ("bad-json", "config.json is not valid JSON"),
    ("merged-dtype", "export.merged_dtype='bf16': must be one of float32, bfloat16"),
    ("no-pyarrow", "reading Parquet needs pyarrow"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, chat_file, wrong_inputs, tmp_path, case,
                                          message, monkeypatch):
  root, small = wrong_inputs
  base, data, extra = f"hf:{ckpt}", chat_file, []
  if case == "no-config":
    base = f"hf:{root / 'empty'}"
  elif case == "architecture":
    base = f"hf:{root / 'gpt2'}"
  elif case == "small-vocab":
    base = f"hf:{small}"
  elif case == "chat-without-template":
    base, data = "preset:tiny-byte", root / "chat.jsonl"
  elif case == "bad-json":
    base = f"hf:{root / 'bad-json'}"
  elif case == "merged-dtype":
    extra = ["export.merged_dtype=bf16"]
  elif case == "no-pyarrow":
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    data = root / "data.parquet"
  else:
    data = root / "blank.jsonl"
  code, _, err = lora_jax("train", "--no-progress", f"model.base={base}", f"data.train={data}",
                          f"output_dir={tmp_path / 'out'}", *ARGS, *extra)
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert message in err, err


def test_model_tokenizer_names_another_directory(ckpt, tmp_path):
  weights_only = tmp_path / "weights-only"
  weights_only.mkdir()
  for name in ("config.json", "model.safetensors"):
    (weights_only / name).write_bytes((ckpt / name).read_bytes())
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    serve.generate_text(ModelSection(base=f"hf:{weights_only}"), QUESTION, max_new_tokens=4)
  borrowed = serve.generate_text(ModelSection(base=f"hf:{weights_only}", tokenizer=str(ckpt)),
                               QUESTION, chat=True, max_new_tokens=8)
  assert borrowed == serve.generate_text(ModelSection(base=f"hf:{ckpt}"), QUESTION, chat=True,
                                       max_new_tokens=8)


def test_merge_keeps_the_checkpoint_dtype(ckpt, finished, tmp_path):
  """A bfloat16 checkpoint merges to bfloat16 safetensors, whatever dtype the run computed in."""
  half = tmp_path / "bf16"
  torch_model(ckpt).to(torch.bfloat16).save_pretrained(half, safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    (half / name).write_bytes((ckpt / name).read_bytes())
  code, stdout, err = lora_jax("merge", "--base", f"hf:{half}", "--adapter",
                               str(finished[0] / "peft"), "--output", str(tmp_path / "merged"))
  assert code == 0, err
  merged = tmp_path / "merged"
  assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(merged / "model.safetensors", "pt") as f:
    assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
  assert (merged / "tokenizer.json").is_file()


def test_an_export_switched_off_is_named_as_stale(finished, chat_file, ckpt):
  out = finished[0]
  code, stdout, err = lora_jax("train", "--no-progress", f"model.base=hf:{ckpt}",
                               f"data.train={chat_file}", f"output_dir={out}", *ARGS,
                               "train.steps=6", "export.peft=false")
  assert code == 0, err
  assert f"note: {out / 'peft'} is from an earlier export (export.peft is off now)" in stdout
  assert f"note: {out / 'merged'} is from an earlier export" in stdout


def test_generate_with_a_system_message_equals_peft(ckpt, finished):
  out = finished[0]
  system = "You are a cynical lexicographer."
  code, stdout, err = lora_jax("generate", "--base", f"hf:{ckpt}", "--adapter", str(out / "peft"),
                               "--chat", "--system", system, "--prompt", QUESTION,
                               "--max-new-tokens", "12")
  assert code == 0, err
  assert stdout == peft_reply(ckpt, out / "peft", 12, system=system) + "\n"
  code, _, err = lora_jax("generate", "--base", f"hf:{ckpt}", "--system", system,
                          "--prompt", QUESTION)
  assert code == 2 and "a system message needs chat" in err
