"""Row formats (text, prompt/completion, Alpaca, chat) and the files they come in."""

import json
import re
import sys

import pytest

from lora_jax import data, formats
from lora_jax.data import Example
from lora_jax.formats import Chat

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n")
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nTranslate.\n\n### Response:\n")
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, lines):
  """Writes objects (as JSON) and strings (as they are), one a line."""
  text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines)
  path.write_text(text + "\n", encoding="utf-8")
  return path


def test_each_format_from_jsonl(tmp_path):
  path = write_jsonl(tmp_path / "mix.jsonl", [
      {"text": "plain", "id": 1, "metadata": {"lang": "en"}},
      {"prompt": "Q: ", "completion": "A", "source": "web"},
      {"instruction": "Translate.", "input": "chat", "output": "cat"},
      "",
      {"instruction": "Translate.", "output": "cat"},
      {"instruction": "Translate.", "input": "", "output": "cat"},
      {"messages": HELLO, "id": "x"},
  ])
  rows = data.read_texts(path)
  assert rows[:5] == [
      Example("", "plain"), Example("Q: ", "A"), Example(ALPACA_WITH_INPUT, "cat"),
      Example(ALPACA_WITHOUT_INPUT, "cat"), Example(ALPACA_WITHOUT_INPUT, "cat")]
  assert rows[5] == Chat(tuple(HELLO), f"{path}, line 7")  # the blank line 4 counts
  assert isinstance(rows[5].messages, tuple) and rows[5].messages[0] is not HELLO[0]
  assert formats.read_source(path) == rows
  assert data.Chat is Chat and data.Example is formats.Example


@pytest.mark.parametrize("row, message", [
    ({"text": "a", "messages": HELLO},
     r"several formats \(text, chat\); keep one format's keys; found \['messages', 'text'\]"),
    ({"text": "a", "instruction": "b", "output": "c", "messages": HELLO},
     r"several formats \(text, alpaca, chat\)"),
    ({"prompt": "a", "completion": "b", "instruction": "c", "output": "d"}, "several formats"),
    ({"text": "a", "input": "b"}, r"text row with \['input'\] besides.*\['input', 'text'\]"),
    ({"messages": HELLO, "prompt": "p"},
     r"chat row with \['prompt'\] besides is ambiguous; found \['messages', 'prompt'\]"),
    ({"instruction": "only", "id": 2}, r"expected an object.*found \['id', 'instruction'\]"),
    ({"conversations": []}, r'"conversations" must be a non-empty list'),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"from 'bot'; expected one of"),
    ({"conversations": [{"from": "human"}]}, r'conversations\[0\] needs "from" and "value"'),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no message has the role"),
    ({}, r"found \[\]"),
    (["a", "list"], "found list"),
    ('"a string"', "found str"),
])
def test_unknown_or_ambiguous_row_names_file_line_and_keys(tmp_path, row, message):
  path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, row])
  where = re.escape(str(tmp_path / "odd.jsonl"))
  with pytest.raises(ValueError, match=rf"^{where}, line 2: .*{message}") as e:
    data.read_texts(path)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "completion": None},
     r'"completion" is null; the text fields must be strings'),
    ({"instruction": 1, "output": "b"}, r'"instruction" is int'),
    ({"instruction": "a", "input": ["b"], "output": "c"}, r'"input" is list'),
    ({"messages": "Hi"}, r'"messages" must be a non-empty list .*; found str'),
    ({"messages": []}, r"found an empty list"),
    ({"messages": [HELLO]}, r"messages\[0\] is list"),
    ({"messages": [{"role": "assistant"}]},
     r'messages\[0\] has no "content"; found \[\'role\'\]'),
    ({"messages": [{"role": 1, "content": "x"}]}, r'messages\[0\]\["role"\] is int'),
    ({"messages": [{"role": "assistant", "content": None}]}, r'\["content"\] is null'),
    ({"messages": HELLO[:2]},
     r"no message has the role \"assistant\", so there is nothing to learn; "
     r"roles \['system', 'user'\]"),
])
def test_bad_values_name_file_and_line(tmp_path, row, message):
  path = write_jsonl(tmp_path / "bad.jsonl", [row])
  with pytest.raises(ValueError, match=rf"bad\.jsonl, line 1: .*{message}"):
    data.read_texts(path)


