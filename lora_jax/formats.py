"""The data a user brings: what one row means, and reading rows from files.

A row is a mapping, and its keys say what it is:

* `text`: plain text, all of it learned: `Example('', text)`.
* `prompt` and `completion`: the model learns the completion given the
  prompt: `Example(prompt, completion)`.
* Alpaca, `instruction` and `output` with an optional `input`: the prompt
  is the Stanford Alpaca template around the instruction (and the input,
  unless it is empty), the completion is the output. A `text` beside them
  (tatsu-lab/alpaca's rendering of the same example) is ignored.
* Chat, `messages`: a list of `{'role': ..., 'content': ...}` with at least
  one `'assistant'` message: a `Chat`, which the tokenizer's chat template
  renders and whose assistant replies are learned (see `data.tokenize`).
* ShareGPT, `conversations`: a list of `{'from': ..., 'value': ...}` with
  `from` one of `system`, `human`/`user`, `gpt`/`assistant`: the same `Chat`.

Other keys (`id`, `source`, `metadata`, ...) are ignored. A row with the keys
of no format, or of several (say `text` and `messages`), is an error naming
where it is and the keys it has.

Rows come from `.jsonl` files (one object per line), `.parquet` files (one
row per table row; needs `pyarrow`), and directories written by the
`datasets` library's `save_to_disk` (a `Dataset`, or the `'train'` split of
a `DatasetDict`; needs `datasets`). `.txt` files are plain text: one
document per file, paragraph or line. In Parquet files and saved datasets,
a null is a missing key, so one table can mix formats column by column.

Only numpy and the standard library are imported here; `pyarrow` and
`datasets` are imported when a file needs them.

>>> example = parse_row({"instruction": "Add 2 and 2.", "output": "4", "id": 3}, "row 0")
>>> print(example.prompt + example.completion)
Below is an instruction that describes a task. Write a response that
appropriately completes the request.
<BLANKLINE>
### Instruction:
Add 2 and 2.
<BLANKLINE>
### Response:
4
>>> chat = parse_row({"messages": [{"role": "user", "content": "Hi"},
...                                {"role": "assistant", "content": "Hello!"}]}, "a.jsonl, line 1")
>>> chat.source, len(chat.messages)
('a.jsonl, line 1', 2)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

DOCUMENTS = ("file", "paragraphs", "lines")
SUFFIXES = (".txt", ".jsonl", ".parquet")
Paths = str | os.PathLike | Sequence[str | os.PathLike]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# Each format: its required keys and its optional ones.
FORMATS = {
    "text": ({"text"}, set()),
    "prompt/completion": ({"prompt", "completion"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
    "chat": ({"messages"}, set()),
    "sharegpt": ({"conversations"}, set()),
}
# ShareGPT's speakers as chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
_KEYS = set().union(*(required | optional for required, optional in FORMATS.values()))
_EXPECTED = ('expected an object with "text", with "prompt" and "completion", with '
             '"instruction" and "output" (and an optional "input"), with "messages", or with '
             '"conversations"')


class Example(NamedTuple):
  """A training example: the model learns `completion` given `prompt` ('' for plain text)."""

  prompt: str
  completion: str


class Chat(NamedTuple):
  """A conversation to learn the assistant's replies of.

  Attributes:
    messages: `{'role': str, 'content': str, ...}` dicts, in order; at least
      one has the role `'assistant'`.
    source: where the row came from, e.g. `'data/train.jsonl, line 7'`, for
      errors found later (when the chat template renders it).
  """

  messages: tuple[dict, ...]
  source: str


Row = Example | Chat


def _type(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _strings(source: str, row: Mapping, keys: Sequence[str]) -> list[str]:
  for key in keys:
    if not isinstance(row[key], str):
      raise ValueError(f'{source}: "{key}" is {_type(row[key])}; the text fields must be strings')
  return [row[key] for key in keys]


def check_messages(messages: Any, source: str) -> None:
  """Raises `ValueError`, prefixed by `source`, naming the first malformed message.

  A conversation is a non-empty list of dicts with string `role` and `content`.
  """
  shape = 'a non-empty list of {"role": ..., "content": ...} objects'
  if not isinstance(messages, (list, tuple)) or not messages:
    found = "an empty list" if isinstance(messages, (list, tuple)) else _type(messages)
    raise ValueError(f'{source}: "messages" must be {shape}; found {found}')
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f'{source}: messages[{i}] is {_type(message)}; "messages" must be {shape}')
    for key in ("role", "content"):
      if key not in message:
        raise ValueError(f'{source}: messages[{i}] has no "{key}"; found {sorted(message)}')
      if not isinstance(message[key], str):
        raise ValueError(f'{source}: messages[{i}]["{key}"] is {_type(message[key])}, '
                         "not a string")


def _chat(source: str, messages: Any) -> Chat:
  check_messages(messages, source)
  roles = [m["role"] for m in messages]
  if "assistant" not in roles:
    raise ValueError(f'{source}: no message has the role "assistant", so there is nothing to '
                     f"learn; roles {roles}")
  return Chat(tuple(dict(m) for m in messages), source)


def parse_row(row: Any, source: str) -> Row:
  """The `Example` or `Chat` that one row of data means.

  Args:
    row: a mapping with the keys of one format (see the module docs); other
      keys are ignored.
    source: where the row is, e.g. `'train.jsonl, line 7'`, for errors and
      for `Chat.source`.

  Returns:
    An `Example` for text, prompt/completion and Alpaca rows; a `Chat` for
    `messages`.

  Raises:
    ValueError: `'{source}: ...'`, for a row that is not a mapping, has the
      keys of no format or of several (naming the keys found), has a text
      field that is not a string, or messages that are malformed or have no
      assistant reply.
  """
  if not isinstance(row, Mapping):
    raise ValueError(f"{source}: {_EXPECTED}; found {_type(row)}")
  keys = set(row)
  known = keys & _KEYS
  matched = [name for name, (required, _) in FORMATS.items() if required <= known]
  found = sorted(map(str, keys))
  if matched == ["text", "alpaca"]:  # tatsu-lab/alpaca: `text` renders the same example
    matched, known = ["alpaca"], known - {"text"}
  if len(matched) > 1:
    raise ValueError(f"{source}: the row has the keys of several formats ({', '.join(matched)}); "
                     f"keep one format's keys; found {found}")
  if not matched:
    raise ValueError(f"{source}: {_EXPECTED}; found {found}")
  name = matched[0]
  required, optional = FORMATS[name]
  if known - required - optional:
    raise ValueError(f"{source}: a {name} row with {sorted(known - required - optional)} "
                     f"besides is ambiguous; found {found}")
  if name == "text":
    return Example("", *_strings(source, row, ["text"]))
  if name == "prompt/completion":
    return Example(*_strings(source, row, ["prompt", "completion"]))
  if name == "alpaca":
    instruction, output = _strings(source, row, ["instruction", "output"])
    given = _strings(source, row, ["input"])[0] if "input" in row else ""
    if given != "":
      prompt = ALPACA_PROMPT.format(instruction=instruction, input=given)
    else:
      prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return Example(prompt, output)
  if name == "sharegpt":
    return _chat(source, _sharegpt(source, row["conversations"]))
  return _chat(source, row["messages"])


def _sharegpt(source: str, turns: Any) -> list[dict]:
  """ShareGPT `conversations` as chat messages."""
  if not isinstance(turns, (list, tuple)) or not turns:
    raise ValueError(f'{source}: "conversations" must be a non-empty list of '
                     '{"from": ..., "value": ...} objects')
  messages = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping) or not {"from", "value"} <= set(turn):
      raise ValueError(f'{source}: conversations[{i}] needs "from" and "value"; found '
                       f"{sorted(turn) if isinstance(turn, Mapping) else _type(turn)}")
    if turn["from"] not in SHAREGPT_ROLES:
      raise ValueError(f'{source}: conversations[{i}] is from {turn["from"]!r}; expected one '
                       f"of {sorted(SHAREGPT_ROLES)}")
    messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
  return messages


def _jsonl(path: Path, text: str, parse: Callable[[Any, str], Any] = parse_row) -> list:
  rows = []
  # Only '\n' ends a record: str.splitlines would also split at U+2028 and
  # friends, which JSON allows raw inside strings.
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
    rows.append(parse(record, f"{path}, line {number}"))
  return rows


def _plain(text: str, documents: str) -> list[Example]:
  if documents == "file":
    texts = [text]
  elif documents == "paragraphs":
    # Blank lines separate paragraphs; a paragraph keeps its indentation.
    texts = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text)]
  else:
    texts = text.split("\n")
  return [Example("", t) for t in texts if t.strip()]


def _without_nulls(row: dict) -> dict:
  """A columnar row with its nulls as missing keys, in messages too."""
  row = {k: v for k, v in row.items() if v is not None}
  if isinstance(row.get("messages"), list):
    row["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                       for m in row["messages"]]
  return row


def _columnar(batches: Iterable[Any], where: Path,
              parse: Callable[[Any, str], Any] = parse_row) -> list:
  """Rows of Arrow record batches or tables, numbered from 0 like `dataset[i]`."""
  rows = []
  for batch in batches:
    for record in batch.to_pylist():
      try:
        rows.append(parse(_without_nulls(record), f"{where}, row {len(rows)}"))
      except ValueError as e:
        nulls = sorted(k for k, v in record.items() if v is None)
        raise ValueError(f"{e} (null, so missing: {nulls})" if nulls else str(e)) from None
  return rows


def _parquet(path: Path, parse: Callable[[Any, str], Any] = parse_row) -> list:
  try:
    import pyarrow
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
  try:
    batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    return _columnar(batches, path, parse)
  except (pyarrow.ArrowException, OSError) as e:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{path}: not a readable Parquet file ({detail})") from None


def saved_dataset(path: str | os.PathLike) -> str | None:
  """What `datasets`' `save_to_disk` wrote at `path`: `'Dataset'`, `'DatasetDict'` or None."""
  path = Path(path)
  if (path / "dataset_dict.json").is_file():
    return "DatasetDict"
  if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
    return "Dataset"
  return None


