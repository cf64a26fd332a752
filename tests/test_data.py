"""The data pipeline: files, tokens, masks, packing, and the multi-host loader."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_jax import data
from lora_jax.data import BOS, EOS, PAD, ByteTokenizer, Example, Loader

TOK = ByteTokenizer()


def write_jsonl(path, records):
  path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                  encoding="utf-8")
  return path


def rows_of(n, seq_len=4):
  """Rows whose ids say which row they are: row r is all r."""
  ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
  ones = np.ones_like(ids)
  return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def test_module_imports_without_jax():
  # Block jax and flax, and stand in for the package (its __init__ imports jax) so that
  # data.py and formats.py load on their own; pyarrow and datasets wait until a file needs them.
  code = (
      "import sys, types\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('jax', 'flax'): raise ImportError(name)\n"
      "sys.meta_path.insert(0, Block())\n"
      "package = types.ModuleType('lora_jax')\n"
      f"package.__path__ = [{str(Path(data.__file__).parent)!r}]\n"
      "sys.modules['lora_jax'] = package\n"
      "import lora_jax.data as m\n"
      "print(m.ByteTokenizer().decode(m.ByteTokenizer().encode('ok')))\n"
      "print(sorted({n.split('.')[0] for n in sys.modules} & {'pyarrow', 'datasets'}))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split("\n")[:2] == ["ok", "[]"]


def test_tokenizer_round_trip_non_ascii():
  text = "naïve café — 日本語 🙂\n\ttabs"
  ids = TOK.encode(text, bos=True, eos=True)
  assert ids.dtype == np.int32
  assert ids[0] == BOS and ids[-1] == EOS and (ids[1:-1] < 256).all()
  assert len(ids) == len(text.encode("utf-8")) + 2
  assert TOK.decode(ids) == text
  assert TOK.decode(np.concatenate([ids, [PAD, PAD]])) == text
  assert TOK.encode("").tolist() == [] and TOK.decode([]) == ""
  assert TOK.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character
  assert TOK.vocab_size == 259
  with pytest.raises(ValueError, match="259"):
    TOK.decode([259])


def test_jsonl_prompt_completion_masking_exact(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q", "completion": "ab", "id": 7},
                                           {"text": "hi"}])
  examples = data.read_texts(path)
  assert examples == [Example("Q", "ab"), Example("", "hi")]
  ids, mask = data.tokenize(examples[0], TOK)
  assert ids.tolist() == [BOS, ord("Q"), ord("a"), ord("b"), EOS]
  assert mask.tolist() == [0, 0, 1, 1, 1]
  ids, mask = data.tokenize(examples[1], TOK)
  assert ids.tolist() == [BOS, ord("h"), ord("i"), EOS]
  assert mask.tolist() == [0, 1, 1, 1]
  rows = data.load_dataset(path, TOK, seq_len=5, packing=False)
  assert rows["input_ids"].tolist() == [[BOS, 81, 97, 98, EOS], [BOS, 104, 105, EOS, PAD]]
  assert rows["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
  assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
  assert all(v.dtype == np.int32 for v in rows.values())


@pytest.mark.parametrize("line, found", [
    ('{"prompt": "only a prompt"}', r"\['prompt'\]"),
    ('{"txt": "typo", "id": 1}', r"\['id', 'txt'\]"),
    ('{"text": "a", "prompt": "b", "completion": "c"}', r"\['completion', 'prompt', 'text'\]"),
    ('["a list"]', "list"),
    ('{"text": 3}', "strings"),
    ('{"text": "cut', "not valid JSON"),
])
def test_bad_jsonl_line_names_file_line_and_keys(tmp_path, line, found):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n\n' + line + "\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl, line 3: .*{found}"):
    data.read_texts(path)


def test_text_documents_modes(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("one\ntwo\n\n  \n  three\n\n\nfour\n")
  assert data.read_texts(path) == [Example("", "one\ntwo\n\n  \n  three\n\n\nfour\n")]
  assert data.read_texts(path, documents="paragraphs") == [
      Example("", "one\ntwo"), Example("", "  three"), Example("", "four")]
  assert data.read_texts(path, documents="lines") == [
      Example("", t) for t in ["one", "two", "  three", "four"]]
  with pytest.raises(ValueError, match="documents"):
    data.read_texts(path, documents="sentences")


def test_directory_and_lists_of_paths(tmp_path):
  (tmp_path / "b.txt").write_text("bee")
  write_jsonl(tmp_path / "a.jsonl", [{"text": "ay"}])
  (tmp_path / "notes.md").write_text("skipped")
  (tmp_path / "empty.txt").write_text("\n\n")
  assert data.read_texts(tmp_path) == [Example("", "ay"), Example("", "bee")]
  assert data.read_texts([tmp_path / "b.txt", str(tmp_path / "a.jsonl")]) == [
      Example("", "bee"), Example("", "ay")]
  with pytest.raises(ValueError, match="notes.md"):
    data.read_texts(tmp_path / "notes.md")


def test_missing_file_and_empty_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    data.read_texts([tmp_path / "nope.txt"])
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="no examples"):
    data.read_texts(tmp_path / "empty.txt")
  (tmp_path / "sub").mkdir()
  with pytest.raises(ValueError, match="no examples"):
    data.load_dataset(tmp_path / "sub", TOK, 8)
  with pytest.raises(ValueError, match="no examples"):
    data.pack([], 8)


@pytest.mark.parametrize("seq_len", [2, 3, 7, 16, 64])
def test_packing_loses_no_token_and_masks_padding(tmp_path, seq_len):
  records = [{"prompt": "p" * i, "completion": "c" * (i % 3)} for i in range(6)]
  path = write_jsonl(tmp_path / "d.jsonl", records + [{"text": "plain ü"}])
  pairs = [data.tokenize(e, TOK) for e in data.read_texts(path)]
  stream, stream_mask = (np.concatenate(p) for p in zip(*pairs))
  rows = data.load_dataset(path, TOK, seq_len)
  assert rows["input_ids"].shape == (-(-len(stream) // seq_len), seq_len)
  real = rows["attention_mask"].astype(bool)
  assert rows["input_ids"][real].tolist() == stream.tolist()  # row-major: the stream, in order
  assert rows["loss_mask"][real].tolist() == stream_mask.tolist()
  assert (rows["input_ids"][~real] == PAD).all() and (rows["loss_mask"][~real] == 0).all()
  assert real[:-1].all()  # only the last row pads, and at its end
  assert (np.diff(real[-1].astype(int)) <= 0).all()


def test_unpacked_rows_truncate_and_pad():
  pairs = [data.tokenize(Example("", "abcdef"), TOK), data.tokenize(Example("x", ""), TOK)]
  rows = data.pack(pairs, 4, packing=False)
  assert rows["input_ids"].tolist() == [[BOS, 97, 98, 99], [BOS, 120, EOS, PAD]]
  assert rows["loss_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
  assert rows["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
  with pytest.raises(ValueError, match="seq_len"):
    data.pack(pairs, 1)


def test_shuffle_is_deterministic_and_visits_every_row_once_per_epoch():
  n, b = 23, 5
  loader = Loader(rows_of(n), b, seed=3)
  assert loader.steps_per_epoch == 4
  epochs = [[next(loader)["input_ids"][:, 0] for _ in range(4)] for _ in range(3)]
  again = Loader(rows_of(n), b, seed=3)
  assert all(np.array_equal(next(again)["input_ids"][:, 0], x) for x in epochs[0])
  seen = [np.concatenate(e) for e in epochs]
  for e, order in enumerate(seen):  # each epoch: 20 distinct rows, the order's first 20
    assert len(set(order.tolist())) == 20
    assert order.tolist() == np.random.default_rng([3, e]).permutation(n)[:20].tolist()
  assert not np.array_equal(seen[0], seen[1])
  other = Loader(rows_of(n), b, seed=4)
  assert not np.array_equal(np.concatenate([next(other)["input_ids"][:, 0]
                                            for _ in range(4)]), seen[0])
  assert loader.state() == {"epoch": 3, "batch": 0}
  plain = Loader(rows_of(n), b, shuffle=False)
  assert next(plain)["input_ids"][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_without_drop_remainder_every_row_once_and_fill_rows_are_masked():
  loader = Loader(rows_of(7), 3, seed=0, drop_remainder=False)
  assert loader.steps_per_epoch == 3
  batches = list(itertools.islice(loader, 3))
  assert all(b["input_ids"].shape == (3, 4) for b in batches)
  last = batches[-1]
  assert last["attention_mask"][1:].sum() == 0 and last["loss_mask"][1:].sum() == 0
  ids = np.concatenate([b["input_ids"][:, 0] for b in batches])[:7]
  assert sorted(ids.tolist()) == list(range(7))
  # Smaller than one batch is fine when nothing is dropped: one filled batch.
  assert Loader(rows_of(2), 4, drop_remainder=False).steps_per_epoch == 1


def test_resume_from_state_matches_uninterrupted_run():
  rows = rows_of(11)
  full = Loader(rows, 3, seed=9)
  expected = [next(full) for _ in range(10)]  # crosses epochs (3 batches each)
  for k in (0, 1, 3, 4, 8):
    first = Loader(rows, 3, seed=9)
    for _ in range(k):
      next(first)
    state = json.loads(json.dumps(first.state()))  # as a checkpoint would store it
    for resumed in (Loader(rows, 3, seed=9, position=state), Loader(rows, 3, seed=9)):
      resumed.restore(state)
      assert resumed.step == k
      for want in expected[k:]:
        got = next(resumed)
        assert all(np.array_equal(got[key], want[key]) for key in want)
  random_access = Loader(rows, 3, seed=9)
  assert np.array_equal(random_access.batch_at(7)["input_ids"], expected[7]["input_ids"])
  assert random_access.step == 0
  with pytest.raises(ValueError, match="only 3 batches"):
    random_access.restore({"epoch": 0, "batch": 3})


@pytest.mark.parametrize("hosts", [2, 4])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_hosts_together_yield_the_one_host_batches(hosts, drop_remainder):
  rows = rows_of(30)
  one = Loader(rows, 8, seed=1, drop_remainder=drop_remainder)
  share = 8 // hosts
  by_slice = [Loader(rows, 8, seed=1, drop_remainder=drop_remainder,
                     host_rows=slice(h * share, (h + 1) * share)) for h in range(hosts)]
  by_index = [Loader(rows, 8, seed=1, drop_remainder=drop_remainder,
                     host_rows=(h, hosts)) for h in range(hosts)]
  for _ in range(2 * one.steps_per_epoch + 1):
    want = next(one)
    for group in (by_slice, by_index):
      parts = [next(loader) for loader in group]
      assert all(p["input_ids"].shape == (share, 4) for p in parts)
      for key in want:
        assert np.array_equal(np.concatenate([p[key] for p in parts]), want[key])
  # Uneven blocks, as a mesh may give: still the global batch.
  split = [Loader(rows, 8, seed=1, host_rows=s) for s in (slice(0, 3), slice(3, 8))]
  assert np.array_equal(np.concatenate([s.batch_at(5)["input_ids"] for s in split]),
                        Loader(rows, 8, seed=1).batch_at(5)["input_ids"])


def test_loader_errors():
  with pytest.raises(ValueError, match="larger than the 5 rows"):
    Loader(rows_of(5), 6)
  with pytest.raises(ValueError, match="one length"):
    Loader({"input_ids": np.zeros((3, 4)), "loss_mask": np.zeros((2, 4))}, 1)
  with pytest.raises(ValueError, match="one length"):
    Loader(rows_of(0), 1, drop_remainder=False)
  with pytest.raises(ValueError, match="batch_size"):
    Loader(rows_of(5), 0)
  with pytest.raises(ValueError, match="dividing"):
    Loader(rows_of(8), 6, host_rows=(0, 4))
  with pytest.raises(ValueError, match="index < count"):
    Loader(rows_of(8), 4, host_rows=(4, 4))
  with pytest.raises(ValueError, match="host_rows"):
    Loader(rows_of(8), 4, host_rows=slice(2, 6))
  with pytest.raises(ValueError, match="host_rows"):
    Loader(rows_of(8), 4, host_rows=slice(0, 4, 2))
  with pytest.raises(ValueError, match="seed"):
    Loader(rows_of(8), 4, seed=-1)


def test_batches_feed_causal_lm_loss_on_the_mesh(tmp_path):
  import jax
  from lora_jax.distributed import host_rows
  import flax.linen as nn
  from lora_jax.sharding import batch_sharding, make_mesh
  from lora_jax.train import causal_lm_loss

  class Bigram(nn.Module):  # called like the reference Llama, but compiles in no time
    @nn.compact
    def __call__(self, ids, attention_mask):
      return nn.Embed(320, 320)(ids)  # 320 >= TOK.vocab_size, a multiple of 64

  write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 12)
  rows = data.load_dataset(tmp_path, TOK, seq_len=8)  # 84 tokens: 11 rows
  sharding = batch_sharding(make_mesh())
  loader = Loader(rows, 8, seed=0, host_rows=host_rows(sharding, 8))
  model = Bigram()
  batch = next(loader)
  params = model.init(jax.random.key(0), batch["input_ids"], batch["attention_mask"])["params"]
  loss, weight = causal_lm_loss(model)(params, batch, jax.random.key(1))
  # The weight counts the loss tokens a step sees: completions and EOS, never a row's first.
  assert float(weight) == (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum() > 0
  assert np.isfinite(float(loss))


class ChatTokenizer(ByteTokenizer):
  """Bytes as ids and a tagged-turn chat template; the assistant's replies and their end learned."""

  chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
  name = "test/chat-tokenizer"

  def chat_segments(self, messages):
    segments = []
    for m in messages:
      if m["role"] not in ("system", "user", "assistant"):
        raise ValueError(f"roles must be system, user or assistant, not {m['role']!r}")
      learned = m["role"] == "assistant"
      segments += [(f"<{m['role']}>", False), (m["content"], learned), ("</s>", learned)]
    return segments


