"""Documents -> packed, batched, checkpointable token streams for a decoder LM (grain, no TensorFlow).

Axis legend: B batch (per process) · L sequence length (seq_len) · T tokens of one document.

The path of one batch:
  source      random-access TFDS records (`builders`), one document each
  shuffle     document order = grain index_shuffle(seed, epoch): a pure function of the seed,
              reshuffled every epoch when repeating
  shard       training: each process owns a block of the global packing streams, so the global
              batch does not depend on the number of processes; evaluation: documents
              [shard_index::shard_count]. Either way processes read disjoint documents.
  tokenize    ids + EOS, lazily per document (`MapDataset.map`: still random access)
  pack        `PackedStreamsIterDataset`: concatenate documents and cut chunks of L + 1 tokens with
              no padding except the very end of a finite pass (weight 0 there)
  batch       {'inputs': int32 [B, L], 'targets': int32 [B, L] (inputs shifted by one),
               'weights': float32 [B, L] (1 = real target, 0 = padding)}
  (data.objective = 'span_corruption', the encoder-decoder's: chunks of the raw length whose corrupted input
   has L = seq_len tokens, each corrupted by `span_corruption` with a PRNG of (seed, chunk index), giving
   {'inputs': int32 [B, L], 'decoder_inputs', 'targets': int32 [B, Lo], 'weights': float32 [B, Lo]})
  prefetch    one background thread keeps a few batches ready

Packing and random access. Concatenate-and-chunk has no random access (where chunk k starts
depends on every earlier document's length), so packing is where the pipeline turns from a
`MapDataset` into an `IterDataset`. Its checkpoint stays small and exact anyway because the
documents below it keep random access: a packed stream's position is (index of its current
document, tokens of it already emitted), and restoring it re-reads one document per stream.
Grain's own packers were considered: `ConcatThenSplitIterDataset` packs the same way but keeps
tuples in its state, which a JSON round trip (grain's checkpoint handler) turns into lists that
no longer compare equal to its empty-slice sentinel, so a restored iterator skips a document
(grain 0.2.18); `FirstFitPackIterDataset` / `BestFitPackIterDataset` place whole documents,
pre-truncated to the row length, and pad the rest of each row.

Why several streams. With one stream, consecutive chunks come from the same document: a stdlib
file averages ~17k bytes, so a 32 x 129 byte batch would hold a quarter of one file. For training
the pipeline runs B independent streams (documents i, i + B, i + 2B, ... of the shuffled order go
to stream i mod B) and row r of every batch continues stream r, the classic language-model batching
of Zaremba et al. 2014 (arXiv:1409.2329): the rows of a batch come from B different documents.
Streams cross epoch boundaries independently, so "epoch" is exact per stream, not per batch. A
finite evaluation pass uses one stream, so only its last batch holds padding.

Several processes. Shards hold different amounts of text, so a finite pass yields a different
number of batches on each process. Evaluation in lockstep (every process must run the same steps)
passes `num_batches`: a finite pass then yields exactly that many, all-padding batches (weight 0)
after its shard runs out.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from moe_jax.data import builders
from moe_jax.data import config as config_lib
from moe_jax.data import span_corruption
from moe_jax.data import tokenizers

PREFETCH_BATCHES = 4  # batches the background thread keeps ready

# Pipelines still open at interpreter exit are closed by atexit, while modules are intact: grain's
# prefetch iterator otherwise closes itself in __del__ during module teardown and prints a traceback.
_OPEN_PIPELINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_pipelines() -> None:
  for pipeline in list(_OPEN_PIPELINES):
    pipeline.close()


class _Pipeline(grain.DatasetIterator):
  """The iterator `create_iterator` returns: grain's, plus a clean close at interpreter exit."""

  def __init__(self, inner: grain.DatasetIterator):
    super().__init__()  # `inner` is not a parent: close() must be able to drop the last reference
    self._inner = inner
    _OPEN_PIPELINES.add(self)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._inner is None:
      raise ValueError("the data iterator is closed")
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return self._inner.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._inner.set_state(state)

  def close(self) -> None:
    inner, self._inner = getattr(self, "_inner", None), None
    if inner is not None:
      inner.close()

  def __str__(self) -> str:
    return f"moe_jax.data pipeline over {self._inner}"


