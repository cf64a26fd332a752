"""Tiny Hugging Face checkpoints for tests, built locally from the shipped corpus.

`make_tokenizer` trains a Llama-3-like byte-level BPE `tokenizer.json` or a
Llama-2-like SentencePiece `tokenizer.model`; `make_checkpoint` adds a tiny
random transformers `LlamaForCausalLM`. Both are deterministic: the same
arguments write the same files.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

BOS, END_OF_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
BPE_SPECIALS = (BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOT)
# Llama 3's template without its system-prompt defaults.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
DEFAULT_VOCAB = {"bpe": 300, "sentencepiece": 400}
MODEL_MAX_LENGTH = 256


def corpus_lines(keep_blank: bool = False) -> list[str]:
  """The non-empty (or, with `keep_blank`, all) lines of the shipped `devil.txt` corpus."""
  # The package's location without importing it (and jax with it).
  package = Path(importlib.util.find_spec("lora_jax").submodule_search_locations[0])
  text = (package / "assets" / "corpora" / "devil.txt").read_text(encoding="utf-8")
  return [line for line in text.splitlines() if keep_blank or line.strip()]


def make_tokenizer(directory: str | Path, kind: str = "bpe", vocab_size: int | None = None) -> Path:
  """Writes a trained tokenizer's files into `directory`.

  Args:
    directory: created if missing.
    kind: "bpe" (Llama-3-like `tokenizer.json`: byte-level BPE, special tokens
      `<|begin_of_text|>` ... `<|eot_id|>` after the learned ids, BOS added by
      the post-processor, `CHAT_TEMPLATE`, generation stop ids end_of_text and
      eot) or "sentencepiece" (Llama-2-like `tokenizer.model`: BPE with byte
      fallback, `<unk>`=0, `<s>`=1, `</s>`=2, `legacy: true`, no chat template).
    vocab_size: the vocabulary size; by default 300 for "bpe" and 400 for
      "sentencepiece" (its 256 byte pieces and the corpus's characters need
      about 340).

  Returns:
    The directory.
  """
  return Path(_write_tokenizer(directory, kind, vocab_size)["directory"])


def make_checkpoint(directory: str | Path, *, tokenizer: str = "bpe", vocab_size: int | None = None,
                    seed: int = 0, config_class: str = "LlamaConfig", **config: Any) -> Path:
  """Writes a tokenizer and a tiny random transformers Llama (or, with `config_class`,
  another family's model) into `directory`.

  Args:
    directory: created if missing.
    tokenizer: the `kind` of `make_tokenizer`.
    vocab_size: the model's vocabulary; by default the tokenizer's rounded up
      to a multiple of 64, so the embeddings go past the tokenizer's ids.
    seed: the torch seed of the random weights.
    config_class: the transformers config class, e.g. "Gemma3TextConfig".
    **config: its fields to override.

  Returns:
    The directory, with `config.json`, `model.safetensors` and a
    `generation_config.json` holding the tokenizer's BOS and stop ids.
  """
  import torch
  import transformers

  info = _write_tokenizer(directory, tokenizer, None)
  path = Path(info["directory"])
  eos = info["eos"][0] if len(info["eos"]) == 1 else info["eos"]
  fields = dict(vocab_size=vocab_size or -(-info["vocab_size"] // 64) * 64, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MODEL_MAX_LENGTH,
                tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=info["bos"],
                eos_token_id=eos, torch_dtype="float32")
  fields.update(config)
  model_config = getattr(transformers, config_class)(**fields)
  model_config._name_or_path = str(path)
  torch.manual_seed(seed)
  if config_class == "LlamaConfig":
    model = transformers.LlamaForCausalLM(model_config)
  else:
    model = transformers.AutoModelForCausalLM.from_config(model_config)
  model = model.to(torch.float32).eval()
  model.save_pretrained(path, safe_serialization=True)
  generation = json.loads((path / "generation_config.json").read_text())
  generation.update(bos_token_id=info["bos"], eos_token_id=eos)
  _write_json(path / "generation_config.json", generation)
  return path


def _write_json(path: Path, value: dict) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(directory: str | Path, kind: str, vocab_size: int | None) -> dict:
  if kind not in DEFAULT_VOCAB:
    raise ValueError(f"tokenizer kind must be one of {sorted(DEFAULT_VOCAB)}, not {kind!r}")
  path = Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  size = vocab_size or DEFAULT_VOCAB[kind]
  info = _bpe(path, size) if kind == "bpe" else _sentencepiece(path, size)
  return dict(info, directory=str(path))


def _bpe(path: Path, vocab_size: int) -> dict:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BPE_SPECIALS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(corpus_lines(), trainer)
  tokenizer.add_special_tokens(list(BPE_SPECIALS))  # after the learned ids, as in Llama 3
  ids = {token: tokenizer.token_to_id(token) for token in BPE_SPECIALS}
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, ids[BOS])])
  tokenizer.save(str(path / "tokenizer.json"))
  _write_json(path / "tokenizer_config.json", {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": END_OF_TEXT,
      "clean_up_tokenization_spaces": False, "model_max_length": MODEL_MAX_LENGTH,
      "chat_template": CHAT_TEMPLATE})
  eos = [ids[END_OF_TEXT], ids[EOT]]
  _write_json(path / "generation_config.json", {"bos_token_id": ids[BOS], "eos_token_id": eos})
  return dict(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), bos=ids[BOS], eos=eos)


def _sentencepiece(path: Path, vocab_size: int) -> dict:
  import sentencepiece

  model = io.BytesIO()
  # Llama 2's settings: identity normalization, a dummy prefix, spaces kept,
  # digits split, bytes for characters outside the vocabulary.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_lines()), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
      split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, num_threads=1, minloglevel=2)
  (path / "tokenizer.model").write_bytes(model.getvalue())
  _write_json(path / "tokenizer_config.json", {
      "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
      "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
      "legacy": True, "clean_up_tokenization_spaces": False,
      "model_max_length": MODEL_MAX_LENGTH})
  _write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
  return dict(vocab_size=vocab_size, bos=1, eos=[2])


def chat_rows(system: str | None = None) -> list[dict]:
  """The Devil's Dictionary as chat rows: the user names a word, the assistant defines it."""
  import re
  rows = []
  for entry in re.split(r"\n\s*\n", "\n".join(corpus_lines(keep_blank=True))):
    match = re.match(r"([A-Z][A-Z' -]+), (\w+\.)\s+(.*)", " ".join(entry.split()))
    if match:
      turns = [{"role": "user", "content": f"Define {match[1]}."},
               {"role": "assistant", "content": f"{match[2]} {match[3][:200]}"}]
      rows.append({"messages": ([{"role": "system", "content": system}] if system else [])
                   + turns})
  return rows