def chat(*turns, source="c.jsonl, line 3"):
  return data.Chat(tuple({"role": r, "content": c} for r, c in turns), source)


def test_tokenize_chat_through_the_template_exact():
  ids, mask = data.tokenize(chat(("user", "Hi"), ("assistant", "yo"), ("user", "?"),
                                 ("assistant", "é")), ChatTokenizer())
  learned = ["yo</s>", "é</s>"]
  context = ["<user>Hi</s><assistant>", "<user>?</s><assistant>"]
  assert ids.dtype == mask.dtype == np.int32
  assert ids.tolist() == list("".join(c + l for c, l in zip(context, learned)).encode())
  assert mask.tolist() == sum(([0] * len(c.encode()) + [1] * len(l.encode())
                               for c, l in zip(context, learned)), [])  # no BOS, no EOS added


def test_tokenize_chat_errors_name_the_source():
  with pytest.raises(ValueError) as e:
    data.tokenize(chat(("user", "Hi"), ("assistant", "yo")), TOK)
  assert str(e.value) == ("c.jsonl, line 3: a chat row needs a tokenizer with a chat template; "
                          "the byte tokenizer has none")
  assert ByteTokenizer.chat_template is None

  class NoTemplate(ChatTokenizer):
    chat_template = None
  with pytest.raises(ValueError, match="line 3: .*; test/chat-tokenizer has none"):
    data.tokenize(chat(("assistant", "yo")), NoTemplate())
  with pytest.raises(ValueError, match=r"^x\.parquet, row 4: roles must be .*, not 'tool'$"):
    data.tokenize(chat(("tool", "{}"), ("assistant", "ok"), source="x.parquet, row 4"),
                  ChatTokenizer())

  class Broken(ChatTokenizer):
    def chat_segments(self, messages):
      return [("text", "yes")]
  with pytest.raises(ValueError, match=r"line 3: chat_segments must give \(text, trained\) pairs"):
    data.tokenize(chat(("assistant", "yo")), Broken())