def get_tokenizer(cfg: Any) -> tokenizers.Tokenizer:
  """The tokenizer of `cfg.tokenizer`: 'byte', a Hugging Face tokenizer.json or a SentencePiece .model file."""
  name = config_lib.get_field(cfg, "tokenizer")
  config_lib.check_tokenizer(name)  # ValueError naming data.tokenizer, e.g. for a missing file
  try:
    return tokenizers.tokenizer_from_name(name)
  except ValueError as error:  # a file that is not a SentencePiece model, or one without EOS
    raise ValueError(f"data.tokenizer={name!r}: {error}") from None


def model_vocab_size(cfg: Any) -> int:
  """Ids the model must embed: the tokenizer's, and after them the sentinels of span corruption."""
  sentinels = config_lib.get_field(cfg, "num_sentinels")
  span = config_lib.get_field(cfg, "objective") == "span_corruption"
  return get_tokenizer(cfg).vocab_size + (sentinels if span else 0)


def document_source(cfg: Any, split: str) -> tuple[Any, str]:
  """(random-access source of records, name of the text feature) for `split` of `cfg.dataset`.

  Prepares stdlib/text_dir into the cache on first use; registered datasets must be on disk unless
  `cfg.download`.
  """
  if split not in builders.SPLITS:
    raise ValueError(f"split={split!r} must be one of {builders.SPLITS}")
  dataset = config_lib.get_field(cfg, "dataset")
  data_dir = config_lib.get_field(cfg, "data_dir")
  fraction = config_lib.get_field(cfg, "validation_fraction")
  if dataset == "stdlib":
    builder = builders.prepare(builders.StdlibBuilder, builders.stdlib_config(fraction), data_dir)
    return builder.as_data_source(split=split), "text"
  if dataset == "text_dir":
    files = builders.text_dir_config(
        config_lib.get_field(cfg, "text_dir"), config_lib.get_field(cfg, "text_glob"), fraction)
    builder = builders.prepare(builders.TextDirBuilder, files, data_dir)
    return builder.as_data_source(split=split), "text"
  entry = builders.REGISTERED[dataset]
  source = builders.registered_source(
      dataset, split=split, data_dir=data_dir, download=config_lib.get_field(cfg, "download"))
  return source, entry.text_feature


def _tokenize(record: Mapping[str, Any], *, text_key: str, tokenizer: tokenizers.Tokenizer) -> dict[str, np.ndarray]:
  text = record[text_key]
  if isinstance(text, bytes):  # TFDS Text features come back as UTF-8 bytes
    text = text.decode("utf-8", errors="replace")
  ids = tokenizer.encode(text)  # [T]
  return {"tokens": np.append(ids, np.int32(tokenizer.eos_id)).astype(np.int32)}  # [T + 1]


def tokenized_documents(
    source: Any, *, text_key: str, tokenizer: tokenizers.Tokenizer, seed: int,
    shard_index: int = 0, shard_count: int = 1, repeat: bool = True, streams_per_shard: int = 1,
) -> grain.MapDataset:
  """Random-access documents {'tokens': int32 [T + 1]} (EOS last) of one process, in seed order.

  repeat=True (training): endless epochs of the global order, this process's block of
  `streams_per_shard` packing streams (see `_StreamBlock`). repeat=False: one pass over the
  documents [shard_index::shard_count].
  """
  docs = grain.MapDataset.source(source)
  if len(docs) == 0:
    raise ValueError(f"the source {source} has no documents")
  if repeat:
    # One document order for every process (the shuffle sees epoch = index // len and reseeds, so
    # epochs differ); the process keeps its block of the global packing streams.
    docs = _StreamBlock(docs.shuffle(seed=seed).repeat(), block=streams_per_shard, num_blocks=shard_count,
                        index=shard_index)
  else:
    docs = docs[shard_index::shard_count]
    if len(docs) == 0:
      raise ValueError(
          f"shard_index={shard_index} of shard_count={shard_count} gets no documents: the split has only "
          f"{len(grain.MapDataset.source(source))}")
    docs = docs.shuffle(seed=seed)
  return docs.map(functools.partial(_tokenize, text_key=text_key, tokenizer=tokenizer))