def test_parquet_round_trip_with_nulls(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  # One table, formats by column: a null is a missing key, in the messages' structs too.
  table = pa.Table.from_pylist([
      {"text": "plain", "prompt": None, "completion": None, "messages": None, "id": 0},
      {"text": None, "prompt": "Q", "completion": "A", "messages": None, "id": 1},
      {"text": None, "prompt": None, "completion": None, "id": 2,
       "messages": [{"role": "user", "content": "Hi", "name": None},
                    {"role": "assistant", "content": "Yo", "name": "bot"}]},
  ])
  pq.write_table(table, tmp_path / "t.parquet")
  (tmp_path / "b.txt").write_text("text file")
  rows = data.read_texts(tmp_path)  # the directory: its files sorted, .parquet included
  assert rows == [Example("", "text file"), Example("", "plain"), Example("Q", "A"),
                  Chat(({"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Yo", "name": "bot"}),
                       f"{tmp_path / 't.parquet'}, row 2")]
  assert ".parquet" in data.SUFFIXES == formats.SUFFIXES

  pq.write_table(pa.Table.from_pylist([{"text": "ok", "messages": None},
                                       {"text": None, "messages": None}]), tmp_path / "n.parquet")
  with pytest.raises(ValueError, match=r"n\.parquet, row 1: expected an object.*found \[\] "
                                       r"\(null, so missing: \['messages', 'text'\]\)"):
    data.read_texts(tmp_path / "n.parquet")
  (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
    data.read_texts(tmp_path / "bad.parquet")


def test_saved_datasets(tmp_path):
  datasets = pytest.importorskip("datasets")
  rows = [{"instruction": "Translate.", "input": "chat", "output": "cat", "id": 0},
          {"instruction": "Translate.", "input": "", "output": "cat", "id": 1}]
  datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
  assert formats.saved_dataset(tmp_path / "one") == "Dataset"
  assert formats.sources(tmp_path / "one") == [tmp_path / "one"]  # not its .arrow files
  assert data.read_texts(tmp_path / "one") == [Example(ALPACA_WITH_INPUT, "cat"),
                                               Example(ALPACA_WITHOUT_INPUT, "cat")]

  chats = datasets.Dataset.from_list([{"messages": HELLO}, {"messages": HELLO[:2]}])
  # A saved format (numpy here) does not change the rows read.
  datasets.DatasetDict(train=chats.select([0]).with_format("numpy"),
                       test=chats).save_to_disk(tmp_path / "dict")
  assert formats.saved_dataset(tmp_path / "dict") == "DatasetDict"
  assert data.read_texts([tmp_path / "dict", tmp_path / "one"])[0] == Chat(
      tuple(HELLO), f"{tmp_path / 'dict' / 'train'}, row 0")

  datasets.DatasetDict(test=chats, validation=chats).save_to_disk(tmp_path / "no_train")
  with pytest.raises(ValueError, match=r"no_train: a DatasetDict without a 'train' split; "
                                       r"its splits are \['test', 'validation'\]"):
    data.read_texts(tmp_path / "no_train")
  datasets.Dataset.from_list([{"messages": HELLO}, {"messages": HELLO[:2]}]).save_to_disk(
      tmp_path / "bad")
  with pytest.raises(ValueError, match=r"bad, row 1: no message has the role \"assistant\""):
    data.read_texts(tmp_path / "bad")


def test_missing_optional_packages_name_the_install(tmp_path, monkeypatch):
  (tmp_path / "t.parquet").write_bytes(b"")
  (tmp_path / "ds").mkdir()
  (tmp_path / "ds" / "state.json").write_text("{}")
  (tmp_path / "ds" / "dataset_info.json").write_text("{}")
  for name in ("pyarrow", "pyarrow.parquet", "datasets"):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
  with pytest.raises(ImportError, match=r"t\.parquet: reading Parquet needs pyarrow: "
                                        r"pip install pyarrow"):
    data.read_texts(tmp_path / "t.parquet")
  with pytest.raises(ImportError, match=r"ds: a directory saved by the datasets library; "
                                        r".*pip install datasets"):
    data.read_texts(tmp_path / "ds")


def test_read_source_arguments(tmp_path):
  (tmp_path / "plain").mkdir()
  with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
    formats.read_source(tmp_path / "plain")
  (tmp_path / "a.md").write_text("x")
  with pytest.raises(ValueError, match=r"a\.md: expected a \.txt, \.jsonl or \.parquet file"):
    formats.read_source(tmp_path / "a.md")
  with pytest.raises(ValueError, match="documents"):
    formats.read_source(tmp_path / "a.md", documents="pages")


def test_alpaca_beside_its_text_rendering_and_sharegpt(tmp_path):
  """tatsu-lab/alpaca's rows carry `text` too; ShareGPT rows become chats."""
  path = write_jsonl(tmp_path / "more.jsonl", [
      {"instruction": "Translate.", "input": "chat", "output": "cat", "text": "rendered"},
      {"conversations": [{"from": "system", "value": "Be brief."},
                         {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
  ])
  rows = data.read_texts(path)
  assert rows[0] == Example(ALPACA_WITH_INPUT, "cat")
  assert rows[1] == Chat(tuple(HELLO), f"{path}, line 2")
