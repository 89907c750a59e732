"""The routing analyses (moe_jax.analysis) on constructed traces whose answers are known, and the trace file."""

import numpy as np
import pytest

from moe_jax import analysis, stats


def _choices(*rows):
  """expert_index [N, 1, K] and an all-True selected mask from rows of expert ids (one block)."""
  index = np.asarray(rows, np.int16)[:, None, :]
  return index, np.ones(index.shape, bool)


def test_load_counts_selected_and_kept_assignments_and_their_drops():
  index, selected = _choices([0, 1], [0, 2], [0, 1], [3, 1])
  kept = selected.copy()
  kept[2, 0, 0] = False  # one of expert 0's three assignments dropped
  kept[3, 0, :] = False  # the last token dropped whole
  load = analysis.expert_load(index, selected, kept, num_experts=4)
  np.testing.assert_allclose(load.selected_share, [[3 / 8, 3 / 8, 1 / 8, 1 / 8]])
  np.testing.assert_allclose(load.kept_share, [[2 / 5, 2 / 5, 1 / 5, 0]])
  np.testing.assert_allclose(load.expert_drop_rate, [[1 / 3, 1 / 3, 0, 1]])
  np.testing.assert_allclose(load.assignment_drop_rate, [3 / 8])
  np.testing.assert_allclose(load.token_drop_rate, [1 / 4])


def test_padding_tokens_are_left_out_of_the_load():
  index, selected = _choices([0], [1], [1])
  load = analysis.expert_load(index, selected, selected, 2, valid=np.array([True, True, False]))
  np.testing.assert_allclose(load.selected_share, [[0.5, 0.5]])


def test_an_expert_without_tokens_is_dead_and_one_with_three_fair_shares_is_overloaded():
  dead, over = analysis.dead_and_overloaded(np.array([[0.0, 0.75, 0.125, 0.125]]))
  np.testing.assert_array_equal(dead, [[True, False, False, False]])
  np.testing.assert_array_equal(over, [[False, True, False, False]])


def test_saturation_is_the_share_of_final_top_k_experts_already_chosen():
  final, selected = _choices([0, 1], [2, 3], [0, 3], [1, 2])
  at_t, _ = _choices([1, 0], [2, 0], [1, 2], [1, 2])  # shares 2/2, 1/2, 0/2, 2/2; order within top-k is ignored
  np.testing.assert_allclose(analysis.router_saturation(at_t, selected, final, selected), [5 / 8])
  np.testing.assert_allclose(analysis.router_saturation(final, selected, final, selected), [1.0])


def test_coactivation_is_the_share_of_expert_i_tokens_also_routed_to_j():
  index, selected = _choices([0, 1], [0, 1], [0, 2], [1, 2])
  matrix = analysis.coactivation(index[:, 0], selected[:, 0], 3)
  np.testing.assert_allclose(matrix, [[0, 2 / 3, 1 / 3], [2 / 3, 0, 1 / 3], [1 / 2, 1 / 2, 0]])


def test_consistency_is_one_when_a_later_block_relabels_the_experts_and_k_over_e_when_independent():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 4, size=(4000, 1))
  selected = np.ones_like(a, bool)
  matrix, summary = analysis.routing_consistency(a, selected, (a + 1) % 4, selected, 4)
  np.testing.assert_allclose(matrix, np.roll(np.eye(4), 1, axis=1))
  assert summary == 1.0
  _, independent = analysis.routing_consistency(a, selected, rng.integers(0, 4, size=(4000, 1)), selected, 4)
  assert independent == pytest.approx(0.25, abs=0.03)


def test_an_expert_taking_only_digits_is_far_from_uniform_and_a_label_blind_router_is_not():
  rng = np.random.default_rng(0)
  documents = np.repeat(np.arange(40), 50)  # 40 documents of 50 tokens
  label = rng.integers(0, 2, size=documents.shape)  # 0: letter, 1: digit
  specialised = np.where(label == 1, 0, rng.integers(1, 4, size=label.shape))[:, None]  # digits -> expert 0 only
  selected = np.ones_like(specialised, bool)
  result = analysis.specialisation(specialised, selected, label, documents, 2, 4, resamples=200)
  np.testing.assert_allclose(result.share[1], [1, 0, 0, 0])  # every digit goes to expert 0
  assert result.uniform == 0.25
  overall_digits = np.mean(label == 1)
  assert result.distance[0] == pytest.approx(1 - overall_digits)  # P(digit | e=0) = 1
  assert result.distance_low[0] > 0.3 and result.distance_high[1] >= result.distance[1] >= result.distance_low[1]
  assert result.share_low[0, 1] <= result.share[0, 1] <= result.share_high[0, 1]
  blind = analysis.specialisation(rng.integers(0, 4, size=(len(label), 1)), selected, label, documents, 2, 4,
                                  resamples=200)
  assert np.all(blind.distance < 0.05)
  assert np.all((blind.share_low < 0.25) & (blind.share_high > 0.25))  # every interval holds k / E