class _StreamBlock(grain.MapDataset):
  """Process `index`'s documents when `block * num_blocks` global streams share one document order.

  Global stream r takes documents r, r + S, r + 2S, ... (S = block * num_blocks); process p owns streams
  [p * block, (p + 1) * block). Its local document k * block + s is global document k * S + p * block + s,
  which the packer (local document i -> local stream i % block) hands to local stream s = global stream
  p * block + s. So the global batch is the same for any number of processes, and multi-process training
  reproduces a single-process run.
  """

  def __init__(self, parent: grain.MapDataset, *, block: int, num_blocks: int, index: int):
    super().__init__(parent)
    self._block, self._num_blocks, self._index = block, num_blocks, index

  def __len__(self) -> int:
    return len(self._parent) // self._num_blocks

  def __getitem__(self, local: int):
    if isinstance(local, slice):
      return self.slice(local)
    round_, stream = divmod(local, self._block)
    return self._parent[(round_ * self._num_blocks + self._index) * self._block + stream]

  def __str__(self) -> str:
    return f"_StreamBlock(block={self._block}, num_blocks={self._num_blocks}, index={self._index})"


# ---------------------------------------------------------------------------------------------
# Packing.


class PackedStreamsIterDataset(grain.IterDataset):
  """Chunks of exactly `length` tokens from `num_streams` concatenate-and-chunk streams.

  Document i of `docs` belongs to stream i % num_streams; the streams take turns, so chunk j comes
  from stream j % num_streams while all streams last (a finite stream that ends drops out of the
  turn). Each element is {'tokens': int32 [length], 'mask': bool [length]}; mask is False only on
  the padding (`pad_id`) that fills a stream's last chunk at the end of a finite `docs`. Once
  every stream has ended: StopIteration, or with `pad_forever` endless all-padding chunks (so that
  a `num_batches` limit yields the same count on every process).
  """

  def __init__(self, docs: grain.MapDataset, *, length: int, num_streams: int, pad_id: int,
               pad_forever: bool = False):
    super().__init__(docs)
    if length < 1 or num_streams < 1:
      raise ValueError(f"length={length} and num_streams={num_streams} must be >= 1")
    self._docs = docs
    self._length = length
    self._num_streams = num_streams
    self._pad_id = pad_id
    self._pad_forever = pad_forever

  def __iter__(self) -> _PackedStreamsIterator:
    return _PackedStreamsIterator(self._docs, length=self._length, num_streams=self._num_streams,
                                  pad_id=self._pad_id, pad_forever=self._pad_forever)

  def __str__(self) -> str:
    return f"PackedStreamsIterDataset(length={self._length}, num_streams={self._num_streams})"


