"""A fixed, fingerprinted evaluation set and its scoring with intervals over the text (issue 35 item 2).

Axis legend: N rows of the set · B rows per batch · L sequence length (seq_len) · D documents · T tokens of one
document · R bootstrap resamples.

Why not the training pipeline's validation batches. `create_iterator(split='validation')` packs the documents of a
seeded order into one stream and the trainer scores its first `train.eval_batches` batches: a few long files fill
them (issue 35: 14 of 38 files, two of them 54% of the text), and a row may hold the end of one document and the
start of the next, so no per-document loss exists to resample. This set is built instead by a rule over every
validation document (results/SCALING.md, "Evaluation set"):

  * every document enters (stratified by file: a stdlib or text_dir document is one file);
  * its targets are its tokens and its EOS (with the byte tokenizer, its bytes plus one). A document with at most
    `cap_tokens` targets enters whole; a longer one enters as one contiguous window of `cap_tokens` targets at an
    offset drawn from sha256(seed, name): a function of the document alone, so adding or removing other documents
    moves no window, and no training seed is involved;
  * each document is scored from its own rows: row k of a document holds its targets [k L, (k + 1) L) and the
    token before each as input (EOS before a window that starts the document, the preceding token otherwise), so
    no row mixes two documents and, for a dense model, a document's loss depends on its own text and the model
    alone; the last row of a document is padded (document id -1, weight 0). Padding costs under L tokens per
    document. (A capacity-limited MoE routes each batch as a group, so its tokens compete for expert slots with
    the other rows of their batch: its scores depend on the batch size too, which `EvalResult` records; rows are
    always scored in the set's order.)
  * the set must hold at least `min_tokens` targets (ValueError otherwise, naming what would give enough).

Fingerprint: sha256 of the canonical JSON of the parameters and, per document in name order, (name, offset,
length, sha256 of the int32 little-endian tokens of its rows' content: the context token and the targets). The rows
are a function of that content and seq_len, so equal fingerprints mean the same rows; two runs that record the same
fingerprint were scored on the same text. `EvalSet.manifest()` is that JSON, to record next to a run.

Scoring: `evaluate_documents(forward_fn, eval_set)` sums per-token losses per document and reports the token-weighted
mean (nats per token), bits per byte, and the bootstrap interval over documents (`stats.document_bootstrap`);
`compare_documents` gives the paired interval of two runs scored on the same set.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax import fileio
from moe_jax import models
from moe_jax import stats
from moe_jax.data import builders
from moe_jax.data import config as data_config
from moe_jax.data import pipeline
from moe_jax.data import tokenizers

EVAL_SET_SEED = 0  # the window offsets: fixed, never the training seed
# results/SCALING.md: every validation file capped at 32,768 bytes, at least 1M bytes in all.
DEFAULT_CAP_TOKENS = 32_768
DEFAULT_MIN_TOKENS = 1_000_000
FINGERPRINT_VERSION = 1  # bump when the rule above changes, so that old and new fingerprints never collide


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSet:
  """The rows of a fixed evaluation set and the per-document bookkeeping to score them (module docstring)."""

  inputs: np.ndarray    # int32 [N, L]
  targets: np.ndarray   # int32 [N, L]
  document: np.ndarray  # int32 [N, L]: index into `names` of each target's document; -1 on padding
  names: tuple[str, ...]  # [D], sorted
  offsets: np.ndarray   # int64 [D]: index of the document's first target in its targets (tokens + EOS)
  lengths: np.ndarray   # int64 [D]: targets of each document in the set, min(T + 1, cap_tokens) >= 1
  document_bytes: np.ndarray  # int64 [D]: UTF-8 bytes those targets stand for, an EOS counted as one byte
  parameters: Mapping[str, Any]  # seq_len, cap_tokens, min_tokens, seed, tokenizer, version
  document_hashes: tuple[str, ...]  # [D]: sha256 of each document's row content (context token + targets)
  fingerprint: str

  @property
  def weights(self) -> np.ndarray:
    """float32 [N, L]: 1 on a real target, 0 on padding."""
    return (self.document >= 0).astype(np.float32)

  @property
  def num_tokens(self) -> int:
    return int(np.sum(self.lengths))

  def manifest(self) -> dict[str, Any]:
    """The JSON-safe record the fingerprint is the sha256 of (`_fingerprint`), plus the fingerprint."""
    return {**_manifest(self.parameters, self.names, self.offsets, self.lengths, self.document_hashes),
            "fingerprint": self.fingerprint}

  def summary(self) -> dict[str, Any]:
    """Documents, targets, bytes, the largest document's share of the targets, rows and the fingerprint."""
    return {"documents": len(self.names), "tokens": self.num_tokens, "bytes": int(np.sum(self.document_bytes)),
            "largest_share": float(np.max(self.lengths) / self.num_tokens), "rows": int(len(self.inputs)),
            "fingerprint": self.fingerprint}


