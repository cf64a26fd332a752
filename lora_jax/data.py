"""Text files in, fixed-shape token batches out: the data pipeline (numpy only).

`read_texts` turns plain text and JSONL files into `Example`s, `tokenize`
gives each its token ids and loss mask, `pack` cuts them into rows of
`seq_len`, and `Loader` serves shuffled global batches of those rows;
`load_dataset` does the first three. Batches hold `input_ids`,
`attention_mask` and `loss_mask`, int32 (batch, seq_len): what
`lora_jax.train.causal_lm_loss` consumes.

Nothing here imports jax, so loading data never touches an accelerator. On
several hosts each `Loader` is given the rows of the global batch that its
devices hold (`lora_jax.distributed.host_rows(step.batch_sharding,
batch_size)`) or its `(process_index, process_count)`; the shuffled order
depends only on the seed, so the hosts' rows together are the one-host batch.

>>> tok = ByteTokenizer()
>>> rows = pack([tokenize(Example(prompt="Hi ", completion="yo"), tok)], seq_len=4)
>>> rows["input_ids"].tolist()  # BOS 'H' 'i' ' ' | 'y' 'o' EOS PAD
[[256, 72, 105, 32], [121, 111, 257, 258]]
>>> rows["loss_mask"].tolist()  # the completion and EOS only
[[0, 0, 0, 0], [1, 1, 1, 0]]
>>> rows["attention_mask"].tolist()
[[1, 1, 1, 1], [1, 1, 1, 0]]
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

BOS, EOS, PAD = 256, 257, 258
DOCUMENTS = ("file", "paragraphs", "lines")
SUFFIXES = (".txt", ".jsonl")
Paths = str | os.PathLike | Sequence[str | os.PathLike]


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus `BOS` (256), `EOS` (257) and `PAD` (258).

  `vocab_size` is 259, so a model for it needs an embedding of at least 259
  rows: round up to a multiple of 64 for TPU-friendly shapes, e.g.
  `lora_jax.models.llama.config_for("tiny", vocab_size=320)` (the preset's
  256 is too small). No files and no training, and every string encodes.

  >>> tok = ByteTokenizer()
  >>> tok.encode("hé", bos=True).tolist()
  [256, 104, 195, 169]
  >>> tok.decode([256, 104, 195, 169, 257, 258])
  'hé'
  """

  BOS, EOS, PAD = BOS, EOS, PAD
  vocab_size = 259

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """The bytes of `text` as int32 ids, optionally between `BOS` and `EOS`."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.concatenate([[BOS]] * bos + [ids] + [[EOS]] * eos).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, skipping special ids; invalid UTF-8 becomes U+FFFD.

    Raises:
      ValueError: for an id outside [0, vocab_size).
    """
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64).ravel()
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"ids outside [0, {self.vocab_size}): {sorted(set(bad.tolist()))}")
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


class Example(NamedTuple):
  """A training example: the model learns `completion` given `prompt` ('' for plain text)."""

  prompt: str
  completion: str


def _files(paths: Paths) -> list[Path]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(Path, paths):
    if path.is_dir():
      files += sorted(f for f in path.iterdir() if f.is_file() and f.suffix in SUFFIXES)
    elif not path.exists():
      raise FileNotFoundError(f"no such file or directory: {path}")
    elif path.suffix not in SUFFIXES:
      raise ValueError(f"{path}: expected a .txt or .jsonl file or a directory of them")
    else:
      files.append(path)
  return files


def _jsonl(path: Path, text: str) -> list[Example]:
  examples = []
  # Only '\n' ends a record: str.splitlines would also split at U+2028 and
  # friends, which JSON allows raw inside strings.
  for number, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
    keys = set(record) if isinstance(record, dict) else set()
    # Other keys (ids, sources, ...) are ignored; an ambiguous record is not.
    if "text" in keys and not keys & {"prompt", "completion"}:
      fields = ("", record["text"])
    elif {"prompt", "completion"} <= keys and "text" not in keys:
      fields = (record["prompt"], record["completion"])
    else:
      found = sorted(keys) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f'{path}, line {number}: expected an object with "text" or with '
                       f'"prompt" and "completion"; found {found}')
    if not all(isinstance(f, str) for f in fields):
      raise ValueError(f"{path}, line {number}: the text fields must be strings")
    examples.append(Example(*fields))
  return examples


def _plain(text: str, documents: str) -> list[Example]:
  if documents == "file":
    texts = [text]
  elif documents == "paragraphs":
    # Blank lines separate paragraphs; a paragraph keeps its indentation.
    texts = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text)]
  else:
    texts = text.split("\n")
  return [Example("", t) for t in texts if t.strip()]