class _PackedStreamsIterator(grain.DatasetIterator):
  """State: per stream, the index of its current document and how many of its tokens are emitted."""

  def __init__(self, docs: grain.MapDataset, *, length: int, num_streams: int, pad_id: int,
               pad_forever: bool):
    super().__init__()
    self._docs = docs
    self._num_docs = len(docs)  # sys.maxsize when repeating
    self._length = length
    self._num_streams = num_streams
    self._pad_id = pad_id
    self._pad_forever = pad_forever
    self._set_positions(doc=list(range(num_streams)), offset=[0] * num_streams, next_stream=0)

  def _set_positions(self, *, doc: list[int], offset: list[int], next_stream: int) -> None:
    self._doc = list(doc)        # index in `docs` of each stream's current document
    self._offset = list(offset)  # tokens of that document already emitted
    self._next_stream = next_stream
    self._tokens: list[np.ndarray | None] = [None] * self._num_streams  # cache of current documents

  def _exhausted(self, stream: int) -> bool:
    return self._doc[stream] >= self._num_docs

  def _chunk(self, stream: int) -> dict[str, np.ndarray]:
    pieces = []
    need = self._length
    while need and not self._exhausted(stream):
      if self._tokens[stream] is None:
        self._tokens[stream] = self._docs[self._doc[stream]]["tokens"]
      tokens = self._tokens[stream]                                # [T + 1]
      start = self._offset[stream]
      piece = tokens[start:start + need]
      pieces.append(piece)
      need -= len(piece)
      if start + len(piece) == len(tokens):  # document done: on to this stream's next one
        self._doc[stream] += self._num_streams
        self._offset[stream] = 0
        self._tokens[stream] = None
      else:
        self._offset[stream] = start + len(piece)
    real = self._length - need
    tokens = np.full((self._length,), self._pad_id, dtype=np.int32)  # [L + 1]
    if pieces:
      tokens[:real] = np.concatenate(pieces)
    mask = np.zeros((self._length,), dtype=bool)
    mask[:real] = True
    return {"tokens": tokens, "mask": mask}

  def __next__(self) -> dict[str, np.ndarray]:
    for _ in range(self._num_streams):
      stream = self._next_stream
      self._next_stream = (stream + 1) % self._num_streams
      if not self._exhausted(stream):
        return self._chunk(stream)
    if self._pad_forever:
      return self._chunk(0)  # stream 0 is exhausted too: all padding
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    # Plain ints and lists: survives grain's JSON checkpoint handler unchanged.
    return {"doc": list(self._doc), "offset": list(self._offset), "next_stream": self._next_stream}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if len(state["doc"]) != self._num_streams:
      raise ValueError(
          f"the iterator state has {len(state['doc'])} packing streams but this iterator has "
          f"{self._num_streams}: restore with the batch_size (training) the state was saved with")
    self._set_positions(doc=[int(d) for d in state["doc"]], offset=[int(o) for o in state["offset"]],
                        next_stream=int(state["next_stream"]))

  def __str__(self) -> str:
    return f"PackedStreamsIterator(length={self._length}, num_streams={self._num_streams})"