def _saved(path: Path, parse: Callable[[Any, str], Any] = parse_row) -> list:
  try:
    import datasets
  except ImportError:
    raise ImportError(f"{path}: a directory saved by the datasets library; reading it needs "
                      "datasets: pip install datasets") from None
  loaded = datasets.load_from_disk(str(path))
  where = path
  if isinstance(loaded, datasets.DatasetDict):
    if "train" not in loaded:
      raise ValueError(f"{path}: a DatasetDict without a 'train' split; its splits are "
                       f"{sorted(loaded)}")
    loaded, where = loaded["train"], path / "train"
  # The saved format (numpy, torch, ...) is dropped: rows as plain Python values.
  return _columnar(loaded.with_format("arrow").iter(batch_size=4096), where, parse)


def sources(paths: Paths) -> list[Path]:
  """The files and saved datasets that `paths` name, in order.

  A directory written by `datasets`' `save_to_disk` is one source; any
  other directory means its `.txt`, `.jsonl` and `.parquet` files, sorted
  by name, not recursive.

  Raises:
    FileNotFoundError: naming a path that does not exist.
    ValueError: for a file that is not `.txt`, `.jsonl` or `.parquet`.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  found = []
  for path in map(Path, paths):
    if path.is_dir():
      if saved_dataset(path):
        found.append(path)
      else:
        found += sorted(f for f in path.iterdir() if f.is_file() and f.suffix in SUFFIXES)
    elif not path.exists():
      raise FileNotFoundError(f"no such file or directory: {path}")
    elif path.suffix not in SUFFIXES:
      raise ValueError(f"{path}: expected a .txt, .jsonl or .parquet file, a directory of them, "
                       "or a directory written by datasets' save_to_disk")
    else:
      found.append(path)
  return found


def read_source(path: str | os.PathLike, *, documents: str = "file") -> list[Row]:
  """The rows of one file or saved dataset (see `sources`), in order.

  Args:
    path: a `.txt`, `.jsonl` or `.parquet` file, or a directory written by
      `datasets`' `save_to_disk`.
    documents: for a `.txt` file, one example per `'file'`, per
      `'paragraphs'` (separated by blank lines) or per non-blank `'lines'`.

  Raises:
    ValueError: for a bad row (naming the file and the line, or the row
      counted from 0), a file that is not UTF-8 or not Parquet, or a
      `DatasetDict` without a `'train'` split.
    ImportError: naming the `pip install` that reading the file needs.
  """
  if documents not in DOCUMENTS:
    raise ValueError(f"documents={documents!r}: must be one of {DOCUMENTS}")
  path = Path(path)
  if path.is_dir():
    if not saved_dataset(path):
      raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk")
    return _saved(path)
  if path.suffix == ".parquet":
    return _parquet(path)
  if path.suffix not in SUFFIXES:
    raise ValueError(f"{path}: expected a .txt, .jsonl or .parquet file")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 ({e})") from None
  return _jsonl(path, text) if path.suffix == ".jsonl" else _plain(text, documents)


def read_adapter_rows(path: str | os.PathLike, key: str) -> list[tuple[str, str, Row]]:
  """The rows of one JSONL or Parquet file or saved dataset, each with the adapter it trains.

  Every row names its adapter in its field `key` (a run's `data.adapter_key`);
  the other fields are read as `parse_row` reads them.

  Args:
    path: a `.jsonl` or `.parquet` file, or a directory written by
      `datasets`' `save_to_disk`.
    key: the field that names each row's adapter.

  Returns:
    `(adapter, source, row)` triples in file order; `source` says where the
    row is (e.g. `'train.jsonl, line 7'`).

  Raises:
    ValueError: for a plain text file (its rows have no fields), a row
      without `key` or whose `key` is not a non-empty string (naming the row
      and the keys found), and as `read_source`.
  """
  path = Path(path)

  def parse(record: Any, source: str) -> tuple[str, str, Row]:
    if not isinstance(record, Mapping):
      return parse_row(record, source)  # raises, naming what the row is
    if key not in record:
      raise ValueError(f'{source}: no "{key}" field naming the adapter the row trains '
                       f"(data.adapter_key); found {sorted(map(str, record))}")
    label = record[key]
    if not isinstance(label, str) or not label:
      raise ValueError(f'{source}: "{key}" is {_type(label) if label != "" else "empty"}; '
                       "it must name one of the run's adapters")
    return label, source, parse_row({k: v for k, v in record.items() if k != key}, source)

  if path.is_dir():
    if not saved_dataset(path):
      raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk")
    return _saved(path, parse)
  if path.suffix == ".parquet":
    return _parquet(path, parse)
  if path.suffix != ".jsonl":
    raise ValueError(f'{path}: plain text has no "{key}" field to name each row\'s adapter; '
                     "data for several adapters comes in .jsonl or .parquet files or saved "
                     "datasets")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 ({e})") from None
  return _jsonl(path, text, parse)


PROMPT_KEYS = ("prompt", "adapter", "system", "seed")


class Prompt(NamedTuple):
  """One line of a prompts file (`read_prompts`).

  Attributes:
    prompt: the text to continue, or in a chat the user's message.
    adapter: the name of the adapter to run it with; None: the base model.
    system: a system message for a chat, or None.
    seed: the sampling seed of this prompt, or None for the run's.
    source: where the line is, e.g. `'prompts.jsonl, line 3'`.
  """

  prompt: str
  adapter: str | None
  system: str | None
  seed: int | None
  source: str


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
  """The prompts of a JSONL file: one `{"prompt": ..., "adapter": ..., "system": ...,
  "seed": ...}` object per line, `"adapter"` (a name, or null/absent for the
  base model), `"system"` and `"seed"` (an int: this prompt's sampling seed)
  optional. Blank lines are skipped.

  Raises:
    FileNotFoundError: when `path` is not a file.
    ValueError: naming the line, for a line that is not a JSON object, lacks
      `"prompt"`, has a key besides those four, or a value of another type
      (null allowed for the optional ones); and for a file with no prompts.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompts file {path} does not exist")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 ({e})") from None
  shape = 'an object with "prompt" and optionally "adapter", "system" and "seed"'
  prompts = []
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    where = f"{path}, line {number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, Mapping):
      raise ValueError(f"{where}: expected {shape}; found {_type(record)}")
    unknown = sorted(set(record) - set(PROMPT_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown keys {unknown}; expected {shape}")
    if not isinstance(record.get("prompt"), str):
      found = "no \"prompt\"" if "prompt" not in record else f'"prompt" is {_type(record["prompt"])}'
      raise ValueError(f"{where}: {found}; expected {shape} (a string)")
    for key in ("adapter", "system"):
      if record.get(key) is not None and not isinstance(record[key], str):
        raise ValueError(f'{where}: "{key}" is {_type(record[key])}; expected a string or null')
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**32):
      raise ValueError(f'{where}: "seed" is {seed!r}; expected an int in [0, 2**32) or null')
    prompts.append(Prompt(record["prompt"], record.get("adapter"), record.get("system"), seed,
                          where))
  if not prompts:
    raise ValueError(f"{path} holds no prompts (expected one JSON object per line)")
  return prompts
