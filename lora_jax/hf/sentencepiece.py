"""SentencePiece `tokenizer.model` files converted to `tokenizers` models.

`convert` builds what transformers' `LlamaConverter` builds for
`LlamaTokenizerFast` from the same file, `legacy` and `add_prefix_space`
included. It needs `sentencepiece` and `protobuf` (as transformers does),
imported only when it is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

_SPIECE_UNDERLINE = "\u2581"


def convert(file: Path, *, legacy: bool, add_prefix_space: bool):
  """transformers' LlamaConverter applied to a SentencePiece model.

  Args:
    file: the `tokenizer.model` file.
    legacy: the tokenizer config's `legacy`: spaces become "▁" in a
      normalizer (True) or a Metaspace pre-tokenizer (False).
    add_prefix_space: prepend "▁" to a text (and strip the space it decodes
      to).

  Returns:
    The `tokenizers.Tokenizer`; control pieces are special added tokens,
    user-defined ones plain added tokens.

  Raises:
    ImportError: `sentencepiece` or `protobuf` is not installed.
    ValueError: the file is not a unigram or BPE SentencePiece model.
  """
  try:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
  except ImportError as error:
    raise ImportError(f"{file}: reading a SentencePiece tokenizer needs sentencepiece and "
                      f"protobuf: pip install sentencepiece protobuf ({error})") from None
  from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
  from tokenizers.models import BPE, Unigram
  processor = sentencepiece.SentencePieceProcessor()
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    data = file.read_bytes()
    processor.LoadFromSerializedProto(data)
    proto.ParseFromString(data)
  except Exception as error:  # both libraries raise their own errors
    raise ValueError(f"{file}: not a SentencePiece model ({error})") from None

  pieces = list(proto.pieces)
  vocab = [(processor.id_to_piece(i), 0.0) for i in range(min(3, len(pieces)))]
  vocab += [(piece.piece, piece.score) for piece in pieces[3:]]
  model_type = proto.trainer_spec.model_type
  if model_type == 1:  # unigram
    model = Unigram(vocab, unk_id=0, byte_fallback=True)
  elif model_type == 2:  # bpe
    ranks = {processor.id_to_piece(i): i for i in range(processor.GetPieceSize())}
    model = BPE({piece: i for i, (piece, _) in enumerate(vocab)}, _merges(ranks, vocab),
                unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True,
                dropout=None)
  else:
    raise ValueError(f"{file}: SentencePiece model type {model_type} is not supported "
                     "(only unigram and BPE)")
  backend = Tokenizer(model)
  # Control (3) and user-defined (4) pieces are added tokens; control ones are special.
  backend.add_tokens([AddedToken(piece.piece, normalized=False, special=piece.type == 3)
                      for piece in pieces if piece.type in (3, 4)])
  if legacy:
    steps = [normalizers.Prepend(_SPIECE_UNDERLINE)] if add_prefix_space else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPIECE_UNDERLINE)])
  else:
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPIECE_UNDERLINE, prepend_scheme="first" if add_prefix_space else "never",
        split=False)
  steps = [decoders.Replace(_SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_prefix_space:
    steps.append(decoders.Strip(content=" ", left=1))
  backend.decoder = decoders.Sequence(steps)
  return backend


def _merges(ranks: Mapping[str, int], vocab: list[tuple[str, float]]) -> list[tuple[str, str]]:
  """BPE merges ordered by the merged piece's score, as transformers derives them."""
  merges = []
  for merged, score in dict(vocab).items():
    local = [(merged[:i], merged[i:], score) for i in range(1, len(merged))
             if merged[:i] in ranks and merged[i:] in ranks]
    merges += sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]]))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(left, right) for left, right, _ in merges]