def _to_model_batch(chunks: Mapping[str, np.ndarray], *, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Chunks {'tokens', 'mask'} [b, L + 1] (b <= B at the end of a finite pass) -> the model's batch."""
  tokens, mask = chunks["tokens"], chunks["mask"]  # [b, L + 1]
  if len(tokens) < batch_size:  # last batch of a finite pass: keep shapes static for jit
    missing = batch_size - len(tokens)
    tokens = np.concatenate([tokens, np.full((missing, tokens.shape[1]), pad_id, np.int32)])
    mask = np.concatenate([mask, np.zeros((missing, mask.shape[1]), bool)])
  return {
      "inputs": tokens[:, :-1],                                  # [B, L]
      "targets": tokens[:, 1:],                                  # [B, L]
      "weights": mask[:, 1:].astype(np.float32),                 # [B, L]
  }


def _span_corrupt(chunk: Mapping[str, np.ndarray], rng: np.random.Generator, *, lengths: span_corruption.Lengths,
                  noise_density: float, mean_noise_span_length: float, sentinels: np.ndarray, eos_id: int,
                  pad_id: int) -> dict[str, np.ndarray]:
  """One packed chunk {'tokens', 'mask'} [L] -> an encoder-decoder example, padded to the fixed lengths.

  Only the chunk's real tokens are corrupted (a finite pass ends with a shorter chunk, giving shorter outputs);
  the decoder reads the targets shifted right after a start id, which is `pad_id` as in T5. Padding carries
  weight 0; the encoder masks padded inputs by their id.
  """
  tokens = chunk["tokens"][chunk["mask"]]  # [T <= L]
  inputs = np.full((lengths.inputs,), pad_id, np.int32)  # [Li]
  targets = np.full((lengths.targets,), pad_id, np.int32)  # [Lo]
  if len(tokens) >= 2:
    noise = span_corruption.random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    corrupted, wanted = span_corruption.corrupt(tokens, noise, sentinels, eos_id)
  elif len(tokens) == 1:  # nothing to mask: the token alone, and an empty answer
    corrupted, wanted = np.append(tokens, eos_id), np.asarray([eos_id], np.int32)
  else:
    corrupted = wanted = np.zeros((0,), np.int32)
  inputs[:len(corrupted)] = corrupted
  targets[:len(wanted)] = wanted
  weights = np.zeros((lengths.targets,), np.float32)
  weights[:len(wanted)] = 1.0
  return {"inputs": inputs, "decoder_inputs": np.concatenate([[pad_id], targets[:-1]]).astype(np.int32),
          "targets": targets, "weights": weights}


def _pad_rows(batch: Mapping[str, np.ndarray], *, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """The last batch of a finite pass (b < B rows) padded to B rows of weight 0, to keep shapes static."""
  missing = batch_size - len(batch["weights"])
  return {k: np.concatenate([v, np.full((missing, *v.shape[1:]), 0 if k == "weights" else pad_id, v.dtype)])
          for k, v in batch.items()}


def create_iterator(
    cfg: Any, *, split: str, batch_size: int, seq_len: int, seed: int,
    shard_index: int = 0, shard_count: int = 1, repeat: bool = True,
    num_batches: int | None = None,
) -> grain.DatasetIterator:
  """Batches {'inputs', 'targets': int32 [B, L], 'weights': float32 [B, L]} of this process's shard.

  Args:
    cfg: the data config (`default_data_config` fields).
    split: 'train' or 'validation'.
    batch_size: rows per batch in this process (B).
    seq_len: L; each row is a packed chunk of L + 1 tokens, inputs = chunk[:-1], targets = chunk[1:]. Span
      corruption: the encoder input length; each row is a chunk of `span_corruption.lengths(L, ...).raw` tokens.
    seed: document order (and each epoch's reshuffle), in [0, 2**32).
    shard_index, shard_count: this process's part: rows [shard_index * B, (shard_index + 1) * B) of
      the global training batch of shard_count * B rows; documents [shard_index::shard_count] of an
      evaluation pass.
    repeat: True: endless epochs with B packing streams (training). False: one pass with one stream;
      its last batch is padded to B rows with weight 0 (evaluation).
    num_batches: exactly this many batches; a finite pass that runs out first continues with
      all-padding batches (weight 0), so processes with unequal shards stay in lockstep. None: endless
      (repeat) or until the pass ends.

  Returns:
    A grain DatasetIterator; `get_state()` / `set_state()` resume exactly (JSON-safe state).
  """
  data = config_lib.validate_data_config(cfg)
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32)")
  if num_batches is not None and num_batches < 1:
    raise ValueError(f"num_batches={num_batches} must be None or >= 1")

  tokenizer = get_tokenizer(cfg)
  source, text_key = document_source(cfg, split)
  docs = tokenized_documents(source, text_key=text_key, tokenizer=tokenizer, seed=seed,
                             shard_index=shard_index, shard_count=shard_count, repeat=repeat,
                             streams_per_shard=batch_size)
  span = data.objective == "span_corruption"
  if span:
    lengths = span_corruption.lengths(seq_len, data.noise_density, data.mean_noise_span_length)
  ds = PackedStreamsIterDataset(docs, length=lengths.raw if span else seq_len + 1,
                                num_streams=batch_size if repeat else 1, pad_id=tokenizer.pad_id,
                                pad_forever=num_batches is not None)
  if span:
    corrupt = functools.partial(
        _span_corrupt, lengths=lengths, noise_density=data.noise_density,
        mean_noise_span_length=data.mean_noise_span_length, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        sentinels=span_corruption.sentinel_ids(tokenizer.vocab_size, data.num_sentinels))
    # Each chunk's mask is drawn from (seed, the chunk's index in the global order), grain checkpointing the local
    # index: a training chunk's global index is its row of the global batch and its round, so every process count
    # draws the same masks for the same chunks (as it packs the same chunks, `_StreamBlock`).
    def global_index(local: int) -> int:
      if not repeat:
        return local * shard_count + shard_index
      round_, stream = divmod(local, batch_size)
      return round_ * batch_size * shard_count + shard_index * batch_size + stream

    ds = ds.map_with_index(lambda local, chunk: corrupt(chunk, np.random.default_rng([seed, global_index(local)])))
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(functools.partial(_pad_rows, batch_size=batch_size, pad_id=tokenizer.pad_id))
  else:
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(functools.partial(_to_model_batch, batch_size=batch_size, pad_id=tokenizer.pad_id))
  if num_batches is not None:
    ds = grain.experimental.LimitIterDataset(ds, num_batches)
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES)
  return _Pipeline(iter(ds))

