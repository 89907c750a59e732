"""Text <-> token ids: a byte-level tokenizer (the default), SentencePiece models, and Hugging Face tokenizer.json
files (the `tokenizers` package; what an imported checkpoint brings, moe_jax.interop).

All satisfy the small `Tokenizer` protocol the pipeline needs: `encode(str) -> int32 [T]`,
`decode(ids) -> str`, and the three ids that shape the model and the loss (`vocab_size`, `pad_id`,
`eos_id`).

Id layout shared by both (the T5 / ByT5 convention, Xue et al. 2022, arXiv:2105.13626):
  0          pad: filler after the end of a finite stream; always carries loss weight 0
  1          eos: appended to every document, so it doubles as the document separator (and BOS)
  2          unk: never produced by the byte tokenizer (every byte has an id); SentencePiece's <unk>
  3 .. 258   byte b -> id b + 3                            (byte tokenizer: vocab_size = 259)
  3 .. V-1   learned pieces, and the 256 byte-fallback pieces (SentencePiece models we train)
  V .. V+N-1 span corruption only (data.objective='span_corruption'): N = data.num_sentinels sentinel ids appended
             after either vocabulary, T5's extra ids, sentinel k = V + N - 1 - k (`span_corruption`); the
             tokenizer never produces them, the model's vocabulary is V + N (byte tokenizer: 259 + 100 = 359)

A SentencePiece model or a tokenizer.json trained elsewhere may use another layout (its default is unk=0, bos=1,
eos=2, no pad); `SentencePieceTokenizer` then reports the model's own ids, and pad_id falls back
to 0, which is harmless because padded positions carry weight 0.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3  # id of byte 0x00; ids below are the specials above


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline and the model need from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Number of ids, specials included: the embedding table has this many rows."""
    ...

  @property
  def pad_id(self) -> int:
    ...

  @property
  def eos_id(self) -> int:
    ...

  def encode(self, text: str) -> np.ndarray:
    """int32 [T] ids of `text`, with no EOS appended (the pipeline appends it)."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special ids (pad, eos, unk) are dropped."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: no training, no file, lossless for any text.

  Byte b has id b + 3; ids 0, 1, 2 are pad, eos, unk (see the module docstring). The vocabulary
  is tiny (259), at the price of sequences several times longer than a learned vocabulary gives.
  """

  vocab_size = BYTE_OFFSET + 256
  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def encode(self, text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)  # [T]
    return data.astype(np.int32) + BYTE_OFFSET

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= BYTE_OFFSET) & (ids < self.vocab_size)]
    # A chunk boundary can cut a multi-byte character; "replace" keeps decode total.
    return (ids - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


class SentencePieceTokenizer:
  """A trained SentencePiece model (Kudo & Richardson 2018, arXiv:1808.06226), loaded by path."""

  def __init__(self, model_path: str | os.PathLike[str]):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist")
    self.model_path = model_path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as error:  # not a SentencePiece ModelProto
      raise ValueError(f"{model_path!r} is not a SentencePiece .model file ({' '.join(str(error).split())})") from None
    if self._sp.eos_id() < 0:
      raise ValueError(
          f"SentencePiece model {model_path!r} defines no EOS piece (eos_id=-1); the pipeline needs one to "
          "separate documents. Train with eos_id set (experiments/train_tokenizer.py does).")

  @property
  def vocab_size(self) -> int:
    return int(self._sp.vocab_size())

  @property
  def pad_id(self) -> int:
    pad = int(self._sp.pad_id())
    return pad if pad >= 0 else 0

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)  # [T]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._sp.decode(ids.tolist())

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` package: BPE, WordPiece, Unigram, WordLevel), loaded by
  path, offline. Its special tokens come from the `tokenizer_config.json` beside it (`eos_token`, `pad_token`,
  as transformers writes them: a string or {"content": ...}); EOS is required, pad falls back to 0 (padded
  positions carry no loss). No special token is added by `encode` (the pipeline appends EOS itself)."""

  def __init__(self, path: str | os.PathLike[str]):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer.json {path!r} does not exist")
    self.path = path
    try:
      self._tokenizer = _Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises its own Exception type for a malformed file
      raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json ({' '.join(str(error).split())})") from None
    settings_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    settings = {}
    if os.path.isfile(settings_path):
      with open(settings_path) as f:
        settings = json.load(f)
    eos, pad = self._special(settings, "eos_token"), self._special(settings, "pad_token")
    if eos is None:
      raise ValueError(f"{path!r} has no EOS token: {settings_path} must name one (eos_token) in its vocabulary; "
                       "the pipeline needs one to separate documents")
    self._eos, self._pad = eos, 0 if pad is None else pad

  def _special(self, settings: dict, key: str) -> int | None:
    token = settings.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return None if token is None else self._tokenizer.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return self._eos

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)  # [T]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HuggingFaceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def tokenizer_from_name(name: str) -> Tokenizer:
  """'byte' -> ByteTokenizer(); a path ending in .json -> HuggingFaceTokenizer (a tokenizer.json); any other
  path is a SentencePiece .model file."""
  if name == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(name)
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path)
  return SentencePieceTokenizer(path)


def train_sentencepiece(
    sentences: Iterable[str],
    *,
    model_path: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `sentences` and writes it to `model_path` (a .model file).

  Settings chosen for code as much as prose, and so that decode(encode(text)) == text:
    * identity normalisation and no whitespace folding: indentation is syntax in Python;
    * byte fallback: any character missing from the vocabulary becomes its UTF-8 bytes, not <unk>;
    * "\\n" as a user-defined piece: training sentences are lines, so newlines would otherwise
      only ever be byte-fallback tokens;
    * the id layout of the byte tokenizer: pad=0, eos=1, unk=2, no bos (EOS separates documents).
  `max_sentences` caps how many sentences SentencePiece samples (its `input_sentence_size`); it
  also draws at most 10x that many from `sentences`, so an endless iterator is fine.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  model_path = os.fspath(model_path)
  if not model_path.endswith(".model"):
    raise ValueError(f"model_path={model_path!r} must end with '.model'")
  min_vocab = BYTE_OFFSET + 256 + 1  # specials + byte-fallback pieces + "\n"
  if vocab_size <= min_vocab:
    raise ValueError(f"vocab_size={vocab_size} must be > {min_vocab} (3 specials, 256 byte pieces, newline)")

  def capped(limit: int) -> Iterable[str]:
    for i, sentence in enumerate(sentences):
      if i >= limit:
        return
      yield sentence

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(capped(10 * max_sentences)),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      byte_fallback=True,
      user_defined_symbols=["\n"],
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      character_coverage=character_coverage,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      max_sentence_length=1 << 16,
      num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with open(model_path, "wb") as f:
    f.write(model.getvalue())
  return SentencePieceTokenizer(model_path)