def read_texts(paths: Paths, *, documents: str = "file") -> list[Example]:
  """Reads examples from `.txt` and `.jsonl` files.

  A JSONL line is an object with `"text"` (plain text) or with `"prompt"`
  and `"completion"`; other keys are ignored and blank lines skipped. A text
  file is one document, or with `documents` one per paragraph (separated by
  blank lines) or per non-blank line. Plain text has the prompt `''`.

  Args:
    paths: a file, a directory (its `.txt` and `.jsonl` files, sorted by
      name, not recursive) or a list of them, read in order.
    documents: `'file'`, `'paragraphs'` or `'lines'`, for text files.

  Returns:
    The examples, in file order.

  Raises:
    FileNotFoundError: naming a path that does not exist.
    ValueError: for a malformed JSONL line (naming the file, the line number
      and the keys found), a file that is not UTF-8, or no examples at all.
  """
  if documents not in DOCUMENTS:
    raise ValueError(f"documents={documents!r}: must be one of {DOCUMENTS}")
  files = _files(paths)
  examples = []
  for path in files:
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not UTF-8 ({e})") from None
    examples += _jsonl(path, text) if path.suffix == ".jsonl" else _plain(text, documents)
  if not examples:
    raise ValueError(f"no examples in {paths!s}: {len(files)} .txt/.jsonl files, all empty")
  return examples


