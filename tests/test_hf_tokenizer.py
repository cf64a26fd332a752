"""lora_jax.hf.tokenizer against transformers' AutoTokenizer on locally trained checkpoints."""

import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import transformers
from tiny_hf import (BOS, CHAT_TEMPLATE, END_OF_TEXT, EOT, corpus_lines, make_checkpoint,
                     make_tokenizer)

from lora_jax import data
from lora_jax.hf.tokenizer import load_tokenizer

TEXTS = ["Hello world", "ABSURDITY, n.  A statement or belief manifestly inconsistent",
         "line one\nline  two\n\n   three ", "naïve café — 日本語 🙂", "", " leading space",
         "a<|eot_id|>b <|begin_of_text|> c<s>d</s> e <unk>f", "don't , stop . now 's"]
MESSAGES = [{"role": "system", "content": "Define words cynically."},
            {"role": "user", "content": "ABSURDITY"},
            {"role": "assistant", "content": "A statement or belief manifestly inconsistent."},
            {"role": "user", "content": "naïve — 日本語?"},
            {"role": "assistant", "content": "Ignorance 🙂\nof the second line."}]


def auto_tokenizer(directory):
  transformers.logging.set_verbosity_error()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return transformers.AutoTokenizer.from_pretrained(directory)


def edit_config(directory, **changes):
  path = directory / "tokenizer_config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))
  return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  bpe = make_tokenizer(root / "bpe", "bpe")
  spm = make_tokenizer(root / "sentencepiece", "sentencepiece")
  nonlegacy = edit_config(shutil.copytree(spm, root / "sentencepiece-nonlegacy"), legacy=False)
  # An explicit null (as some checkpoints write) means no prefix space in transformers.
  no_prefix = edit_config(shutil.copytree(spm, root / "sentencepiece-noprefix"),
                          add_prefix_space=None)
  return {"bpe": bpe, "sentencepiece": spm, "sentencepiece-nonlegacy": nonlegacy,
          "sentencepiece-noprefix": no_prefix}


@pytest.fixture(scope="module")
def pairs(dirs):
  return {kind: (load_tokenizer(path), auto_tokenizer(path)) for kind, path in dirs.items()}


@pytest.fixture(scope="module")
def bpe(pairs):
  return pairs["bpe"]


KINDS = ["bpe", "sentencepiece", "sentencepiece-nonlegacy", "sentencepiece-noprefix"]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_match_transformers(pairs, kind):
  tok, auto = pairs[kind]
  assert not tok.adds_eos
  for text in TEXTS + corpus_lines()[::50]:
    with_bos = tok.encode(text, bos=True)
    assert with_bos.dtype == np.int32
    assert with_bos.tolist() == auto.encode(text), text
    assert tok.encode(text).tolist() == auto.encode(text, add_special_tokens=False), text
    assert tok.encode(text, eos=True).tolist() == auto.encode(text, add_special_tokens=False) + [
        auto.eos_token_id]
    for ids in (auto.encode(text), auto.encode(text, add_special_tokens=False)):
      assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True), text
      assert tok.decode(np.asarray(ids, np.int64)) == auto.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_and_vocabulary(pairs, kind):
  tok, auto = pairs[kind]
  assert tok.BOS == auto.bos_token_id is not None
  assert tok.EOS == tok.PAD == auto.eos_token_id
  assert tok.vocab_size == len(auto) == max(auto.get_vocab().values()) + 1
  # Non-ASCII text round-trips through bytes (byte-level BPE, byte fallback).
  text = "naïve café — 日本語 🙂"
  assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_bpe_special_tokens_and_stop_ids(bpe):
  tok, auto = bpe
  ids = {token: auto.convert_tokens_to_ids(token) for token in (BOS, END_OF_TEXT, EOT)}
  assert tok.encode(f"hi{EOT}").tolist()[-1] == ids[EOT]
  assert tok.encode("hi", bos=True).tolist()[0] == ids[BOS]
  assert tok.stop_ids == (ids[END_OF_TEXT], ids[EOT])
  assert tok.chat_template == CHAT_TEMPLATE


def test_sentencepiece_without_bos_and_with_eos(dirs, tmp_path):
  spm = edit_config(shutil.copytree(dirs["sentencepiece"], tmp_path / "spm"), add_bos_token=False,
                    add_eos_token=True)
  tok, auto = load_tokenizer(spm), auto_tokenizer(spm)
  assert tok.BOS is None and tok.adds_eos
  for text in TEXTS:
    assert tok.encode(text, bos=True, eos=True).tolist() == auto.encode(text)
  assert tok.stop_ids == (2,) and tok.chat_template is None


