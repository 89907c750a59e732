"""What the experts learned: router traces and the analyses over them, as pure functions on arrays.

Axis legend: N traced tokens · NB traced MoE blocks · K choices per token (per block; the most of any traced block)
· E experts · D documents · C labels (source labels or token classes) · R bootstrap resamples.

A router trace (`Trace`, one `.npz` file, schema in docs/analysis.md) records, for every token and MoE block of a
forward pass, the experts the router chose, their gates, whether each choice was kept by capacity, and the router's
entropy; with the token ids, the document of every token and a source label per document. `experiments/trace.py`
writes one from a run's checkpoint (`moe_layer.MoeFeedForward.route` recomputes what the layer routed).

The analyses take the trace's arrays (numpy in, numpy out, shapes documented) and follow OLMoE's analysis of its
experts (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", arXiv:2409.02060, Sec. 5 and its
scripts): router saturation across checkpoints (Sec. 5.1), expert co-activation (Sec. 5.2), domain and vocabulary
specialisation (Secs. 5.3-5.4); plus expert load, drops, dead and overloaded experts, routing consistency between
consecutive MoE blocks, and the ranking of an expert-ablation sweep. A choice is "selected" when the router picked
it (before capacity) and "kept" when it also found room in the expert's buffer.

Intervals are over documents (tokens of one document are correlated): `stats.document_bootstrap` for ratios of
sums, `stats.resample_indices` for the other statistics, the same resamples (fixed seed) for every statistic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe_jax import fileio, stats

TRACE_VERSION = 1
# Source labels of a document by its path (`source_label`): the file type of the embedded corpus and of text dirs.
SOURCE_LABELS = ("code", "tests", "docs", "prose")
# Classes of a byte token (`byte_classes`); 'special' is pad, EOS and unknown.
BYTE_CLASSES = ("letter", "digit", "whitespace", "punctuation", "non_ascii", "special")
_CODE_SUFFIXES = frozenset((".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
                            ".sh", ".toml", ".cfg", ".ini", ".json", ".yaml", ".yml"))
_DOC_SUFFIXES = frozenset((".md", ".rst", ".ipynb", ".html", ".tex"))


# ----------------------------------------------------------------------------------------------------------
# The trace file.


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
  """The routing of every token of a traced text, in every MoE block (docs/analysis.md).

  Tokens are the rows of the traced batches flattened, row by row: token n is position n % L of row n // L, so a
  replay can put them back into [rows, L]. Padding tokens are kept (document -1) because they were routed with the
  others; the analyses skip them (`valid`).
  """

  token_ids: np.ndarray     # int32 [N]
  document: np.ndarray      # int32 [N]: index into `document_names`; -1 on padding
  expert_index: np.ndarray  # int16 [N, NB, K]: the chosen experts, best first (order of the router's choices)
  gate: np.ndarray          # float32 [N, NB, K]: combine weight of each choice (0 where dropped or not selected)
  slot: np.ndarray          # int16 [N, NB, K]: position in the expert's buffer where kept (router replay reads it)
  selected: np.ndarray      # bool [N, NB, K]: the router chose it (before capacity)
  kept: np.ndarray          # bool [N, NB, K]: selected and within the expert's capacity
  entropy: np.ndarray       # float32 [N, NB]: router entropy of the token (nats)
  blocks: np.ndarray        # int32 [NB]: the model's block index of each traced MoE block
  document_names: tuple[str, ...]  # [D]
  document_labels: np.ndarray      # int8 [D]: index into `label_names`
  label_names: tuple[str, ...]     # [C]
  meta: Mapping[str, Any]   # num_experts, router per block, seq_len, step, workdir, tokenizer, ... (JSON)

  @property
  def num_experts(self) -> int:
    return int(self.meta["num_experts"])

  @property
  def valid(self) -> np.ndarray:  # bool [N]
    return self.document >= 0

  @property
  def dropped(self) -> np.ndarray:  # bool [N, NB]: the router selected something and nothing was kept
    return dropped_tokens(self.selected, self.kept)

  @property
  def token_labels(self) -> np.ndarray:  # int32 [N]: each token's document label; -1 on padding
    return np.where(self.valid, self.document_labels[np.maximum(self.document, 0)], -1).astype(np.int32)


_ARRAYS = {"token_ids": np.int32, "document": np.int32, "expert_index": np.int16, "gate": np.float32, "slot": np.int16,
           "selected": np.bool_, "kept": np.bool_, "entropy": np.float32, "blocks": np.int32,
           "document_labels": np.int8}


def check_trace(trace: Trace) -> None:
  """ValueError naming the array whose shape or values break the schema."""
  n = trace.token_ids.shape[0]
  choices = trace.expert_index.shape
  shapes = {"token_ids": (n,), "document": (n,), "gate": choices, "slot": choices, "selected": choices, "kept": choices,
            "entropy": choices[:2], "blocks": choices[1:2], "document_labels": (len(trace.document_names),)}
  if len(choices) != 3 or choices[0] != n:
    raise ValueError(f"expert_index must be [N={n}, NB, K]; got shape {choices}")
  for name, shape in shapes.items():
    if getattr(trace, name).shape != shape:
      raise ValueError(f"trace array {name} must have shape {shape}; got {getattr(trace, name).shape}")
  if np.any(trace.document >= len(trace.document_names)) or np.any(trace.document < -1):
    raise ValueError(f"trace document ids must be in [-1, {len(trace.document_names)})")
  if np.any((trace.document_labels < 0) | (trace.document_labels >= len(trace.label_names))):
    raise ValueError(f"trace document_labels must be in [0, {len(trace.label_names)})")
  if np.any(trace.kept & ~trace.selected):
    raise ValueError("trace: a kept choice must be selected")
  if np.any((trace.expert_index < 0) | (trace.expert_index >= trace.num_experts)):
    raise ValueError(f"trace expert_index must be in [0, num_experts={trace.num_experts})")


def write_trace(path: str | os.PathLike, trace: Trace) -> None:
  """`trace` as one compressed .npz at `path` (deflate: a trace of a small model is mostly repeated expert ids and
  flags, so it shrinks several-fold and can be committed), written atomically (`fileio.atomic_write`): the arrays
  under their field names, the names and meta as one JSON string `header`."""
  check_trace(trace)
  header = {"version": TRACE_VERSION, "document_names": list(trace.document_names),
            "label_names": list(trace.label_names), "meta": dict(trace.meta)}
  arrays = {name: np.asarray(getattr(trace, name), dtype) for name, dtype in _ARRAYS.items()}
  with fileio.atomic_write(path, "wb") as f:
    np.savez_compressed(f, header=np.asarray(json.dumps(header)), **arrays)


def read_trace(path: str | os.PathLike) -> Trace:
  """The `Trace` in `path` (written by `write_trace`); ValueError naming the path when it is not one."""
  try:
    with np.load(path, allow_pickle=False) as data:
      header = json.loads(str(data["header"]))
      arrays = {name: data[name] for name in _ARRAYS}
  except (KeyError, ValueError, zipfile.BadZipFile) as error:
    raise ValueError(f"{path} is not a router trace ({error})") from None
  if header.get("version") != TRACE_VERSION:
    raise ValueError(f"{path}: trace version {header.get('version')} is not {TRACE_VERSION}")
  trace = Trace(**arrays, document_names=tuple(header["document_names"]),
                label_names=tuple(header["label_names"]), meta=header["meta"])
  check_trace(trace)
  return trace


def source_label(path: str) -> str:
  """The `SOURCE_LABELS` label of a document by its path: 'tests' for a file in a test directory or named test_*
  (the stdlib corpus keeps its test suites, ~60% of it: moe_jax.data.builders), 'code' for source files, 'docs'
  for markup (.md, .rst, ...) and anything under a docs/ or Doc/ directory, 'prose' for the rest (.txt, ...)."""
  parts = path.replace("\\", "/").lower().split("/")
  name = parts[-1]
  suffix = os.path.splitext(name)[1]
  if any(p in ("test", "tests", "testing") for p in parts[:-1]) or name.startswith("test_") or (
      name.endswith("_test" + suffix) and suffix in _CODE_SUFFIXES):
    return "tests"
  if suffix in _DOC_SUFFIXES or any(p in ("doc", "docs") for p in parts[:-1]):
    return "docs"
  if suffix in _CODE_SUFFIXES:
    return "code"
  return "prose"


def byte_classes(token_ids: np.ndarray, byte_offset: int) -> np.ndarray:  # int [...] -> int8 [...]
  """Index into `BYTE_CLASSES` of each byte token (byte b has id b + byte_offset, moe_jax.data.tokenizers): ASCII
  letters, digits, whitespace, punctuation (the other printable ASCII), non-ASCII (UTF-8 bytes >= 0x80), and
  'special' for ids below byte_offset (pad, EOS, unknown) and ASCII control characters."""
  byte = np.asarray(token_ids, np.int64) - byte_offset
  ascii_ = np.arange(128)
  table = np.full(128, BYTE_CLASSES.index("special"), np.int8)
  table[(ascii_ >= 33) & (ascii_ < 127)] = BYTE_CLASSES.index("punctuation")
  table[np.isin(ascii_, [ord(c) for c in " \t\n\r\x0b\x0c"])] = BYTE_CLASSES.index("whitespace")
  table[(ascii_ >= ord("0")) & (ascii_ <= ord("9"))] = BYTE_CLASSES.index("digit")
  table[((ascii_ >= ord("a")) & (ascii_ <= ord("z"))) | ((ascii_ >= ord("A")) & (ascii_ <= ord("Z")))] = (
      BYTE_CLASSES.index("letter"))
  out = np.where(byte >= 128, BYTE_CLASSES.index("non_ascii"), table[np.clip(byte, 0, 127)])
  return np.where(byte < 0, BYTE_CLASSES.index("special"), out).astype(np.int8)


# ----------------------------------------------------------------------------------------------------------
# Load, drops, dead and overloaded experts.


def dropped_tokens(selected: np.ndarray, kept: np.ndarray) -> np.ndarray:  # 2 x bool [N, NB, K] -> bool [N, NB]
  """Tokens the router sent somewhere and no expert processed: only the residual carried them (Switch Sec. 2.2)."""
  return np.any(selected, axis=-1) & ~np.any(kept, axis=-1)


def _one_hot_counts(expert_index: np.ndarray, mask: np.ndarray, num_experts: int) -> np.ndarray:
  """float64 [..., E]: per token, how many of its masked choices name each expert. [..., K] in."""
  hot = np.asarray(expert_index)[..., None] == np.arange(num_experts)  # [..., K, E]
  return np.sum(hot & np.asarray(mask, bool)[..., None], axis=-2, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Load:
  """Expert load and drops per block, over the valid tokens (module legend)."""

  selected_share: np.ndarray    # [NB, E] share of the selected assignments choosing each expert (rows sum to 1)
  kept_share: np.ndarray        # [NB, E] share of the kept assignments processed by each expert
  expert_drop_rate: np.ndarray  # [NB, E] dropped / selected assignments of each expert (nan: never selected)
  assignment_drop_rate: np.ndarray  # [NB] dropped / selected (token, choice) assignments
  token_drop_rate: np.ndarray   # [NB] share of the tokens with no kept choice (`dropped_tokens`)


def expert_load(expert_index: np.ndarray, selected: np.ndarray, kept: np.ndarray, num_experts: int,
                valid: np.ndarray | None = None) -> Load:
  """`Load` of a trace: expert_index, selected, kept [N, NB, K]; valid bool [N] (None: every token)."""
  valid = np.ones(expert_index.shape[0], bool) if valid is None else np.asarray(valid, bool)
  expert_index, selected, kept = expert_index[valid], selected[valid], kept[valid]
  chosen = _one_hot_counts(expert_index, selected, num_experts).sum(axis=0)  # [NB, E]
  processed = _one_hot_counts(expert_index, kept, num_experts).sum(axis=0)  # [NB, E]
  with np.errstate(invalid="ignore", divide="ignore"):
    return Load(
        selected_share=chosen / chosen.sum(axis=-1, keepdims=True),
        kept_share=processed / processed.sum(axis=-1, keepdims=True),
        expert_drop_rate=(chosen - processed) / chosen,
        assignment_drop_rate=1.0 - processed.sum(axis=-1) / chosen.sum(axis=-1),
        token_drop_rate=np.mean(dropped_tokens(selected, kept), axis=0),
    )


def dead_and_overloaded(share: np.ndarray, *, dead_below: float = 0.01,
                        overloaded_above: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
  """(dead, overloaded), bool [NB, E], from a share of assignments per expert ([NB, E], rows sum to 1, e.g.
  `Load.kept_share`): an expert is dead when it takes under `dead_below` times its fair share 1/E (default: under
  1% of it), overloaded above `overloaded_above` times it (default: twice)."""
  fair = 1.0 / share.shape[-1]
  return share < dead_below * fair, share > overloaded_above * fair


# ----------------------------------------------------------------------------------------------------------
# Saturation, co-activation, consistency.


def router_saturation(index_t: np.ndarray, selected_t: np.ndarray, index_final: np.ndarray,
                      selected_final: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:  # -> [NB]
  """OLMoE's router saturation (arXiv:2409.02060, Sec. 5.1) of checkpoint t against the final model T, per
  block: (1/N) sum_i |E_i^(t) ∩ E_i^(T)| / k, the share of each token's top-k experts at t that are also its
  top-k at T, over the same tokens. Arrays [N, NB, K] of the two traces of one text; with a varying number of
  selected experts (expert choice) k is the final model's count for the token, and tokens it sent nowhere are
  skipped. 1.0: routing already final; k / E: unrelated (random) routing."""
  valid = np.ones(index_t.shape[0], bool) if valid is None else np.asarray(valid, bool)
  num_experts = int(max(index_t.max(initial=0), index_final.max(initial=0))) + 1
  at_t = _one_hot_counts(index_t[valid], selected_t[valid], num_experts) > 0  # [N, NB, E]
  final = _one_hot_counts(index_final[valid], selected_final[valid], num_experts) > 0
  k = final.sum(axis=-1)  # [N, NB]
  shared = (at_t & final).sum(axis=-1)
  with np.errstate(invalid="ignore"):
    return np.sum(shared, axis=0) / np.sum(k, axis=0)


def coactivation(expert_index: np.ndarray, selected: np.ndarray, num_experts: int,
                 valid: np.ndarray | None = None) -> np.ndarray:  # [N, K] -> [E, E]
  """OLMoE's co-activation of one block (arXiv:2409.02060, Sec. 5.2): C[i, j] = (tokens routed to both i and j)
  / (tokens routed to i), the share of expert i's tokens that also go to expert j; 0 on the diagonal and in the
  rows of experts never selected. Needs K > 1 to be non-zero."""
  valid = np.ones(expert_index.shape[0], bool) if valid is None else np.asarray(valid, bool)
  hot = _one_hot_counts(expert_index[valid], selected[valid], num_experts) > 0  # [N, E]
  return _conditional_share(hot, hot, diagonal=False)


def routing_consistency(index_a: np.ndarray, selected_a: np.ndarray, index_b: np.ndarray, selected_b: np.ndarray,
                        num_experts: int, valid: np.ndarray | None = None) -> tuple[np.ndarray, float]:
  """How a token's experts in block a predict its experts in a later block b (OLMoE's cross-layer co-activation):
  [E, E] C[i, j] = (tokens routed to i in a and to j in b) / (tokens routed to i in a), and its summary, the share
  of (token, choice in a) pairs whose token also goes to the expert j that expert i's tokens go to most in b
  (sum_i N_i max_j C[i, j] / sum_i N_i): 1.0 when block a's choice fixes block b's, about k / E when the two are
  independent and balanced. Arrays [N, K] of the two blocks."""
  valid = np.ones(index_a.shape[0], bool) if valid is None else np.asarray(valid, bool)
  in_a = _one_hot_counts(index_a[valid], selected_a[valid], num_experts) > 0  # [N, E]
  in_b = _one_hot_counts(index_b[valid], selected_b[valid], num_experts) > 0
  matrix = _conditional_share(in_a, in_b, diagonal=True)
  counts = in_a.sum(axis=0)  # [E]
  return matrix, float(np.sum(counts * matrix.max(axis=-1)) / max(np.sum(counts), 1))


def _conditional_share(a: np.ndarray, b: np.ndarray, *, diagonal: bool) -> np.ndarray:  # 2 x bool [N, E] -> [E, E]
  """P(b_j | a_i) over tokens: joint counts over the counts of a_i (0 where a_i never happens)."""
  joint = a.astype(np.float64).T @ b.astype(np.float64)  # [E, E]
  if not diagonal:
    np.fill_diagonal(joint, 0.0)
  return joint / np.maximum(a.sum(axis=0), 1)[:, None]


# ----------------------------------------------------------------------------------------------------------
# Specialisation by label (source of the document, class of the token) and by vocabulary.


@dataclasses.dataclass(frozen=True)
class Specialisation:
  """Which experts take the tokens of each label (module legend), from one block, with intervals over documents.

  `share[c, e]` is OLMoE's domain specialisation (arXiv:2409.02060, Sec. 5.3): the share of the tokens of label c
  routed to expert e (a token counts once per selected choice, so each row sums to the mean number of choices k);
  without specialisation it is k / E (`uniform`). `distance[e]` is how far expert e's tokens are from the label mix
  of all tokens: the total variation 0.5 sum_c |P(c | e) - P(c)|, 0 when its tokens are a random sample of the text
  (a router blind to the label), 1 - P(c) at most when it takes only label c.
  """

  share: np.ndarray       # [C, E]
  share_low: np.ndarray   # [C, E] percentile bootstrap interval over documents (`stats.document_bootstrap`)
  share_high: np.ndarray  # [C, E]
  uniform: float          # k / E
  distance: np.ndarray    # [E]
  distance_low: np.ndarray   # [E] percentile bootstrap interval over documents (same resamples)
  distance_high: np.ndarray  # [E]
  tokens: np.ndarray      # [C] tokens of each label
  documents: int          # D, the documents resampled


def specialisation(expert_index: np.ndarray, selected: np.ndarray, label: np.ndarray, document: np.ndarray,
                   num_labels: int, num_experts: int, *, resamples: int = stats.DEFAULT_RESAMPLES,
                   seed: int = stats.BOOTSTRAP_SEED, confidence: float = 0.95) -> Specialisation:
  """`Specialisation` of one block: expert_index, selected [N, K]; label int [N] in [0, C) (e.g. the token's
  document's `source_label`, or its `byte_classes`); document int [N] (tokens with document or label < 0 are
  skipped). Documents are resampled whole, the same `stats.resample_indices(D, resamples, seed)` for every
  statistic, so a document's correlated tokens move together."""
  keep = (np.asarray(document) >= 0) & (np.asarray(label) >= 0)
  docs, doc_index = np.unique(np.asarray(document)[keep], return_inverse=True)
  label = np.asarray(label)[keep]
  hot = _one_hot_counts(expert_index[keep], selected[keep], num_experts)  # [n, E]
  routed = np.zeros((len(docs), num_labels, num_experts))  # [D, C, E] choices of label c to expert e per document
  np.add.at(routed, (doc_index, label), hot)
  tokens = np.zeros((len(docs), num_labels))  # [D, C]
  np.add.at(tokens, (doc_index, label), 1.0)
  share, low, high = (np.full((num_labels, num_experts), np.nan) for _ in range(3))
  for c in range(num_labels):
    if tokens[:, c].sum() == 0:
      continue
    for e in range(num_experts):
      interval = stats.document_bootstrap(routed[:, c, e], tokens[:, c], resamples=resamples, seed=seed,
                                          confidence=confidence)
      share[c, e], low[c, e], high[c, e] = interval.mean, interval.low, interval.high
  index = stats.resample_indices(len(docs), resamples, seed)  # [R, D]
  resampled = np.stack([_label_distance(routed[i].sum(axis=0)) for i in index])  # [R, E]
  distance_low, distance_high = np.percentile(resampled, [50 * (1 - confidence), 50 * (1 + confidence)], axis=0)
  mean_k = hot.sum() / max(len(label), 1)
  return Specialisation(share, low, high, float(mean_k / num_experts), _label_distance(routed.sum(axis=0)),
                        distance_low, distance_high, tokens.sum(axis=0), len(docs))