def tokenize(example: Example, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
  """`[BOS] + prompt + completion + [EOS]` and its loss mask, both int32.

  The mask is 1 on the completion and `EOS`, 0 on `BOS` and the prompt: an
  instruction tuned model learns to answer, not to ask. For plain text every
  token but `BOS` counts.

  Args:
    example: the texts.
    tokenizer: has `encode(text) -> ids` and the ids `BOS` and `EOS`, like
      `ByteTokenizer`.
  """
  prompt = np.asarray(tokenizer.encode(example.prompt), np.int32)
  completion = np.asarray(tokenizer.encode(example.completion), np.int32)
  ids = np.concatenate([[tokenizer.BOS], prompt, completion, [tokenizer.EOS]]).astype(np.int32)
  mask = np.zeros(len(ids), np.int32)
  mask[1 + len(prompt):] = 1
  return ids, mask


def pack(tokenized: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, *,
         packing: bool = True, pad_id: int = PAD) -> dict[str, np.ndarray]:
  """Rows of `seq_len` tokens: `input_ids`, `attention_mask`, `loss_mask`, int32.

  Packed, the examples are concatenated and cut into consecutive rows, and
  only the last row is padded. The reference Llama has no segment ids, so
  within a row attention crosses from one example into the next (as in many
  LLM trainers; BOS and EOS mark the boundary), and a row's first token is
  context only, never predicted. Unpacked, each example has its own row,
  truncated or padded. Padding is `pad_id`, with both masks 0.

  Args:
    tokenized: `(ids, loss_mask)` pairs from `tokenize`.
    seq_len: tokens per row, >= 2.
    packing: concatenate (True) or one example per row (False).
    pad_id: the id that pads.

  Raises:
    ValueError: for no tokens, or a bad `seq_len`.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 2")
  tokenized = list(tokenized)
  if not tokenized:
    raise ValueError("no examples to pack")
  if packing:
    ids, mask = (np.concatenate(parts) for parts in zip(*tokenized))
    pieces = [(ids[s:s + seq_len], mask[s:s + seq_len]) for s in range(0, len(ids), seq_len)]
  else:
    pieces = [(ids[:seq_len], mask[:seq_len]) for ids, mask in tokenized]
  rows = {"input_ids": np.full((len(pieces), seq_len), pad_id, np.int32),
          "attention_mask": np.zeros((len(pieces), seq_len), np.int32),
          "loss_mask": np.zeros((len(pieces), seq_len), np.int32)}
  for r, (ids, mask) in enumerate(pieces):
    rows["input_ids"][r, :len(ids)] = ids
    rows["attention_mask"][r, :len(ids)] = 1
    rows["loss_mask"][r, :len(ids)] = mask
  return rows


def load_dataset(paths: Paths, tokenizer: Any, seq_len: int, *, packing: bool = True,
                 documents: str = "file") -> dict[str, np.ndarray]:
  """`read_texts`, `tokenize` and `pack`: rows ready for a `Loader`."""
  examples = read_texts(paths, documents=documents)
  return pack((tokenize(e, tokenizer) for e in examples), seq_len, packing=packing,
              pad_id=tokenizer.PAD)


def _index(value: Any, name: str, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
  return int(value)


class Loader:
  """Shuffled global batches of `rows`, each host yielding only its own rows.

  Epoch `e` visits the rows in the order
  `np.random.default_rng([seed, e]).permutation(n_rows)` (in order without
  `shuffle`); its batch `i` is the global rows `order[i * B:(i + 1) * B]`,
  of which a host yields `host_rows`. The order never depends on the number
  of hosts, and the position `{'epoch', 'batch'}` of the next batch is all a
  checkpoint needs: the same rows, batch size and seed resume exactly.
  Iteration never ends; `itertools.islice(loader, loader.steps_per_epoch)`
  is one epoch. Memory-mapped `rows` (`np.load(..., mmap_mode='r')`) are
  read only where this host's rows lie.

  Args:
    rows: arrays with a leading row axis, e.g. from `load_dataset`.
    batch_size: rows in a global batch.
    seed: an integer >= 0.
    shuffle: shuffle every epoch, or keep the rows' order.
    drop_remainder: skip the last `n_rows % batch_size` rows of an epoch's
      order. Otherwise the last batch is filled with all-zero rows: their
      masks are 0 so they add no loss, and the batch shape stays the same,
      so a jitted step does not recompile.
    host_rows: this host's rows of the global batch: a slice (from
      `lora_jax.distributed.host_rows`), or `(process_index, process_count)`
      for the process_index-th of process_count equal blocks; default all.
    position: where to start, a `state()`; default the first batch.

  Raises:
    ValueError: for ragged or empty `rows`, a batch larger than the rows
      (with `drop_remainder`), or bad host rows or position.
  """

  def __init__(self, rows: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = True,
               host_rows: slice | tuple[int, int] | None = None,
               position: Mapping[str, int] | None = None):
    self.rows = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in rows.items()}
    sizes = {len(v) for v in self.rows.values()}
    if len(sizes) != 1 or 0 in sizes:
      raise ValueError(f"rows must be non-empty arrays of one length; got lengths {sizes}")
    self.n_rows = sizes.pop()
    self.batch_size = _index(batch_size, "batch_size", 1)
    self.seed = _index(seed, "seed")
    self.shuffle, self.drop_remainder = bool(shuffle), bool(drop_remainder)
    if self.drop_remainder and self.batch_size > self.n_rows:
      raise ValueError(f"batch_size={batch_size} is larger than the {self.n_rows} rows; "
                       "use smaller batches or drop_remainder=False")
    self.steps_per_epoch = (self.n_rows // self.batch_size if self.drop_remainder
                            else -(-self.n_rows // self.batch_size))
    if isinstance(host_rows, tuple):
      index, count = _index(host_rows[0], "process_index"), _index(host_rows[1], "process_count", 1)
      if index >= count or self.batch_size % count:
        raise ValueError(f"host_rows={host_rows}: (process_index, process_count) needs "
                         f"index < count and count dividing batch_size={batch_size}")
      share = self.batch_size // count
      host_rows = slice(index * share, (index + 1) * share)
    host_rows = slice(None) if host_rows is None else host_rows
    if not isinstance(host_rows, slice):
      raise ValueError(f"host_rows={host_rows!r}: must be a slice or (index, count)")
    start, stop, stride = host_rows.start or 0, host_rows.stop, host_rows.step or 1
    stop = self.batch_size if stop is None else stop
    if stride != 1 or not 0 <= start < stop <= self.batch_size:
      raise ValueError(f"host_rows={host_rows}: must be a block of rows within [0, {batch_size})")
    self.host_rows = slice(start, stop)
    self._order_cache: tuple[int, np.ndarray] | None = None
    self._step = 0
    if position is not None:
      self.restore(position)

  def state(self) -> dict[str, int]:
    """The position of the next batch: `{'epoch': e, 'batch': i}`."""
    epoch, batch = divmod(self._step, self.steps_per_epoch)
    return {"epoch": epoch, "batch": batch}

  def restore(self, state: Mapping[str, int]) -> None:
    """Continues from a `state()`: the next batch is the one it names."""
    epoch = _index(state["epoch"], "epoch")
    batch = _index(state["batch"], "batch")
    if batch >= self.steps_per_epoch:
      raise ValueError(f"batch={batch}: an epoch has only {self.steps_per_epoch} batches")
    self._step = epoch * self.steps_per_epoch + batch

  @property
  def step(self) -> int:
    """Batches yielded since the start of epoch 0."""
    return self._step

  def order(self, epoch: int) -> np.ndarray:
    """The row indices epoch `epoch` visits, in order."""
    if self._order_cache is None or self._order_cache[0] != epoch:
      order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
               if self.shuffle else np.arange(self.n_rows))
      self._order_cache = (epoch, order)  # one permutation per epoch, not per batch
    return self._order_cache[1]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows of global batch `step` (counted from epoch 0), any step."""
    epoch, batch = divmod(_index(step, "step"), self.steps_per_epoch)
    indices = self.order(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]
    # -1 marks the fill rows of a short last batch (without drop_remainder).
    indices = np.pad(indices, (0, self.batch_size - len(indices)), constant_values=-1)
    indices = indices[self.host_rows]
    real = indices >= 0
    batch = {}
    for key, value in self.rows.items():
      batch[key] = np.zeros((len(indices),) + value.shape[1:], value.dtype)
      batch[key][real] = value[indices[real]]
    return batch

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self._step)
    self._step += 1
    return batch
