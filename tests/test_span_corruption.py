"""T5 span corruption (moe_jax.data.span_corruption) and its grain transform: corrupted inputs and targets
reassemble into the original text, the masks have T5's exact noise density and span counts, span lengths
average the configured mean, and the pipeline's batches have fixed shapes and resume exactly."""

import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax.data import span_corruption, tokenizers

TOKENIZER = tokenizers.ByteTokenizer()
SENTINELS = span_corruption.sentinel_ids(TOKENIZER.vocab_size, 100)
TEXT = ('def reassemble(inputs, targets):\n    """Each sentinel stands for the span after it in the targets."""\n'
        "    return [t for t in inputs]  # naïve: non-ASCII bytes are ids too\n") * 4


def test_t5_lengths_512_inputs_take_568_tokens_and_give_114_targets():
  lengths = span_corruption.lengths(512, 0.15, 3.0)
  assert (lengths.raw, lengths.inputs, lengths.targets, lengths.num_noise, lengths.num_spans) == (568, 512, 114, 85, 28)


@pytest.mark.parametrize("seed", range(5))
def test_corrupted_inputs_and_targets_reassemble_into_the_original_text(seed):
  tokens = TOKENIZER.encode(TEXT)
  mask = span_corruption.random_spans_noise_mask(len(tokens), 0.15, 3.0, np.random.default_rng(seed))
  inputs, targets = span_corruption.corrupt(tokens, mask, SENTINELS, TOKENIZER.eos_id)
  assert TOKENIZER.decode(span_corruption.reassemble(inputs, targets, SENTINELS)) == TEXT
  lengths = span_corruption.chunk_lengths(len(tokens), 0.15, 3.0)
  assert (len(inputs), len(targets)) == (lengths.inputs, lengths.targets)
  # Sentinels in order from the top id, one per span, in both sequences.
  used = SENTINELS[:lengths.num_spans]
  np.testing.assert_array_equal(inputs[np.isin(inputs, SENTINELS)], used)
  np.testing.assert_array_equal(targets[np.isin(targets, SENTINELS)], used)
  assert targets[0] == SENTINELS[0] == TOKENIZER.vocab_size + 99


def test_noise_density_and_span_count_are_exact_and_spans_average_the_mean_length():
  rng = np.random.default_rng(0)
  length, span_lengths = 568, []
  for _ in range(200):
    mask = span_corruption.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert mask.sum() == 85 and not mask[0]  # round(568 * 0.15) masked; the chunk starts unmasked
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
    assert len(starts) == 28  # round(85 / 3) spans, never merged: unmasked runs between them are non-empty
    span_lengths += (ends - starts + 1).tolist()
  spans = np.asarray(span_lengths)
  assert spans.min() >= 1 and spans.mean() == pytest.approx(85 / 28)
  # A uniform composition of 85 into 28 parts: span lengths are roughly geometric, P(1) ~ 27/84.
  assert np.mean(spans == 1) == pytest.approx(27 / 84, abs=0.03)


def test_masks_are_random_across_draws_and_fixed_by_the_generator():
  draw = lambda seed: span_corruption.random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(seed))  # noqa: E731
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.array_equal(draw(1), draw(2))


def test_pipeline_batches_have_fixed_shapes_reassemble_and_resume_exactly():
  cfg = {"objective": "span_corruption"}  # the embedded stdlib corpus, in the default cache
  iterator = data_lib.create_iterator(cfg, split="train", batch_size=4, seq_len=64, seed=0)
  lengths = span_corruption.lengths(64, 0.15, 3.0)
  batch = next(iterator)
  assert batch["inputs"].shape == (4, 64) and batch["targets"].shape == (4, lengths.targets)
  np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
  assert np.all(batch["decoder_inputs"][:, 0] == TOKENIZER.pad_id) and np.all(batch["weights"] == 1)
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    assert len(span_corruption.reassemble(inputs, targets, SENTINELS)) == lengths.raw
  state = iterator.get_state()
  following = next(iterator)
  iterator.set_state(state)
  resumed = next(iterator)
  for key in following:
    np.testing.assert_array_equal(following[key], resumed[key])
  assert data_lib.pipeline.model_vocab_size(cfg) == 259 + 100


def test_too_few_sentinels_are_refused_naming_the_field():
  from moe_jax import config_lib

  config = config_lib.default_config()
  config.model.update(dict(architecture="encoder_decoder", positions="relative"))
  config.data.update(dict(objective="span_corruption", num_sentinels=5))
  with pytest.raises(ValueError, match="data.num_sentinels=5 must be >= the 7 noise spans of a train.seq_len=128"):
    config_lib.validate(config)


def test_two_processes_see_the_rows_of_the_one_process_batch():
  """Each chunk's mask depends on its place in the global batch only, so two processes (each half the rows)
  produce exactly the single-process batch, as the causal-LM pipeline does."""
  cfg = {"objective": "span_corruption"}
  whole = data_lib.create_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=3)
  halves = [data_lib.create_iterator(cfg, split="train", batch_size=2, seq_len=32, seed=3, shard_index=i,
                                     shard_count=2) for i in range(2)]
  for _ in range(2):
    batch, parts = next(whole), [next(h) for h in halves]
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