def test_tokenizer_without_bos():
  class NoBos(ChatTokenizer):
    BOS = None
  ids, mask = data.tokenize(Example("Q", "ab"), NoBos())
  assert ids.tolist() == [ord("Q"), ord("a"), ord("b"), EOS] and mask.tolist() == [0, 1, 1, 1]
  ids, mask = data.tokenize(Example("", "hi"), NoBos())
  assert ids.tolist() == [ord("h"), ord("i"), EOS] and mask.tolist() == [1, 1, 1]


def test_load_dataset_mixes_examples_and_chats(tmp_path):
  path = write_jsonl(tmp_path / "m.jsonl", [
      {"text": "ab"}, {"messages": [{"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}]}])
  rows = data.load_dataset(path, ChatTokenizer(), seq_len=32, packing=False)
  chat_ids = list(b"<user>Q</s><assistant>A</s>")  # 22 tokens of context, then 'A</s>'
  assert rows["input_ids"].tolist() == [[BOS, 97, 98, EOS] + [PAD] * 28,
                                        chat_ids + [PAD] * 5]
  assert rows["loss_mask"].tolist() == [[0, 1, 1, 1] + [0] * 28, [0] * 22 + [1] * 5 + [0] * 5]
  with pytest.raises(ValueError, match=r"m\.jsonl, line 2: a chat row needs .*byte tokenizer"):
    data.load_dataset(path, TOK, seq_len=8)


def test_no_usable_rows(tmp_path):
  path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a long prompt", "completion": "x"}])
  with pytest.raises(ValueError, match=r"no usable rows in .*long\.jsonl: the 1 examples give"):
    data.load_dataset(path, TOK, seq_len=4, packing=False)  # the completion is cut off

  class EmptyReplies(ChatTokenizer):  # a template that learns the reply only, not its end
    def chat_segments(self, messages):
      return [(text, learned and text != "</s>")
              for text, learned in super().chat_segments(messages)]
  path = write_jsonl(tmp_path / "empty.jsonl",
                     [{"messages": [{"role": "assistant", "content": ""}]}])
  with pytest.raises(ValueError, match=r"no usable rows in .*empty\.jsonl"):
    data.load_dataset([path], EmptyReplies(), seq_len=8)