def test_specialisation_share_interval_is_the_document_bootstrap_of_its_counts():
  documents = np.repeat(np.arange(5), 4)
  index = (np.arange(20) % 3)[:, None]
  label = np.zeros(20, int)
  result = analysis.specialisation(index, np.ones_like(index, bool), label, documents, 1, 3, resamples=50)
  routed = np.bincount(documents[index[:, 0] == 2], minlength=5)
  expected = stats.document_bootstrap(routed, np.full(5, 4.0), resamples=50)
  assert (result.share[0, 2], result.share_low[0, 2], result.share_high[0, 2]) == (
      expected.mean, expected.low, expected.high)


def test_top_tokens_ranks_each_experts_tokens_by_count_with_their_share():
  tokens = np.array([5, 5, 5, 7, 7, 9])
  index = np.array([[0], [0], [1], [0], [1], [1]])
  top = analysis.top_tokens(tokens, index, np.ones_like(index, bool), 2, n=3)
  np.testing.assert_array_equal(top.token_ids, [[5, 7, -1], [5, 7, 9]])
  np.testing.assert_array_equal(top.counts, [[2, 1, 0], [1, 1, 1]])
  np.testing.assert_allclose(top.share[0, :2], [2 / 3, 1 / 2])


def test_byte_classes_of_letters_digits_space_punctuation_and_utf8():
  ids = np.frombuffer("a1 ,é".encode(), np.uint8).astype(np.int32) + 3
  names = [analysis.BYTE_CLASSES[c] for c in analysis.byte_classes(np.append(ids, [0, 1]), 3)]
  assert names == ["letter", "digit", "whitespace", "punctuation", "non_ascii", "non_ascii", "special", "special"]


@pytest.mark.parametrize("path, label", [("Lib/json/decoder.py", "code"), ("test/test_json/test_fail.py", "tests"),
                                         ("test_x.py", "tests"), ("README.md", "docs"), ("Doc/howto.txt", "docs"),
                                         ("notes/story.txt", "prose")])
def test_source_label_of_a_path(path, label):
  assert analysis.source_label(path) == label


def test_ablations_are_ranked_by_the_loss_they_add():
  ranked = analysis.rank_ablations(2.0, np.array([[2.1, 2.5], [1.9, 2.3]]), blocks=[1, 3])
  assert [(r.block, r.expert) for r in ranked] == [(1, 1), (3, 1), (1, 0), (3, 0)]
  assert ranked[0].delta == pytest.approx(0.5)
  with pytest.raises(ValueError, match="losses must be"):
    analysis.rank_ablations(2.0, np.zeros((3, 2)), blocks=[1, 3])


def _trace(n=6):
  index, selected = _choices(*([[0, 1], [1, 2], [2, 0]] * (n // 3)))
  kept = selected.copy()
  kept[0, 0, 1] = False
  return analysis.Trace(
      token_ids=np.arange(n, dtype=np.int32), document=np.array([0, 0, 1, 1, 1, -1][:n], np.int32),
      expert_index=index, gate=np.where(kept, 0.5, 0.0).astype(np.float32), slot=np.zeros_like(index),
      selected=selected, kept=kept,
      entropy=np.full((n, 1), 0.7, np.float32), blocks=np.array([1], np.int32), document_names=("a.py", "b.md"),
      document_labels=np.array([0, 2], np.int8), label_names=analysis.SOURCE_LABELS,
      meta={"num_experts": 3, "routers": ["top_k"]})


def test_an_ablation_costing_every_document_alike_has_a_point_interval_and_one_costing_one_document_does_not():
  tokens = np.full(4, 10.0)  # D = 4 documents of 10 targets
  nats = np.array([3.0, 5.0, 7.0, 9.0])
  ablated = np.stack([nats + 0.5 * tokens, nats + np.array([4.0, 0, 0, 0]), nats])[None]  # [NB = 1, E = 3, D]
  low, high = analysis.ablation_intervals(nats, ablated, tokens)
  np.testing.assert_allclose([low[0, 0], high[0, 0]], [0.5, 0.5])  # +0.5 nats per token in every document
  assert low[0, 1] == 0.0 and 0.1 < high[0, 1] <= 0.4  # mean +0.1, all of it from document 0 (out of ~32% resamples)
  np.testing.assert_allclose([low[0, 2], high[0, 2]], [0.0, 0.0])
  with pytest.raises(ValueError, match="ablated must be"):
    analysis.ablation_intervals(nats, ablated[0], tokens)


def test_a_trace_reads_back_as_written(tmp_path):
  trace = _trace()
  analysis.write_trace(tmp_path / "t.npz", trace)
  back = analysis.read_trace(tmp_path / "t.npz")
  for name in ("token_ids", "document", "expert_index", "gate", "slot", "selected", "kept", "entropy", "blocks",
               "document_labels"):
    np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
  assert back.document_names == trace.document_names and back.meta == trace.meta
  np.testing.assert_array_equal(back.token_labels, [0, 0, 2, 2, 2, -1])
  np.testing.assert_array_equal(back.dropped[:, 0], [False] * 6)
  assert not list(tmp_path.glob(".*"))  # the atomic writer left no temporary file


def test_a_malformed_trace_is_refused_naming_the_array(tmp_path):
  trace = _trace()
  bad = analysis.Trace(**{**trace.__dict__, "gate": trace.gate[:, :, :1]})
  with pytest.raises(ValueError, match="gate"):
    analysis.write_trace(tmp_path / "t.npz", bad)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a router trace"):
    analysis.read_trace(tmp_path / "junk.npz")
