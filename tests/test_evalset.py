"""The fixed evaluation set (moe_jax.evalset): what enters, how it is laid out, its fingerprint, and its scoring."""

from __future__ import annotations

import json
import math

from flax import nnx
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import evalset
from moe_jax import models
from moe_jax import train
from moe_jax.data import builders
from moe_jax.data import config as data_config
from moe_jax.data import tokenizers

BYTES = tokenizers.ByteTokenizer()
EOS = BYTES.eos_id


def documents(lengths=(0, 5, 31, 32, 33, 100, 257, 1000), seed=0) -> dict[str, np.ndarray]:
  """Byte-token documents of the given lengths (an empty one included), named by their index."""
  rng = np.random.default_rng(seed)
  return {f"doc{i:02d}.py": rng.integers(tokenizers.BYTE_OFFSET, BYTES.vocab_size, size=n).astype(np.int32)
          for i, n in enumerate(lengths)}


def build(docs, **overrides):
  kwargs = dict(tokenizer=BYTES, seq_len=16, cap_tokens=64, min_tokens=0)
  return evalset.build_eval_set(docs, **{**kwargs, **overrides})


class CharTokenizer:
  """One id per character (id = code point + 3): a stand-in for a tokenizer whose tokens are not bytes."""

  vocab_size, pad_id, eos_id = 0x110000 + 3, 0, 1

  def encode(self, text):
    return np.asarray([ord(c) + 3 for c in text], np.int32)

  def decode(self, ids):
    return "".join(chr(i - 3) for i in np.asarray(ids) if i >= 3)


# ---------------------------------------------------------------------------------------------
# What enters, and the rows.


def test_every_document_enters_whole_when_short_and_as_a_window_of_cap_targets_when_long():
  docs = documents()
  eval_set = build(docs)
  assert eval_set.names == tuple(sorted(docs))
  segments = evalset.document_segments(eval_set)
  for d, name in enumerate(eval_set.names):
    stream = np.concatenate([[EOS], docs[name], [EOS]])  # context EOS, then the document's targets and its EOS
    assert eval_set.lengths[d] == min(len(docs[name]) + 1, 64) >= 1
    offset = eval_set.offsets[d]
    np.testing.assert_array_equal(segments[name], stream[offset:offset + eval_set.lengths[d] + 1])
    if len(docs[name]) + 1 <= 64:
      assert offset == 0
  assert eval_set.num_tokens == sum(min(len(t) + 1, 64) for t in docs.values())
  np.testing.assert_array_equal(eval_set.document_bytes, eval_set.lengths)  # a byte token is a byte, EOS counts one