def test_config_tokens_and_cleanup(dirs, tmp_path):
  """Tokens the config adds or marks special, special_tokens_map.json, clean-up of spaces."""
  path = edit_config(shutil.copytree(dirs["bpe"], tmp_path / "bpe"),
                     clean_up_tokenization_spaces=True, pad_token="<|pad|>")
  (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOT}))
  state = json.loads((path / "tokenizer.json").read_text())
  for token in state["added_tokens"]:
    token["special"] = token["content"] != EOT  # special only by being the eos_token
  (path / "tokenizer.json").write_text(json.dumps(state))
  tok, auto = load_tokenizer(path), auto_tokenizer(path)
  assert (tok.EOS, tok.PAD, tok.vocab_size) == (auto.eos_token_id, auto.pad_token_id, len(auto))
  assert tok.vocab_size == 301  # <|pad|> was added after the 300 ids
  text = "don't , stop . now 's <|pad|><|eot_id|>"
  ids = auto.encode(text)
  assert tok.encode(text, bos=True).tolist() == ids
  assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True) == "don't, stop. now's "
  assert load_tokenizer(dirs["bpe"]).decode(ids[:-2]) == "don't , stop . now 's "


@pytest.mark.parametrize("config_prefix", ["absent", True, None])
def test_prefix_space_follows_config(dirs, tmp_path, config_prefix):
  """transformers sets a top-level pre-tokenizer's add_prefix_space to the config's (absent:
  False; null: the file's)."""
  path = shutil.copytree(dirs["bpe"], tmp_path / "bpe")
  state = json.loads((path / "tokenizer.json").read_text())
  state["pre_tokenizer"]["add_prefix_space"] = True
  (path / "tokenizer.json").write_text(json.dumps(state))
  if config_prefix != "absent":
    edit_config(path, add_prefix_space=config_prefix)
  tok, auto = load_tokenizer(path), auto_tokenizer(path)
  plain = load_tokenizer(dirs["bpe"])
  for text in ("Hello world", "ABSURDITY, n."):
    assert tok.encode(text).tolist() == auto.encode(text, add_special_tokens=False)
    assert (tok.encode(text).tolist() == plain.encode(text).tolist()) == (config_prefix == "absent")


def test_decode_rejects_bad_ids(bpe):
  tok, _ = bpe
  assert tok.decode([tok.vocab_size - 1]) == ""  # the last special token
  for ids in ([tok.vocab_size], [3, -1]):
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
      tok.decode(ids)
  with pytest.raises(ValueError, match="vector of integer ids"):
    tok.decode([[1, 2]])
  with pytest.raises(ValueError, match="vector of integer ids"):
    tok.decode([1.5])


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("count", [1, 2, 4, 5])
def test_render_chat_matches_transformers(bpe, count, add_generation_prompt):
  tok, auto = bpe
  messages = MESSAGES[:count]
  rendered = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
  assert rendered == auto.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
  assert rendered.startswith(BOS + "<|start_header_id|>system")


def test_chat_segments(bpe):
  tok, auto = bpe
  segments = tok.chat_segments(MESSAGES)
  assert "".join(text for text, _ in segments) == tok.render_chat(MESSAGES)
  assert [text for text, trained in segments if trained] == [
      m["content"] + EOT for m in MESSAGES if m["role"] == "assistant"]
  assert [trained for _, trained in segments] == [False, True, False, True]
  ids = np.concatenate([tok.encode(text) for text, _ in segments]).tolist()
  assert ids == auto.apply_chat_template(MESSAGES, tokenize=True)
  assert tok.chat_segments(MESSAGES[:2]) == [(tok.render_chat(MESSAGES[:2]), False)]


def test_template_features_match_transformers(dirs, tmp_path):
  """tojson, loop controls, {% generation %}, unset tokens, and chat_template.jinja's priority."""
  template = ("{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
              "{{ m | tojson }}|{{ pad_token }}|{{ eos_token }}|"
              "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
              "{% endif %}\n{% endfor %}{% if add_generation_prompt %}>>{% endif %}")
  path = edit_config(shutil.copytree(dirs["bpe"], tmp_path / "bpe"),
                     chat_template=[{"name": "default", "template": "ignored"}])
  (path / "chat_template.jinja").write_text(template)
  tok, auto = load_tokenizer(path), auto_tokenizer(path)
  for add in (False, True):
    assert tok.render_chat(MESSAGES, add_generation_prompt=add) == auto.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add)
  assert '"naïve — 日本語?"' not in tok.render_chat(MESSAGES)  # the 4th message is cut
  (path / "chat_template.jinja").unlink()
  assert load_tokenizer(path).render_chat(MESSAGES[:1]) == "ignored"


def test_additional_special_tokens_reach_the_template(dirs, tmp_path):
  """A list-valued special token renders as transformers renders it (a list of strings)."""
  template = ("{{ additional_special_tokens | join(',') }}|{{ additional_special_tokens[0] }}"
              "{% for m in messages %}{{ m.content }}{% endfor %}")
  path = edit_config(shutil.copytree(dirs["bpe"], tmp_path / "bpe"), chat_template=template,
                     additional_special_tokens=["<|eot_id|>", "<|start_header_id|>"])
  tok, auto = load_tokenizer(path), auto_tokenizer(path)
  rendered = tok.render_chat(MESSAGES[:1])
  assert rendered == auto.apply_chat_template(MESSAGES[:1], tokenize=False)
  assert rendered.startswith("<|eot_id|>,<|start_header_id|>|<|eot_id|>")


