"""Data files in, fixed-shape token batches out: the data pipeline (numpy only).

`read_texts` reads text, JSONL and Parquet files and saved `datasets` into
`Example`s and `Chat`s (`lora_jax.formats` says what a row means),
`tokenize` gives each its token ids and loss mask, `pack` cuts them into
rows of `seq_len`, and `Loader` serves shuffled global batches of those
rows; `load_dataset` does the first three. Batches hold `input_ids`,
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

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Row formats and file reading live in formats; their names stay importable from here.
from lora_jax.formats import DOCUMENTS, SUFFIXES, Chat, Example, Paths  # noqa: F401
from lora_jax.formats import read_adapter_rows, read_source, sources

BOS, EOS, PAD = 256, 257, 258


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus `BOS` (256), `EOS` (257) and `PAD` (258).

  `vocab_size` is 259, so a model for it needs an embedding of at least 259
  rows: round up to a multiple of 64 for TPU-friendly shapes, e.g.
  `lora_jax.models.llama.config_for("tiny", vocab_size=320)` (the preset's
  256 is too small). No files and no training, and every string encodes.
  It has no chat template, so it cannot tokenize a `Chat`.

  >>> tok = ByteTokenizer()
  >>> tok.encode("hé", bos=True).tolist()
  [256, 104, 195, 169]
  >>> tok.decode([256, 104, 195, 169, 257, 258])
  'hé'
  """

  BOS, EOS, PAD = BOS, EOS, PAD
  vocab_size = 259
  name = "the byte tokenizer"
  stop_ids = (EOS,)
  chat_template = None

  def render_chat(self, messages, *, add_generation_prompt: bool = False) -> str:
    """Raises: bytes have no chat template (use a checkpoint's tokenizer)."""
    raise ValueError("the byte tokenizer has no chat template: chat needs a Hugging Face "
                     "checkpoint's tokenizer")

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """The bytes of `text` as int32 ids, optionally between `BOS` and `EOS`."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return np.concatenate([[BOS]] * bos + [ids] + [[EOS]] * eos).astype(np.int32)

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`encode(text)` and each id's `(start, end)` character span in `text`."""
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)  # UTF-8 bytes
    starts = np.repeat(np.arange(len(points)), widths)
    return self.encode(text), np.stack([starts, starts + 1], axis=1)

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


def read_texts(paths: Paths, *, documents: str = "file") -> list[Example | Chat]:
  """Reads examples and chats from text, JSONL and Parquet files and saved datasets.

  A JSONL line, Parquet row or dataset row has `"text"` (plain text),
  `"prompt"` and `"completion"`, Alpaca's `"instruction"` and `"output"`
  (and `"input"`), or chat `"messages"`; other keys are ignored and blank
  JSONL lines skipped (`lora_jax.formats` has the details). A text file is
  one document, or with `documents` one per paragraph (separated by blank
  lines) or per non-blank line. Plain text has the prompt `''`.

  Args:
    paths: a file (`.txt`, `.jsonl`, `.parquet`), a directory written by
      `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict`'s
      `'train'` split), any other directory (its `.txt`, `.jsonl` and
      `.parquet` files, sorted by name, not recursive) or a list of them,
      read in order.
    documents: `'file'`, `'paragraphs'` or `'lines'`, for text files.

  Returns:
    `Example`s and `Chat`s, in file order.

  Raises:
    FileNotFoundError: naming a path that does not exist.
    ValueError: for a malformed row (naming the file, the line number or
      row, and the keys found), a file that is not UTF-8 or not Parquet, or
      no examples at all.
    ImportError: naming the `pip install` that a Parquet file (`pyarrow`)
      or a saved dataset (`datasets`) needs.
  """
  if documents not in DOCUMENTS:
    raise ValueError(f"documents={documents!r}: must be one of {DOCUMENTS}")
  found = sources(paths)
  examples = []
  for source in found:
    examples += read_source(source, documents=documents)
  if not examples:
    raise ValueError(f"no examples in {_describe(paths)}: {len(found)} files or datasets, "
                     "all empty")
  return examples


def _describe(paths: Paths) -> str:
  if isinstance(paths, (str, os.PathLike)):
    return str(paths)
  return ", ".join(map(str, paths)) or "no paths"


def _tokenizer_name(tokenizer: Any) -> str:
  name = getattr(tokenizer, "name", None)
  return str(name) if name else f"the {type(tokenizer).__name__}"


