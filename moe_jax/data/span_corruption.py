"""T5's span-corruption objective (Raffel et al. 2020, Sec. 3.1.4 and 3.3.4): mask random spans of a chunk of
text, replace each span in the encoder input by one sentinel id, and ask the decoder for the spans, each after
its sentinel. Used by Switch Transformer pre-training (Fedus et al. 2021, Sec. 3: 15% of tokens, mean span 3).

Axis legend: L raw chunk length · Li encoder input length · Lo decoder target length · N noise spans.

Example (noise marked): raw `a b [c d] e f g [h] i`  ->  inputs `a b <s0> e f g <s1> i EOS`,
targets `<s0> c d <s1> h EOS`. `reassemble` inverts it.

Lengths. With `num_noise = round(L * density)` (clipped to [1, L - 1]) and `N = round(num_noise / mean_span)`
(at least 1), every chunk of length L gives Li = L - num_noise + N + 1 and Lo = num_noise + N + 1 (EOS
included): the lengths are fixed, so batches need no padding. `lengths(inputs_length, ...)` finds the longest
raw chunk whose encoder input fits, as T5's `random_spans_helper` does: inputs_length 512 -> raw 568 tokens,
targets 114 (the "512 / 114" of T5 and Switch pre-training).

Sentinel ids. T5 appends 100 "extra ids" after the SentencePiece vocabulary and numbers sentinels from the top
(sentinel 0 = the highest id). We do the same after any tokenizer's vocabulary: for the byte tokenizer (259 ids:
pad 0, EOS 1, unk 2, bytes 3..258) the model's vocabulary becomes 259 + data.num_sentinels, sentinel k having id
259 + num_sentinels - 1 - k. Appending, rather than reusing byte ids that UTF-8 never produces as ByT5 does,
keeps the corrupted text lossless for any byte sequence and allows more sentinels than those 13 ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Lengths:
  raw: int  # L: tokens of text a chunk takes
  inputs: int  # Li: encoder input, EOS included
  targets: int  # Lo: decoder targets, EOS included
  num_noise: int  # masked tokens of a full chunk
  num_spans: int  # N: masked spans (= sentinels used) of a full chunk


def chunk_lengths(raw: int, noise_density: float, mean_noise_span_length: float) -> Lengths:
  """The fixed lengths of a chunk of `raw` >= 2 tokens (module docstring)."""
  num_noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return Lengths(raw=raw, inputs=raw - num_noise + num_spans + 1, targets=num_noise + num_spans + 1,
                 num_noise=num_noise, num_spans=num_spans)


def lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> Lengths:
  """The longest raw chunk whose corrupted encoder input has at most `inputs_length` tokens, and its lengths."""
  if inputs_length < 3:
    raise ValueError(f"inputs_length={inputs_length} must be >= 3 (a token, a sentinel and EOS)")
  raw = 2
  while chunk_lengths(raw + 1, noise_density, mean_noise_span_length).inputs <= inputs_length:
    raw += 1
  return chunk_lengths(raw, noise_density, mean_noise_span_length)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths [num_segments] >= 1 summing to num_items, uniform over all such compositions."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:  # [L] bool, True = masked
  """T5's `random_spans_noise_mask`: exactly `num_noise` masked tokens in `num_spans` spans, separated by
  non-empty unmasked runs, the chunk starting unmasked. Span and run lengths are random compositions."""
  lens = chunk_lengths(length, noise_density, mean_noise_span_length)
  noise = _random_segmentation(lens.num_noise, lens.num_spans, rng)  # [N]
  keep = _random_segmentation(length - lens.num_noise, lens.num_spans, rng)  # [N]
  runs = np.stack([keep, noise], axis=1).reshape(-1)  # keep_0, noise_0, keep_1, noise_1, ...
  return np.repeat(np.tile([False, True], lens.num_spans), runs)


def sentinel_ids(vocab_size: int, num_sentinels: int) -> np.ndarray:  # [num_sentinels] int32
  """Sentinel k's id is `vocab_size + num_sentinels - 1 - k` (T5's extra ids, counted from the top)."""
  return (vocab_size + num_sentinels - 1 - np.arange(num_sentinels)).astype(np.int32)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray,
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs [Li], targets [Lo]) of `tokens` [L] with `noise_mask` [L]: each masked span becomes one sentinel
  in the inputs and, in the targets, the sentinel followed by the span; both end with EOS."""
  span_start = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])  # [L]
  span_index = np.cumsum(span_start) - 1  # [L] index of the span a masked token belongs to
  if span_start.sum() > len(sentinels):
    raise ValueError(f"{int(span_start.sum())} noise spans need more than the {len(sentinels)} sentinels")
  # Inputs: the unmasked tokens, and a sentinel where a span starts (its other tokens dropped).
  inputs = np.where(span_start, sentinels[np.maximum(span_index, 0)], tokens)[~noise_mask | span_start]
  # Targets: the mirror image, the masked tokens with each span's sentinel inserted before its first token.
  starts = np.flatnonzero(span_start[noise_mask])  # [N] positions among the masked tokens
  targets = np.insert(tokens[noise_mask], starts, sentinels[:len(starts)])
  eos = np.asarray([eos_id], np.int32)
  return np.concatenate([inputs.astype(np.int32), eos]), np.concatenate([targets.astype(np.int32), eos])


def reassemble(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
  """The original tokens of `corrupt`'s (inputs [Li], targets [Lo]), both ending with their EOS: each sentinel
  in the inputs replaced by the tokens that follow it in the targets. The inverse the tests check; not used in
  training. (A chunk of packed documents holds their EOS separators too, so only the last EOS is dropped.)"""
  is_sentinel = np.isin(targets[:-1], sentinels)
  bounds = np.append(np.flatnonzero(is_sentinel), len(targets) - 1)
  spans = {int(targets[start]): targets[start + 1:end] for start, end in zip(bounds[:-1], bounds[1:])}
  pieces = [spans[int(t)] if int(t) in spans else np.asarray([t]) for t in inputs[:-1]]
  return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros((0,), np.int32)