def test_chat_errors(dirs, tmp_path, pairs):
  tok, _ = pairs["bpe"]
  with pytest.raises(ValueError, match="sentencepiece.*has no chat_template"):
    pairs["sentencepiece"][0].render_chat(MESSAGES)
  bad = [([], "non-empty list"), ("hi", "non-empty list"), (["hi"], r"messages\[0\] is str"),
         ([{"content": "x"}], 'messages\\[0\\] has no "role"'),
         ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ["x"]}],
          'messages\\[1\\]\\["content"\\] is list')]
  for messages, message in bad:
    for call in (tok.render_chat, tok.chat_segments):
      with pytest.raises(ValueError, match=message):
        call(messages)
  last_only = ("{% for m in messages %}{% if loop.last %}{{ m.role }}: {{ m.content }}\n"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  path = edit_config(shutil.copytree(dirs["bpe"], tmp_path / "last"), chat_template=last_only)
  with pytest.raises(ValueError, match="does not render conversations incrementally"):
    load_tokenizer(path).chat_segments(MESSAGES)
  refusing = "{{ raise_exception('roles must alternate') }}"
  edit_config(path, chat_template=refusing)
  with pytest.raises(ValueError, match="roles must alternate"):
    load_tokenizer(path).render_chat(MESSAGES)
  edit_config(path, chat_template=[{"name": "tool_use", "template": "x"}])
  with pytest.raises(ValueError, match="none named 'default'"):
    load_tokenizer(path)


def test_file_errors(dirs, tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    load_tokenizer(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer.json and tokenizer.model"):
    load_tokenizer(empty)
  path = shutil.copytree(dirs["bpe"], tmp_path / "bpe")
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
  with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
    load_tokenizer(path)
  (path / "tokenizer_config.json").write_text("{")
  with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
    load_tokenizer(path)
  edit_config(shutil.copytree(dirs["bpe"], tmp_path / "noeos"), eos_token=None)
  with pytest.raises(ValueError, match="no eos_token"):
    load_tokenizer(tmp_path / "noeos")
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    load_tokenizer(dirs["sentencepiece"])


def test_make_checkpoint(tmp_path):
  path = make_checkpoint(tmp_path / "ck", num_hidden_layers=1)
  config = json.loads((path / "config.json").read_text())
  assert (config["vocab_size"], config["num_hidden_layers"]) == (320, 1)
  tok = load_tokenizer(path)
  assert tok.vocab_size == 300 < config["vocab_size"]
  generation = json.loads((path / "generation_config.json").read_text())
  assert tuple(generation["eos_token_id"]) == tok.stop_ids and generation["bos_token_id"] == tok.BOS
  model = transformers.LlamaForCausalLM.from_pretrained(path)
  assert model.lm_head.weight.shape == (320, 64)
  again = make_checkpoint(tmp_path / "again", num_hidden_layers=1)
  for name in ("tokenizer.json", "model.safetensors", "config.json", "generation_config.json"):
    assert (path / name).read_bytes() == (again / name).read_bytes(), name


LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                   "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
                   "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def test_sentencepiece_training_ids_are_the_inference_ids(dirs, tmp_path):
  """One leading '▁' per text, as at inference: never one per prompt, reply or turn."""
  path = edit_config(shutil.copytree(dirs["sentencepiece"], tmp_path / "spm"),
                     chat_template=LLAMA2_TEMPLATE)
  tok, auto = load_tokenizer(path), auto_tokenizer(path)
  messages = [{"role": "user", "content": "Define LAWYER."},
              {"role": "assistant", "content": "n. One skilled in circumvention of the law."},
              {"role": "user", "content": "And ABSURDITY?"},
              {"role": "assistant", "content": "n. A statement or belief."}]
  ids, mask = data.tokenize(data.Chat(tuple(messages), "c.jsonl, line 1"), tok)
  assert ids.tolist() == auto.apply_chat_template(messages, tokenize=True)
  first = len(auto(tok.render_chat(messages[:1]), add_special_tokens=False).input_ids)
  assert mask[:first].sum() == 0 and mask[first] == 1          # the reply from its first token
  assert auto.convert_ids_to_tokens(int(ids[first])) == "▁n"    # ' n': straddles, learned
  assert ids[mask == 1][-1] == tok.EOS and mask.sum() < len(mask) // 2
  prompt, completion = "Define LAWYER.\n", "One skilled in circumvention."
  ids, mask = data.tokenize(data.Example(prompt, completion), tok)
  assert ids.tolist() == auto(prompt + completion).input_ids + [tok.EOS]
  learned = auto.decode(ids[mask == 1], skip_special_tokens=True)
  assert learned == completion