def _label_distance(routed: np.ndarray) -> np.ndarray:  # [C, E] choices per label and expert -> [E]
  """Total variation between each expert's label mix P(c | e) and that of all choices P(c) (nan: expert unused)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    per_expert = routed / routed.sum(axis=0, keepdims=True)  # [C, E]
    overall = routed.sum(axis=1) / routed.sum()  # [C]
    return 0.5 * np.abs(per_expert - overall[:, None]).sum(axis=0)


@dataclasses.dataclass(frozen=True)
class TopTokens:
  """Each expert's most frequent tokens (OLMoE's vocabulary specialisation, arXiv:2409.02060, Sec. 5.4)."""

  token_ids: np.ndarray  # int64 [E, n] most frequent first (-1 past the expert's distinct tokens)
  counts: np.ndarray     # int64 [E, n] times the token was routed to the expert
  share: np.ndarray      # [E, n] of the token's occurrences, the share routed to this expert (OLMoE's measure:
                         # 1.0 means the expert takes every occurrence; k / E is no preference)


def top_tokens(token_ids: np.ndarray, expert_index: np.ndarray, selected: np.ndarray, num_experts: int,
               n: int = 10, valid: np.ndarray | None = None) -> TopTokens:
  """`TopTokens` of one block: token_ids int [N]; expert_index, selected [N, K]. Ties: the smaller id first."""
  valid = np.ones(token_ids.shape[0], bool) if valid is None else np.asarray(valid, bool)
  vocab, inverse = np.unique(np.asarray(token_ids)[valid], return_inverse=True)
  hot = _one_hot_counts(expert_index[valid], selected[valid], num_experts)  # [N, E]
  counts = np.zeros((len(vocab), num_experts), np.int64)  # [V', E]
  np.add.at(counts, inverse, hot.astype(np.int64))
  occurrences = np.bincount(inverse, minlength=len(vocab))  # [V']
  ids, top, share = (np.full((num_experts, n), fill, dtype) for fill, dtype in
                     ((-1, np.int64), (0, np.int64), (np.nan, np.float64)))
  for e in range(num_experts):
    order = np.lexsort((vocab, -counts[:, e]))[:n]
    order = order[counts[order, e] > 0]
    ids[e, :len(order)], top[e, :len(order)] = vocab[order], counts[order, e]
    share[e, :len(order)] = counts[order, e] / occurrences[order]
  return TopTokens(ids, top, share)


# ----------------------------------------------------------------------------------------------------------
# Expert ablation.


@dataclasses.dataclass(frozen=True)
class AblationEntry:
  block: int
  expert: int
  loss: float   # evaluation loss with the expert removed
  delta: float  # loss - the unablated loss: what the expert is worth


def rank_ablations(base_loss: float, losses: np.ndarray, blocks: Sequence[int]) -> list[AblationEntry]:
  """Every (block, expert) of an ablation sweep, the most harmful removal first. losses [NB, E]: the evaluation
  loss with expert e of block blocks[b] removed; base_loss: the loss with none removed. Ties keep block order."""
  losses = np.asarray(losses, np.float64)
  if losses.ndim != 2 or losses.shape[0] != len(blocks):
    raise ValueError(f"losses must be [len(blocks)={len(blocks)}, num_experts]; got shape {losses.shape}")
  entries = [AblationEntry(int(blocks[b]), e, float(losses[b, e]), float(losses[b, e] - base_loss))
             for b in range(losses.shape[0]) for e in range(losses.shape[1])]
  return sorted(entries, key=lambda entry: -entry.delta)


def ablation_intervals(nats: np.ndarray, ablated: np.ndarray, tokens: np.ndarray, *,
                       resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.BOOTSTRAP_SEED,
                       confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) [NB, E]: percentile bootstrap interval over documents of each removal's loss increase (ablated
  minus unablated nats per token), from per-document sums (`tracing.ablation_nats`): nats [D] and ablated
  [NB, E, D] cross-entropies summed over each document's targets, tokens [D] its targets (documents with none are
  skipped). Paired: a resample takes a document's ablated and unablated nats together, and every (b, e) uses the
  same resamples (`stats.document_bootstrap`, fixed seed)."""
  nats, ablated, tokens = np.asarray(nats), np.asarray(ablated), np.asarray(tokens)
  if ablated.ndim != 3 or ablated.shape[-1] != nats.shape[0] or tokens.shape != nats.shape:
    raise ValueError(f"ablated must be [NB, E, D={nats.shape[0]}] and tokens [D]; got {ablated.shape}, {tokens.shape}")
  present = tokens > 0
  low, high = np.zeros(ablated.shape[:2]), np.zeros(ablated.shape[:2])
  for b, e in np.ndindex(*ablated.shape[:2]):
    interval = stats.document_bootstrap((ablated[b, e] - nats)[present], tokens[present], resamples=resamples,
                                        seed=seed, confidence=confidence)
    low[b, e], high[b, e] = interval.low, interval.high
  return low, high