def window_offset(name: str, num_targets: int, window: int, seed: int = EVAL_SET_SEED) -> int:
  """Start in [0, num_targets - window] of a document's window: sha256(seed, name), so fixed per document."""
  if not 1 <= window <= num_targets:
    raise ValueError(f"window={window} must be in [1, num_targets={num_targets}]")
  digest = hashlib.sha256(f"{seed}/{name}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % (num_targets - window + 1)


def _target_bytes(tokenizer: tokenizers.Tokenizer, targets: np.ndarray) -> int:
  """UTF-8 bytes that `targets` stand for, each EOS counted as one: exactly the count for the byte tokenizer."""
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    return len(targets)
  eos = int(np.sum(targets == tokenizer.eos_id))
  return len(tokenizer.decode(targets[targets != tokenizer.eos_id]).encode("utf-8")) + eos


def _tokenizer_name(tokenizer: tokenizers.Tokenizer) -> str:
  """The tokenizer as the fingerprint names it: its kind and ids, not its file's path (which differs per machine;
  the token content is fingerprinted anyway)."""
  return f"{type(tokenizer).__name__}(vocab_size={tokenizer.vocab_size}, eos_id={tokenizer.eos_id})"


def _manifest(parameters, names, offsets, lengths, hashes) -> dict[str, Any]:
  return {"parameters": dict(parameters),
          "documents": [[n, int(o), int(k), h] for n, o, k, h in zip(names, offsets, lengths, hashes)]}


def _fingerprint(manifest: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _check_budgets(*, seq_len: int, cap_tokens: int, min_tokens: int) -> None:
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  if cap_tokens < 1:
    raise ValueError(f"cap_tokens={cap_tokens} must be >= 1")
  if min_tokens < 0:
    raise ValueError(f"min_tokens={min_tokens} must be >= 0")


def _assemble(segments: Mapping[str, np.ndarray], offsets: Mapping[str, int], *, tokenizer: tokenizers.Tokenizer,
              parameters: Mapping[str, Any]) -> EvalSet:
  """The set from each document's segment, int32 [k + 1] (its context token, then its k targets).

  Raises ValueError when the targets fall short of parameters['min_tokens'].
  """
  seq_len, min_tokens = parameters["seq_len"], parameters["min_tokens"]
  names = tuple(sorted(segments))
  lengths = np.asarray([len(segments[n]) - 1 for n in names], np.int64)  # [D]
  if not names or int(lengths.sum()) < min_tokens:
    raise ValueError(
        f"the evaluation set has {int(lengths.sum())} targets from {len(names)} documents with cap_tokens="
        f"{parameters['cap_tokens']}, fewer than min_tokens={min_tokens}: raise the cap, or hold out more "
        "documents (data.validation_fraction)")
  rows_of = [-(-int(k) // seq_len) for k in lengths]  # ceil: a document's rows
  inputs = np.full((sum(rows_of), seq_len), tokenizer.pad_id, np.int32)  # [N, L]
  targets = np.full_like(inputs, tokenizer.pad_id)
  document = np.full_like(inputs, -1)
  row = 0
  for d, (name, rows) in enumerate(zip(names, rows_of)):
    segment = segments[name]
    k = len(segment) - 1
    flat = slice(row * seq_len, row * seq_len + k)  # the document's targets, laid row after row
    inputs.reshape(-1)[flat] = segment[:-1]
    targets.reshape(-1)[flat] = segment[1:]
    document.reshape(-1)[flat] = d
    row += rows
  hashes = tuple(hashlib.sha256(segments[n].astype("<i4").tobytes()).hexdigest() for n in names)
  offsets_array = np.asarray([offsets[n] for n in names], np.int64)
  manifest = _manifest(parameters, names, offsets_array, lengths, hashes)
  return EvalSet(
      inputs=inputs, targets=targets, document=document, names=names, offsets=offsets_array, lengths=lengths,
      document_bytes=np.asarray([_target_bytes(tokenizer, segments[n][1:]) for n in names], np.int64),
      parameters=dict(parameters), document_hashes=hashes, fingerprint=_fingerprint(manifest))


def build_eval_set(documents: Mapping[str, np.ndarray], *, tokenizer: tokenizers.Tokenizer, seq_len: int,
                   cap_tokens: int = DEFAULT_CAP_TOKENS, min_tokens: int = DEFAULT_MIN_TOKENS,
                   seed: int = EVAL_SET_SEED) -> EvalSet:
  """The fixed evaluation set of `documents` (name -> int32 [T] token ids, no EOS): rule in the module docstring.

  Args:
    documents: every validation document, by a name unique to it (a file's path relative to its corpus root).
    tokenizer: gives the EOS and pad ids, and the bytes each target stands for.
    seq_len: L, the run's sequence length: targets per row.
    cap_tokens: most targets a document contributes (with the byte tokenizer, bytes; its EOS counted as one).
    min_tokens: fewest targets the set may hold in all (ValueError below it).
    seed: the window offsets; fixed by default and never the training seed.
  """
  _check_budgets(seq_len=seq_len, cap_tokens=cap_tokens, min_tokens=min_tokens)
  eos = np.asarray([tokenizer.eos_id], np.int32)
  segments, offsets = {}, {}
  for name, tokens in documents.items():
    stream = np.concatenate([eos, np.asarray(tokens, np.int32).reshape(-1), eos])  # [T + 2]: context + targets
    window = min(len(stream) - 1, cap_tokens)
    offsets[name] = window_offset(name, len(stream) - 1, window, seed)
    segments[name] = stream[offsets[name]:offsets[name] + window + 1]  # [window + 1]
  parameters = {"seq_len": seq_len, "cap_tokens": cap_tokens, "min_tokens": min_tokens, "seed": seed,
                "tokenizer": _tokenizer_name(tokenizer), "version": FINGERPRINT_VERSION}
  return _assemble(segments, offsets, tokenizer=tokenizer, parameters=parameters)


def document_segments(eval_set: EvalSet) -> dict[str, np.ndarray]:
  """name -> int32 [k + 1]: each document's context token and its k targets, read back from the rows."""
  segments = {}
  row = 0
  seq_len = eval_set.parameters["seq_len"]
  for d, (name, k) in enumerate(zip(eval_set.names, eval_set.lengths)):
    flat = slice(row * seq_len, row * seq_len + int(k))
    segments[name] = np.concatenate([eval_set.inputs.reshape(-1)[flat][:1], eval_set.targets.reshape(-1)[flat]])
    row += -(-int(k) // seq_len)
  return segments


def eval_subset(eval_set: EvalSet, *, tokenizer: tokenizers.Tokenizer, cap_tokens: int,
                min_tokens: int = 0) -> EvalSet:
  """A smaller set inside `eval_set`: the first `cap_tokens` targets of each document's window (every document
  still enters), e.g. the ~64K subset scored during training (results/SCALING.md). Fingerprinted on its own."""
  _check_budgets(seq_len=eval_set.parameters["seq_len"], cap_tokens=cap_tokens, min_tokens=min_tokens)
  segments = {n: s[:cap_tokens + 1] for n, s in document_segments(eval_set).items()}
  parameters = {**eval_set.parameters, "cap_tokens": cap_tokens, "min_tokens": min_tokens,
                "subset_of": eval_set.fingerprint}
  return _assemble(segments, dict(zip(eval_set.names, eval_set.offsets.tolist())), tokenizer=tokenizer,
                   parameters=parameters)


def validation_documents(data_cfg: Any) -> dict[str, np.ndarray]:
  """path -> int32 [T] token ids (no EOS) of every document of the validation split of data.dataset.

  stdlib and text_dir only: their documents are files with stable names (the path), which the rule needs. The text
  is what the training pipeline reads (the prepared TFDS records), tokenized by data.tokenizer.
  """
  data = data_config.validate_data_config(data_cfg)
  if data.dataset not in ("stdlib", "text_dir"):
    raise ValueError(f"data.dataset={data.dataset!r}: the fixed evaluation set is built from the files of 'stdlib' "
                     "or 'text_dir'")
  if data.objective != "causal_lm":
    raise ValueError(f"data.objective={data.objective!r}: the fixed evaluation set scores next-token prediction "
                     "('causal_lm')")
  tokenizer = pipeline.get_tokenizer(data_cfg)
  source, text_key = pipeline.document_source(data_cfg, "validation")
  documents = {}
  for index in range(len(source)):
    record = source[index]
    path, text = record["path"], record[text_key]
    path = path.decode("utf-8") if isinstance(path, bytes) else path
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    documents[path] = tokenizer.encode(text)
  if len(documents) != len(source):
    raise ValueError(f"the validation split of data.dataset={data.dataset!r} names a path twice")
  return documents


def validation_eval_set(data_cfg: Any, *, seq_len: int, cap_tokens: int = DEFAULT_CAP_TOKENS,
                        min_tokens: int = DEFAULT_MIN_TOKENS) -> EvalSet:
  """The fixed evaluation set of the validation split of `data_cfg` (`validation_documents`, `build_eval_set`)."""
  return build_eval_set(validation_documents(data_cfg), tokenizer=pipeline.get_tokenizer(data_cfg),
                        seq_len=seq_len, cap_tokens=cap_tokens, min_tokens=min_tokens)


def eval_batches(eval_set: EvalSet, batch_size: int) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
  """(rows, batch) for consecutive rows of the set: batch = {'inputs', 'targets': int32 [B, L], 'weights':
  float32 [B, L]}, the training pipeline's keys; the last batch is padded to B rows of weight 0 (static shapes)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  weights = eval_set.weights
  for start in range(0, len(eval_set.inputs), batch_size):
    rows = slice(start, min(start + batch_size, len(eval_set.inputs)))
    missing = batch_size - (rows.stop - rows.start)
    yield rows, {key: np.concatenate([a[rows], np.zeros((missing, a.shape[1]), a.dtype)])  # padding: weight 0
                 for key, a in (("inputs", eval_set.inputs), ("targets", eval_set.targets), ("weights", weights))}


# ---------------------------------------------------------------------------------------------
# Scoring.


@dataclasses.dataclass(frozen=True, eq=False)
class EvalResult:
  """A model's scores on a fixed evaluation set, with the per-document sums any later interval needs."""

  mean: float                 # nats per target token, token-weighted over the whole set
  bits_per_byte: float        # sum of nats / ln 2 / sum of document_bytes
  interval: stats.BootstrapInterval  # of `mean`, over documents
  bits_per_byte_interval: stats.BootstrapInterval  # of `bits_per_byte`, over documents
  per_document: np.ndarray    # float64 [D]: nats summed over each document's targets
  tokens: np.ndarray          # int64 [D]: targets per document (EvalSet.lengths)
  document_bytes: np.ndarray  # int64 [D]
  names: tuple[str, ...]      # [D]
  fingerprint: str            # the set's: compare_documents refuses two results of different sets
  batch_size: int             # rows per forward_fn call: part of the result for a capacity-limited MoE

  def record(self) -> dict[str, Any]:
    """JSON-safe: the numbers a run's result.json keeps (per-document sums included, for later bootstraps)."""
    return {"fingerprint": self.fingerprint, "batch_size": self.batch_size, "mean": self.mean,
            "interval": list(self.interval.interval), "bits_per_byte": self.bits_per_byte,
            "bits_per_byte_interval": list(self.bits_per_byte_interval.interval),
            "resamples": self.interval.resamples, "confidence": self.interval.confidence,
            "documents": {n: [float(x), int(k), int(b)] for n, x, k, b in
                          zip(self.names, self.per_document, self.tokens, self.document_bytes)}}


def evaluate_documents(forward_fn: Callable[[dict[str, np.ndarray]], Any], eval_set: EvalSet, *,
                       batch_size: int, resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.BOOTSTRAP_SEED,
                       confidence: float = 0.95) -> EvalResult:
  """Scores every row of `eval_set` with `forward_fn` and sums the losses per document.

  Args:
    forward_fn: a batch (`eval_batches`: 'inputs', 'targets', 'weights' [B, L]) -> per-token loss [B, L] in nats
      (any array numpy can read; values on padding are ignored). For a model: `token_cross_entropy_fn(model)`.
    eval_set: the fixed set.
    batch_size: B, rows per call.
    resamples, seed, confidence: the bootstrap over documents (`stats.document_bootstrap`).
  """
  per_document = np.zeros(len(eval_set.names), np.float64)  # [D]
  for rows, batch in eval_batches(eval_set, batch_size):
    losses = np.asarray(forward_fn(batch), np.float64)
    if losses.shape != batch["targets"].shape:
      raise ValueError(f"forward_fn returned shape {losses.shape}; per-token losses must be [B, L] = "
                       f"{batch['targets'].shape}")
    document = eval_set.document[rows]  # [b, L], b <= B
    real = document >= 0
    per_document += np.bincount(document[real], weights=losses[:len(document)][real], minlength=len(per_document))
  return _result(per_document, eval_set, batch_size, resamples=resamples, seed=seed, confidence=confidence)


def _result(per_document: np.ndarray, eval_set: EvalSet, batch_size: int, **bootstrap) -> EvalResult:
  bits = eval_set.document_bytes * math.log(2)  # nats per bit times bytes: the denominator of bits per byte
  return EvalResult(
      mean=float(per_document.sum() / eval_set.lengths.sum()),
      bits_per_byte=float(per_document.sum() / bits.sum()),
      interval=stats.document_bootstrap(per_document, eval_set.lengths, **bootstrap),
      bits_per_byte_interval=stats.document_bootstrap(per_document, bits, **bootstrap),
      per_document=per_document, tokens=eval_set.lengths, document_bytes=eval_set.document_bytes,
      names=eval_set.names, fingerprint=eval_set.fingerprint, batch_size=batch_size)


def compare_documents(a: Sequence[EvalResult] | EvalResult, b: Sequence[EvalResult] | EvalResult, *,
                      resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.BOOTSTRAP_SEED,
                      confidence: float = 0.95) -> stats.BootstrapInterval:
  """Nats per token of a - b and its paired bootstrap interval over documents (`stats.paired_document_bootstrap`).

  `a` and `b` are one result each, or S results each (pair s = a[s], b[s], e.g. one seed), all on one set.
  """
  a = [a] if isinstance(a, EvalResult) else list(a)
  b = [b] if isinstance(b, EvalResult) else list(b)
  if len(a) != len(b) or not a:
    raise ValueError(f"a and b must pair one to one, got {len(a)} and {len(b)} results")
  fingerprints = sorted({r.fingerprint for r in a + b})
  if len(fingerprints) != 1:
    raise ValueError(f"the results were scored on {len(fingerprints)} different evaluation sets "
                     f"({', '.join(f[:12] for f in fingerprints)}); a paired comparison needs one")
  batch_sizes = sorted({r.batch_size for r in a + b})
  if len(batch_sizes) != 1:  # a capacity-limited MoE scores other groups at another batch size
    raise ValueError(f"the results were scored at batch sizes {batch_sizes}; a paired comparison needs one")
  return stats.paired_document_bootstrap(np.stack([r.per_document for r in a]), np.stack([r.per_document for r in b]),
                                         a[0].tokens, resamples=resamples, seed=seed, confidence=confidence)


@nnx.jit
def token_cross_entropy(model: nnx.Module, batch: dict) -> jax.Array:
  """float32 [B, L]: each target's cross-entropy in nats under a deterministic forward pass (no dropout, no
  jitter; a capacity-limited MoE routes at its evaluation capacity factor). The per-token form of
  `train.eval_step`, which sums the same numbers."""
  logits, _ = models.forward(model, batch, deterministic=True)  # [B, L, V]
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])


def token_cross_entropy_fn(model: nnx.Module, place: Callable[[dict], dict] | None = None
                           ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
  """forward_fn for `evaluate_documents`: a global batch -> float64 numpy [B, L] token cross-entropies.

  `place` turns the numpy batch into the arrays the model runs on (the trainer: this process's rows of it, laid out
  over the mesh); None runs it as it is, on one device. A result spread over several processes is gathered, so every
  process gets the whole [B, L] and sums the same per-document losses.
  """

  def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
    losses = token_cross_entropy(model, place(batch) if place else batch)  # [B, L]
    if not losses.is_fully_addressable:
      losses = multihost_utils.process_allgather(losses, tiled=True)
    return np.asarray(losses, np.float64)

  return forward


def main(argv: Sequence[str] | None = None) -> None:
  """Prints the summary of the validation set's fixed evaluation set (and writes its manifest): the facts a
  protocol freezes. E.g. `python -m moe_jax.evalset --validation_fraction=0.08 --manifest=eval_set.json`."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--dataset", default="stdlib", choices=("stdlib", "text_dir"))
  parser.add_argument("--text_dir", default=None)
  parser.add_argument("--text_glob", default="**/*.txt")
  parser.add_argument("--validation_fraction", type=float, default=builders.DEFAULT_VALIDATION_FRACTION)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--cap_tokens", type=int, default=DEFAULT_CAP_TOKENS)
  parser.add_argument("--min_tokens", type=int, default=DEFAULT_MIN_TOKENS)
  parser.add_argument("--subset_cap_tokens", type=int, default=0, help="also summarise eval_subset at this cap")
  parser.add_argument("--manifest", default=None, help="write the set's manifest (JSON) here")
  args = parser.parse_args(argv)
  cfg = {"dataset": args.dataset, "text_dir": args.text_dir, "text_glob": args.text_glob,
         "validation_fraction": args.validation_fraction, "data_dir": args.data_dir}
  eval_set = validation_eval_set(cfg, seq_len=args.seq_len, cap_tokens=args.cap_tokens, min_tokens=args.min_tokens)
  print(json.dumps({"set": {**eval_set.parameters, **eval_set.summary()}}))
  if args.subset_cap_tokens:
    subset = eval_subset(eval_set, tokenizer=pipeline.get_tokenizer(cfg), cap_tokens=args.subset_cap_tokens)
    print(json.dumps({"subset": {**subset.parameters, **subset.summary()}}))
  if args.manifest:
    fileio.write_json(args.manifest, eval_set.manifest(), indent=1)


if __name__ == "__main__":
  main()