def _tokenize_chat(chat: Chat, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError(f"{chat.source}: a chat row needs a tokenizer with a chat template; "
                     f"{_tokenizer_name(tokenizer)} has none")
  if not callable(getattr(tokenizer, "chat_segments", None)):
    raise ValueError(f"{chat.source}: {_tokenizer_name(tokenizer)} has a chat template but no "
                     "chat_segments(messages) to render it")
  try:
    segments = list(tokenizer.chat_segments([dict(m) for m in chat.messages]))
  except Exception as e:  # a template's own errors are about this row: say which
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    named = isinstance(e, ValueError) or detail == type(e).__name__
    kind = "" if named else f"{type(e).__name__}: "
    raise ValueError(f"{chat.source}: {kind}{detail}") from e
  for segment in segments:
    if (not isinstance(segment, (tuple, list)) or len(segment) != 2
        or not isinstance(segment[0], str) or not isinstance(segment[1], (bool, np.bool_))):
      raise ValueError(f"{chat.source}: chat_segments must give (text, trained) pairs of a str "
                       f"and a bool; got {segment!r:.80}")
  return _encode_marked(tokenizer, segments)


def _encode_marked(tokenizer: Any, pieces: Sequence[tuple[str, bool]]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The ids of the pieces' text, encoded in one call, and a mask of the trained ones.

  One call, not one per piece: tokenizers that mark the start of a text
  (SentencePiece's leading '▁') or merge across a boundary give the ids the
  model sees when the whole text is encoded at inference. A token is trained
  when its characters overlap a trained piece, so one that straddles the
  boundary into a reply (' n' of '[/INST]' + ' n.') belongs to the reply.
  """
  text = "".join(piece for piece, _ in pieces)
  ids, spans = tokenizer.encode_offsets(text)
  ids, spans = np.asarray(ids, np.int32).ravel(), np.asarray(spans, np.int64).reshape(-1, 2)
  trained = np.zeros(len(text), np.int64)
  start = 0
  for piece, learned in pieces:
    trained[start:start + len(piece)] = bool(learned)
    start += len(piece)
  seen = np.concatenate([[0], np.cumsum(trained)])  # trained characters before each position
  first = np.clip(spans[:, 0], 0, len(text))
  last = np.clip(np.maximum(spans[:, 1], spans[:, 0] + 1), 0, len(text))
  return ids, (seen[last] - seen[first] > 0).astype(np.int32)


def tokenize(example: Example | Chat, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and loss mask, both int32, of an `Example` or a `Chat`.

  An `Example` is `[BOS] + prompt + completion + [EOS]` (no `BOS` when the
  tokenizer's is None). The mask is 1 on the completion and `EOS`, 0 on
  `BOS` and the prompt: an instruction tuned model learns to answer, not to
  ask. For plain text every token but `BOS` counts.

  A `Chat` is its rendering by the tokenizer's chat template, which writes
  its own special tokens: `tokenizer.chat_segments(messages)` cuts the
  rendering into `(text, trained)` pieces, and the mask is 1 on the tokens
  of the assistant's replies.

  Either way the whole text is encoded in one call, as at inference, and a
  token is learned when its characters overlap learned text (so a token
  straddling the prompt's end and the completion's start is learned).

  Args:
    example: the texts, or the conversation.
    tokenizer: has `encode_offsets(text) -> (ids, (start, end) character
      spans)` (adding no special tokens) and the ids `BOS` (or None) and
      `EOS`, like `ByteTokenizer`; for a `Chat` also a `chat_template` that
      is not None and `chat_segments(messages) -> [(text, trained), ...]`.

  Raises:
    ValueError: for a `Chat`, naming its source: the tokenizer has no chat
      template, or rendering the conversation failed.
  """
  if isinstance(example, Chat):
    return _tokenize_chat(example, tokenizer)
  bos = getattr(tokenizer, "BOS", None)
  start = [] if bos is None else [bos]
  ids, mask = _encode_marked(tokenizer, [(example.prompt, False), (example.completion, True)])
  return (np.concatenate([start, ids, [tokenizer.EOS]]).astype(np.int32),
          np.concatenate([[0] * len(start), mask, [1]]).astype(np.int32))


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
  """`read_texts`, `tokenize` and `pack`: rows ready for a `Loader`.

  Raises:
    ValueError: as `read_texts`, `tokenize` and `pack` do, and for rows
      with no token to learn (every example empty, or its trained tokens
      cut off by `seq_len`).
  """
  examples = read_texts(paths, documents=documents)
  rows = pack((tokenize(e, tokenizer) for e in examples), seq_len, packing=packing,
              pad_id=tokenizer.PAD)
  # A row's first token is context only, never predicted (see `pack`).
  if not (rows["loss_mask"][:, 1:] * rows["attention_mask"][:, 1:]).any():
    raise ValueError(f"no usable rows in {_describe(paths)}: the {len(examples)} examples give "
                     f"no token to learn at seq_len={seq_len}")
  return rows


def load_adapter_datasets(paths: Paths, tokenizer: Any, seq_len: int, *, key: str,
                          names: Sequence[str], packing: bool = True
                          ) -> dict[str, dict[str, np.ndarray]]:
  """Rows for several adapters: each row of the data names its adapter in field `key`.

  Each adapter's examples (in file order) are tokenized and packed apart, so a
  row never mixes two adapters' examples: adapter `name` gets the rows that
  `load_dataset` would give for its examples alone.

  Args:
    paths: JSONL or Parquet files, directories of them, or saved datasets
      (as `read_texts`; plain text has no fields).
    tokenizer, seq_len, packing: as for `load_dataset`.
    key: the field naming each row's adapter.
    names: the adapters, in order.

  Returns:
    `{name: rows}` in the order of `names`.

  Raises:
    ValueError: naming the row, for one naming no adapter of `names` or
      lacking `key`; naming the adapter, for one that no row names or whose
      rows give no token to learn; and as `load_dataset`.
  """
  examples: dict[str, list] = {name: [] for name in names}
  for source in sources(paths):
    for name, where, example in read_adapter_rows(source, key):
      if name not in examples:
        raise ValueError(f"{where}: \"{key}\" is {name!r}, not one of the run's adapters "
                         f"({', '.join(names)})")
      examples[name].append(example)
  out = {}
  for name, found in examples.items():
    if not found:
      raise ValueError(f"adapter {name!r} has no rows in {_describe(paths)}: no row's "
                       f"\"{key}\" names it")
    rows = pack((tokenize(e, tokenizer) for e in found), seq_len, packing=packing,
                pad_id=tokenizer.PAD)
    if not (rows["loss_mask"][:, 1:] * rows["attention_mask"][:, 1:]).any():
      raise ValueError(f"adapter {name!r}: its {len(found)} examples in {_describe(paths)} give "
                       f"no token to learn at seq_len={seq_len}")
    out[name] = rows
  return out


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
