"""The tokenizer of a Hugging Face checkpoint directory, as transformers builds it.

`load_tokenizer(directory)` reads what `transformers.AutoTokenizer` reads and
gives the same ids, text and chat renderings, with numpy at the interface and
no transformers, torch or jax import:

- `tokenizer.json`, through the `tokenizers` library, with the changes
  transformers makes when it loads one: special tokens named in the config
  files are added, or marked special, as there; `add_prefix_space` from the
  config replaces a top-level pre-tokenizer's own; Llama-family classes
  (`LlamaTokenizerFast` and the like) add BOS/EOS by `add_bos_token` /
  `add_eos_token`, other classes (`PreTrainedTokenizerFast`, Qwen's) by what
  the file's post-processor adds;
- otherwise a SentencePiece `tokenizer.model`, converted as
  `lora_jax.hf.sentencepiece` converts it for `LlamaTokenizerFast`.

Special tokens come from `tokenizer_config.json` and `special_tokens_map.json`
(the latter counts only where the config has no `added_tokens_decoder`, as in
transformers), the chat template from `chat_template.jinja` or the config's
`chat_template` (rendered by `lora_jax.hf.chat`), extra stop ids from
`generation_config.json`.

With `auto = AutoTokenizer.from_pretrained(directory)`:
`encode(text, bos=True, eos=adds_eos)` equals `auto.encode(text)`,
`encode(text)` equals `auto.encode(text, add_special_tokens=False)`,
`decode(ids)` equals `auto.decode(ids, skip_special_tokens=True)` and
`render_chat(messages, add_generation_prompt=g)` equals
`auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=g)`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax import formats
from lora_jax.hf import chat, sentencepiece

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
_ADDITIONAL = "additional_special_tokens"
# Classes whose transformers implementation rebuilds the post-processor from
# add_bos_token / add_eos_token: their defaults for the two flags.
_FLAG_CLASSES = {"LlamaTokenizer": (True, False), "CodeLlamaTokenizer": (True, False),
                 "GemmaTokenizer": (True, False), "CohereTokenizer": (True, False),
                 "GPTNeoXTokenizer": (False, False)}
# LlamaTokenizer's special tokens where the files name none.
_LLAMA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def load_tokenizer(directory: str | Path) -> HFTokenizer:
  """Reads the tokenizer of a Hugging Face checkpoint directory.

  Args:
    directory: a directory with `tokenizer.json` or `tokenizer.model`, and
      usually `tokenizer_config.json`.

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: the directory, or both tokenizer files, are missing.
    ValueError: a config file is malformed or names tokens the vocabulary
      cannot hold.
    ImportError: a `tokenizer.model` checkpoint without `sentencepiece` or
      `protobuf` installed.
  """
  return HFTokenizer(directory)


class HFTokenizer:
  """The tokenizer of one checkpoint directory; see the module docstring.

  Attributes:
    BOS: the id `encode(..., bos=True)` prepends; None where the checkpoint's
      tokenizer adds no BOS (e.g. Qwen).
    EOS: the eos token's id, appended by `encode(..., eos=True)`.
    PAD: the pad token's id, or EOS where there is none (only fills masked
      padding).
    vocab_size: how many ids the tokenizer can produce: the largest id + 1,
      added tokens included.
    stop_ids: ids that end generation: EOS and `generation_config.json`'s
      `eos_token_id`, sorted, without repeats.
    adds_eos: whether the checkpoint's tokenizer appends EOS when it adds
      special tokens (`add_eos_token`), so `encode(text, bos=True,
      eos=adds_eos)` is what `AutoTokenizer` gives.
    chat_template: the Jinja chat template, or None.
    name: the directory, for messages.
  """

  def __init__(self, directory: str | Path):
    path = Path(directory)
    self.name = str(directory)
    if not path.is_dir():
      raise FileNotFoundError(f"{self.name}: no such checkpoint directory")
    config = _read_json(path / TOKENIZER_CONFIG, required=False)
    class_name = config.get("tokenizer_class")
    if class_name is not None and not isinstance(class_name, str):
      raise ValueError(f"{path / TOKENIZER_CONFIG}: tokenizer_class must be a string, "
                       f"not {class_name!r}")
    family = class_name.removesuffix("Fast") if class_name else None

    if (path / TOKENIZER_JSON).is_file():
      backend = _tokenizer_json(path / TOKENIZER_JSON, config)
      defaults = _LLAMA_DEFAULTS if family == "LlamaTokenizer" else {}
    elif (path / SENTENCEPIECE_MODEL).is_file():
      if family not in (None, "LlamaTokenizer"):
        raise ValueError(f"{path / TOKENIZER_CONFIG}: tokenizer_class {class_name!r} with only "
                         f"{SENTENCEPIECE_MODEL} is not supported; a SentencePiece model is read "
                         "as transformers' LlamaTokenizerFast reads it")
      backend = _sentencepiece(path / SENTENCEPIECE_MODEL, config)
      family, defaults = "LlamaTokenizer", _LLAMA_DEFAULTS
    else:
      raise FileNotFoundError(f"{self.name}: no tokenizer: looked for {TOKENIZER_JSON} and "
                              f"{SENTENCEPIECE_MODEL}")

    self._special = _special_tokens(path, config, defaults)
    _add_config_tokens(backend, path / TOKENIZER_CONFIG, config, self._special)
    split = config.get("split_special_tokens", False)
    if not isinstance(split, bool):
      raise ValueError(f"{path / TOKENIZER_CONFIG}: split_special_tokens must be true or false")
    backend.encode_special_tokens = split
    backend.no_truncation()
    backend.no_padding()
    self._backend = backend

    def token_id(key: str) -> int | None:
      content = self._special.get(key)
      if content is None:
        return None
      index = backend.token_to_id(_content(content))
      if index is None:
        raise ValueError(f"{self.name}: {key} {_content(content)!r} is not in the vocabulary")
      return index

    eos = token_id("eos_token")
    if eos is None:
      raise ValueError(f"{self.name}: no eos_token in {TOKENIZER_CONFIG} or {SPECIAL_TOKENS_MAP}")
    self.EOS: int = eos
    pad = token_id("pad_token")
    self.PAD: int = eos if pad is None else pad
    bos = token_id("bos_token")
    if family in _FLAG_CLASSES:
      add_bos, add_eos = (_flag(config, key, default, path / TOKENIZER_CONFIG)
                          for key, default in zip(("add_bos_token", "add_eos_token"),
                                                  _FLAG_CLASSES[family]))
      if add_bos and bos is None:
        raise ValueError(f"{path / TOKENIZER_CONFIG}: add_bos_token is true but there is no "
                         "bos_token")
      self.BOS: int | None = bos if add_bos else None
      self.adds_eos: bool = add_eos
    else:
      self.BOS, self.adds_eos = _post_processor_tokens(backend, eos, path / TOKENIZER_JSON)
    self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    self.stop_ids: tuple[int, ...] = tuple(sorted({eos, *_generation_eos(path)}))
    self.chat_template: str | None = _chat_template(path, config)
    cleanup = config.get("clean_up_tokenization_spaces", False)
    if not isinstance(cleanup, bool):
      raise ValueError(f"{path / TOKENIZER_CONFIG}: clean_up_tokenization_spaces must be true "
                       "or false")
    self._clean_up = cleanup

  def __repr__(self) -> str:
    return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Token ids of `text`; special tokens written in it become their ids.

    Args:
      text: the text.
      bos: prepend BOS (nothing where the tokenizer adds none).
      eos: append EOS.

    Returns:
      An int32 vector.
    """
    if not isinstance(text, str):
      raise ValueError(f"{self.name}: encode takes a string, not {type(text).__name__}")
    ids = self._backend.encode(text, add_special_tokens=False).ids
    if bos and self.BOS is not None:
      ids = [self.BOS, *ids]
    if eos:
      ids = [*ids, self.EOS]
    return np.asarray(ids, np.int32)

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`encode(text)` and each id's `(start, end)` character span in `text`."""
    if not isinstance(text, str):
      raise ValueError(f"{self.name}: encode takes a string, not {type(text).__name__}")
    encoding = self._backend.encode(text, add_special_tokens=False)
    return (np.asarray(encoding.ids, np.int32),
            np.asarray(encoding.offsets, np.int64).reshape(-1, 2))

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of token ids, special tokens left out.

    Args:
      ids: a sequence or vector of ids in [0, vocab_size).

    Returns:
      The text.
    """
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
      raise ValueError(f"{self.name}: decode takes a vector of integer ids, got shape "
                       f"{array.shape} of {array.dtype}")
    bad = array[(array < 0) | (array >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"{self.name}: token id {int(bad[0])} is outside [0, {self.vocab_size})")
    text = self._backend.decode(array.tolist(), skip_special_tokens=True)
    return _clean_up_tokenization(text) if self._clean_up else text

  def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  add_generation_prompt: bool = False) -> str:
    """The conversation as the checkpoint's chat template writes it.

    Equal to `apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)` of transformers.

    Args:
      messages: dicts with string `role` and `content`.
      add_generation_prompt: end with the header of an assistant reply.

    Returns:
      The rendered text (with the template's own BOS, where it writes one).
    """
    formats.check_messages(messages, self.name)  # reported before a missing template
    return chat.render(self._template(), messages, add_generation_prompt=add_generation_prompt,
                       special_tokens=self._special_strings(), name=self.name)

  def chat_segments(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """`render_chat(messages)` cut into pieces, each marked True if trained on.

    A True piece is what the template writes for an assistant message after
    its header (the generation prompt): the reply and the end-of-turn marker.
    The pieces join to exactly `render_chat(messages)`.

    Args:
      messages: dicts with string `role` and `content`.

    Returns:
      (text, is_assistant_reply) pairs, none of them empty.

    Raises:
      ValueError: malformed messages, or a template that does not render a
        conversation as the extension of its beginning (it rewrites earlier
        turns), so the replies cannot be located.
    """
    formats.check_messages(messages, self.name)  # reported before a missing template
    return chat.segments(self._template(), messages, special_tokens=self._special_strings(),
                         name=self.name)

  def _template(self) -> str:
    if self.chat_template is None:
      raise ValueError(f"{self.name}: has no chat_template (neither {CHAT_TEMPLATE_FILE} nor "
                       f"{TOKENIZER_CONFIG}'s chat_template)")
    _require("jinja2", f"{self.name}: rendering the chat template")
    return self.chat_template

  def _special_strings(self) -> dict[str, str | list[str]]:
    # additional_special_tokens is a list of tokens; the others are one token each.
    return {key: [_content(v) for v in value] if isinstance(value, list) else _content(value)
            for key, value in self._special.items()}


# --- files -------------------------------------------------------------------


def _read_json(path: Path, *, required: bool = True) -> dict:
  if not path.is_file():
    if required:
      raise FileNotFoundError(f"{path}: no such file")
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _flag(config: Mapping, key: str, default: bool, where: Path) -> bool:
  value = config.get(key, default)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise ValueError(f"{where}: {key} must be true or false, not {value!r}")
  return value


def _content(token: str | dict) -> str:
  return token if isinstance(token, str) else token["content"]


def _token(value: Any, key: str, where: Path) -> str | dict | None:
  """A special token as the files write it: a string or an AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value
  raise ValueError(f"{where}: {key} must be a string or an object with a string \"content\", "
                   f"not {value!r}")


def _special_tokens(path: Path, config: Mapping, defaults: Mapping) -> dict:
  """Special tokens by key (`bos_token`, ..., `additional_special_tokens`)."""
  values: dict[str, Any] = dict(defaults)
  sources = [(path / TOKENIZER_CONFIG, config)]
  if "added_tokens_decoder" not in config:  # transformers reads the map only then
    sources.append((path / SPECIAL_TOKENS_MAP, _read_json(path / SPECIAL_TOKENS_MAP,
                                                          required=False)))
  for where, source in sources:
    for key in _SPECIAL_KEYS:
      if key in source:
        values[key] = _token(source[key], key, where)
    if source.get(_ADDITIONAL) is not None:
      extra = source[_ADDITIONAL]
      if not isinstance(extra, list):
        raise ValueError(f"{where}: {_ADDITIONAL} must be a list")
      previous = values.get(_ADDITIONAL, []) if where.name == SPECIAL_TOKENS_MAP else []
      tokens = [_token(token, _ADDITIONAL, where) for token in extra]
      values[_ADDITIONAL] = previous + [t for t in tokens if t not in previous]
  return {key: value for key, value in values.items() if value}


def _added_token(value: str | dict, special: bool):
  from tokenizers import AddedToken
  if isinstance(value, str):
    return AddedToken(value, special=special)
  flags = {key: value[key] for key in _ADDED_TOKEN_FLAGS if key in value}
  flags["special"] = bool(flags.get("special", False)) or special
  return AddedToken(value["content"], **flags)


def _add_config_tokens(backend, where: Path, config: Mapping, special: Mapping) -> None:
  """Adds the config's added tokens and the special tokens, as transformers does.

  The config's `added_tokens_decoder` (else the backend's own added tokens)
  describes tokens; a special token named by a string takes that description,
  and is marked special. One it does not describe is added only if missing.
  """
  decoder = config.get("added_tokens_decoder")
  if decoder is not None and not isinstance(decoder, dict):
    raise ValueError(f"{where}: added_tokens_decoder must be an object of id: token")
  special_strings = {_content(t) for key, value in special.items()
                     for t in (value if key == _ADDITIONAL else [value])}
  to_add, described = [], {}
  for index, value in sorted((decoder or {}).items(), key=lambda item: _index(item[0], where)):
    token = _token(value, f"added_tokens_decoder[{index}]", where)
    token = {"content": token} if isinstance(token, str) else token
    described[token["content"]] = token
    to_add.append(_added_token(token, token["content"] in special_strings))
  present = {token.content for token in backend.get_added_tokens_decoder().values()}
  if decoder is None:
    described = {token.content: {key: getattr(token, key) for key in ("content",
                                                                       *_ADDED_TOKEN_FLAGS)}
                 for token in backend.get_added_tokens_decoder().values()}
  present |= set(described)
  for key, value in special.items():
    for token in value if key == _ADDITIONAL else [value]:
      if isinstance(token, str) and token in described:
        token = described[token]
      if isinstance(token, dict) or token not in present:
        to_add.append(_added_token(token, True))
        present.add(_content(token))
  if to_add:
    backend.add_tokens(to_add)


def _index(key: str, where: Path) -> int:
  try:
    return int(key)
  except ValueError:
    raise ValueError(f"{where}: added_tokens_decoder key {key!r} is not an id") from None


def _generation_eos(path: Path) -> list[int]:
  config = _read_json(path / GENERATION_CONFIG, required=False)
  value = config.get("eos_token_id")
  values = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise ValueError(f"{path / GENERATION_CONFIG}: eos_token_id must be an id or a list of ids, "
                     f"not {value!r}")
  return values


def _chat_template(path: Path, config: Mapping) -> str | None:
  if (path / CHAT_TEMPLATE_FILE).is_file():  # takes priority, as in transformers
    return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
  value = config.get("chat_template")
  if value is None or isinstance(value, str):
    return value
  where = path / TOKENIZER_CONFIG
  if isinstance(value, list) and all(isinstance(t, dict) for t in value):
    named = {t.get("name"): t.get("template") for t in value}
    if isinstance(named.get("default"), str):
      return named["default"]
    raise ValueError(f"{where}: chat_template lists templates {sorted(map(str, named))} "
                     "but none named 'default' (a string)")
  raise ValueError(f"{where}: chat_template must be a string or a list of {{name, template}}")


# --- backends ----------------------------------------------------------------


def _require(module: str, what: str) -> None:
  try:
    importlib.import_module(module)
  except ImportError as error:
    raise ImportError(f"{what} needs the {module} library: pip install {module} "
                      f"({error})") from None


def _tokenizer_json(file: Path, config: Mapping):
  _require("tokenizers", f"reading {file}")
  from tokenizers import Tokenizer
  try:
    state = json.loads(file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{file}: not valid JSON ({error})") from None
  # transformers sets a top-level pre-tokenizer's add_prefix_space to the config's (default
  # False); an explicit null fails there and leaves the file's.
  prefix = config.get("add_prefix_space", False)
  if prefix is not None and not isinstance(prefix, bool):
    raise ValueError(f"{file.parent / TOKENIZER_CONFIG}: add_prefix_space must be true, false or "
                     f"null, not {prefix!r}")
  pre = state.get("pre_tokenizer") if isinstance(state, dict) else None
  if isinstance(pre, dict) and "add_prefix_space" in pre and prefix is not None:
    pre["add_prefix_space"] = prefix
  try:
    return Tokenizer.from_str(json.dumps(state))
  except Exception as error:  # the tokenizers library raises plain Exceptions
    raise ValueError(f"{file}: not a tokenizers file ({error})") from None


def _post_processor_tokens(backend, eos: int, file: Path) -> tuple[int | None, bool]:
  """(BOS, adds EOS) read from what the post-processor adds around a text."""
  plain = backend.encode("a", add_special_tokens=False).ids
  full = backend.encode("a", add_special_tokens=True).ids
  for start in range(len(full) - len(plain) + 1):
    if full[start:start + len(plain)] == plain:
      prefix, suffix = full[:start], full[start + len(plain):]
      if len(prefix) <= 1 and suffix in ([], [eos]):
        return (prefix[0] if prefix else None), bool(suffix)
      break
  raise ValueError(f"{file}: the post_processor adds {full} around {plain}, not at most a BOS "
                   "before and EOS after")


def _sentencepiece(file: Path, config: Mapping):
  """The SentencePiece model converted with the config's `legacy` and `add_prefix_space`."""
  _require("tokenizers", f"reading {file}")
  legacy = _flag(config, "legacy", True, file.parent / TOKENIZER_CONFIG)
  # An explicit null turns the prefix off: transformers tests the value's truth.
  prefix = config.get("add_prefix_space", True)
  if prefix is not None and not isinstance(prefix, bool):
    raise ValueError(f"{file.parent / TOKENIZER_CONFIG}: add_prefix_space must be true, false or "
                     f"null, not {prefix!r}")
  return sentencepiece.convert(file, legacy=legacy, add_prefix_space=bool(prefix))


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization`: no space before punctuation and contractions."""
  for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                        (" 're", "'re")):
    text = text.replace(before, after)
  return text