def test_each_row_holds_one_document_whose_targets_follow_their_inputs_and_padding_weighs_nothing():
  eval_set = build(documents())
  np.testing.assert_array_equal(eval_set.weights, eval_set.document >= 0)
  for row in range(len(eval_set.inputs)):
    ids = set(eval_set.document[row].tolist()) - {-1}
    assert len(ids) == 1
    real = eval_set.document[row] >= 0
    assert real[0] and np.all(real[:real.sum()])  # real targets first, padding after
    np.testing.assert_array_equal(eval_set.inputs[row, 1:real.sum()], eval_set.targets[row, :real.sum() - 1])
  rows_per_document = np.bincount([next(iter(set(r.tolist()) - {-1})) for r in eval_set.document])
  np.testing.assert_array_equal(rows_per_document, -(-eval_set.lengths // 16))


def test_a_windows_offset_depends_on_its_document_alone_not_on_the_others_or_their_order():
  docs = documents()
  full = build(docs)
  fewer = build({n: t for n, t in docs.items() if n != "doc06.py"})
  reordered = build(dict(reversed(list(docs.items()))))
  for name, segment in evalset.document_segments(fewer).items():
    np.testing.assert_array_equal(segment, evalset.document_segments(full)[name])
  assert reordered.fingerprint == full.fingerprint
  np.testing.assert_array_equal(reordered.inputs, full.inputs)


def test_the_fingerprint_follows_the_scored_text_and_every_parameter():
  docs = documents()
  base = build(docs)
  assert build(docs).fingerprint == base.fingerprint and len(base.fingerprint) == 64
  long = docs["doc07.py"]  # 1000 tokens, window of 64
  offset = int(base.offsets[base.names.index("doc07.py")])
  inside, outside = long.copy(), long.copy()
  inside[offset] = tokenizers.BYTE_OFFSET + (long[offset] - tokenizers.BYTE_OFFSET + 1) % 256
  outside_at = offset + 200 if offset + 200 < len(long) else offset - 200
  outside[outside_at] = tokenizers.BYTE_OFFSET + (long[outside_at] - tokenizers.BYTE_OFFSET + 1) % 256
  assert build({**docs, "doc07.py": inside}).fingerprint != base.fingerprint
  assert build({**docs, "doc07.py": outside}).fingerprint == base.fingerprint  # not scored, not fingerprinted
  for change in (dict(seq_len=8), dict(cap_tokens=63), dict(seed=1), dict(min_tokens=1)):
    assert build(docs, **change).fingerprint != base.fingerprint, change
  assert base.manifest()["fingerprint"] == base.fingerprint
  assert [row[0] for row in base.manifest()["documents"]] == list(base.names)


def test_a_subset_keeps_the_start_of_every_documents_window():
  docs = documents()
  eval_set = build(docs)
  subset = evalset.eval_subset(eval_set, tokenizer=BYTES, cap_tokens=20)
  assert subset.names == eval_set.names and subset.parameters["subset_of"] == eval_set.fingerprint
  np.testing.assert_array_equal(subset.lengths, np.minimum(eval_set.lengths, 20))
  whole = evalset.document_segments(eval_set)
  for name, segment in evalset.document_segments(subset).items():
    np.testing.assert_array_equal(segment, whole[name][:len(segment)])
  assert subset.fingerprint != eval_set.fingerprint


def test_bytes_count_the_utf8_of_the_targets_when_tokens_are_not_bytes():
  tokenizer = CharTokenizer()
  eval_set = evalset.build_eval_set({"a": tokenizer.encode("ééé"), "b": tokenizer.encode("é" * 50)},
                                    tokenizer=tokenizer, seq_len=8, cap_tokens=10, min_tokens=0)
  np.testing.assert_array_equal(eval_set.lengths, [4, 10])  # 'a' whole with its EOS; 'b' a window
  assert eval_set.document_bytes[0] == 3 * 2 + 1  # three 2-byte characters and the EOS
  ends_the_document = eval_set.offsets[1] == 51 - 10  # only then does the window hold the EOS
  assert eval_set.document_bytes[1] == (9 * 2 + 1 if ends_the_document else 10 * 2)


@pytest.mark.parametrize("overrides, message", [
    (dict(min_tokens=10_000), "fewer than min_tokens=10000: raise the cap, or hold out more documents"),
    (dict(seq_len=0), "seq_len=0 must be >= 1"),
    (dict(cap_tokens=0), "cap_tokens=0 must be >= 1"),
    (dict(min_tokens=-1), "min_tokens=-1 must be >= 0"),
])
def test_budgets_out_of_range_are_refused_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    build(documents(), **overrides)


def test_validation_documents_are_the_validation_files_tokenized(tmp_path):
  root = tmp_path / "corpus"
  root.mkdir()
  texts = {f"f{i}.txt": f"text {i} é " * (i + 1) for i in range(12)}
  for name, text in texts.items():
    (root / name).write_text(text, encoding="utf-8")
  cfg = data_config.default_data_config()
  cfg.update(dict(dataset="text_dir", text_dir=str(root), text_glob="*.txt", validation_fraction=0.3,
                  data_dir=str(tmp_path / "tfds")))
  docs = evalset.validation_documents(cfg)
  assert sorted(docs) == builders.split_files(sorted(texts), 0.3)["validation"]
  for name, tokens in docs.items():
    np.testing.assert_array_equal(tokens, BYTES.encode(texts[name]))
  eval_set = evalset.validation_eval_set(cfg, seq_len=16, cap_tokens=32, min_tokens=1)
  assert eval_set.fingerprint == build(docs, cap_tokens=32, min_tokens=1).fingerprint
  manifest = tmp_path / "eval_set.json"
  evalset.main(["--dataset=text_dir", f"--text_dir={root}", "--text_glob=*.txt", "--validation_fraction=0.3",
                f"--data_dir={tmp_path / 'tfds'}", "--seq_len=16", "--cap_tokens=32", "--min_tokens=1",
                f"--manifest={manifest}"])
  assert json.loads(manifest.read_text()) == eval_set.manifest()
  cfg.dataset = "lm1b"
  with pytest.raises(ValueError, match="data.dataset='lm1b': the fixed evaluation set is built from the files"):
    evalset.validation_documents(cfg)


# ---------------------------------------------------------------------------------------------
# Scoring.


def constant_rate_forward(batch):
  """A fake model: every target costs (its byte value + 1) / 64 nats, so each document's sum is known."""
  return (batch["targets"] - tokenizers.BYTE_OFFSET + 1) / 64.0


def test_per_document_losses_are_the_sums_of_their_targets_losses_at_any_batch_size():
  eval_set = build(documents())
  expected = np.asarray([np.sum((s[1:] - tokenizers.BYTE_OFFSET + 1) / 64.0)
                         for s in evalset.document_segments(eval_set).values()])
  for batch_size in (1, 3, 64):
    result = evalset.evaluate_documents(constant_rate_forward, eval_set, batch_size=batch_size, resamples=50)
    np.testing.assert_allclose(result.per_document, expected, rtol=1e-12)
    assert result.mean == pytest.approx(expected.sum() / eval_set.num_tokens)
    assert result.bits_per_byte == pytest.approx(result.mean / math.log(2))  # byte tokens: one byte per target
    assert result.interval.low <= result.mean <= result.interval.high
    np.testing.assert_array_equal(result.tokens, eval_set.lengths)


def test_a_forward_fn_returning_the_wrong_shape_is_refused():
  with pytest.raises(ValueError, match=r"per-token losses must be \[B, L\] = \(4, 16\)"):
    evalset.evaluate_documents(lambda batch: batch["targets"][:, :1], build(documents()), batch_size=4)


def test_comparing_a_run_with_itself_shifted_by_c_per_token_gives_c_and_other_sets_are_refused():
  eval_set = build(documents())
  a = evalset.evaluate_documents(lambda b: constant_rate_forward(b) + 0.5, eval_set, batch_size=8, resamples=50)
  b = evalset.evaluate_documents(constant_rate_forward, eval_set, batch_size=8, resamples=50)
  gap = evalset.compare_documents([a, a], [b, b], resamples=50)
  assert gap.mean == pytest.approx(0.5) and gap.low == pytest.approx(0.5) and gap.high == pytest.approx(0.5)
  other = evalset.evaluate_documents(constant_rate_forward, build(documents(), seq_len=8), batch_size=8)
  with pytest.raises(ValueError, match="scored on 2 different evaluation sets"):
    evalset.compare_documents(a, other)
  with pytest.raises(ValueError, match=r"scored at batch sizes \[4, 8\]"):
    evalset.compare_documents(a, evalset.evaluate_documents(constant_rate_forward, eval_set, batch_size=4))


def test_a_tiny_models_score_is_the_trainers_cross_entropy_over_the_same_rows():
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2, max_seq_len=16))
  config.moe.num_experts = 4
  with nnx.use_eager_sharding(False):
    model = models.build(config_lib.model_config(config, vocab_size=BYTES.vocab_size), rngs=nnx.Rngs(0))
  eval_set = build(documents(lengths=(3, 40, 90)))
  result = evalset.evaluate_documents(evalset.token_cross_entropy_fn(model), eval_set, batch_size=4)
  total = count = 0.0
  eval_step = nnx.jit(train.eval_step)
  for _, batch in evalset.eval_batches(eval_set, 4):
    ce_sum, weight_sum = eval_step(model, batch)
    total, count = total + float(ce_sum), count + float(weight_sum)
  assert count == eval_set.num_tokens
  assert result.mean == pytest.approx(total / count, rel=1e-5)
  assert math.log(BYTES.vocab_size) * 0.8 < result.mean < math.log(BYTES.vocab_size) * 1.2  # untrained: ~uniform
  record = result.record()
  assert record["fingerprint"] == eval_set.fingerprint and len(record["documents"]) == 3
