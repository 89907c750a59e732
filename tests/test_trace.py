"""Router traces of models (moe_jax.tracing, experiments/trace.py): the recorded choices are the router's, recomputed
from its parameters; every router family records what it does; replaying a model's own trace gives its logits and
another routing does not; removing an expert costs what its tokens lose; a run's checkpoint traces end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import analysis, config_lib, evalset, models, parallel, routing, runstate, tracing
from moe_jax.data import tokenizers
from tests.helpers import REPO, cpu_env, write_run

BYTES = tokenizers.ByteTokenizer()


def _config(architecture="decoder", **moe):
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2, max_seq_len=16))
  config.moe.update(dict(num_experts=4, **moe))
  config.train.update(dict(batch_size=4, seq_len=16))
  if architecture == "encoder_decoder":
    config.model.update(dict(architecture="encoder_decoder", positions="relative", num_decoder_layers=2))
    config.data.objective = "span_corruption"
  return config


def _model(config):
  with nnx.use_eager_sharding(False):
    return models.build(config_lib.model_config(config, vocab_size=BYTES.vocab_size + 100), rngs=nnx.Rngs(0))


def _tokens(batch=2, length=16):
  return jax.random.randint(jax.random.key(1), (batch, length), 3, BYTES.vocab_size)


# The decoder most tests share: top-2 (GShard) at an evaluation capacity factor of 1, so some choices drop.
TOP2 = dict(router="top_k", top_k=dict(k=2), eval_capacity_factor=1.0)


@pytest.fixture(scope="module")
def top2():
  return _model(_config(**TOP2))


@nnx.jit
def _moe_input(model, tokens):
  """The input of MoE block 1 recomputed by hand: block 0, then block 1's attention and FFN norm."""
  x, _ = model.blocks[0](model.embed(tokens), deterministic=True)
  block = model.blocks[1]
  return block.ffn_norm(x + block.attention(block.attention_norm(x), deterministic=True))


def test_a_trace_holds_the_top_k_experts_of_the_router_kernel_and_their_probabilities(top2):
  tokens = _tokens()
  blocks, record = tracing.routing_record(top2, tokens)
  assert blocks.tolist() == [1]
  h = np.asarray(_moe_input(top2, tokens), np.float64).reshape(-1, 32)  # [B * L, M]
  logits = h @ np.asarray(top2.blocks[1].ffn.router[...], np.float64)  # [B * L, E]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[:, :2]
  np.testing.assert_array_equal(record["expert_index"][:, 0], top)
  kept = record["kept"][:, 0]
  assert 0 < kept.mean() < 1  # capacity dropped some choices
  np.testing.assert_allclose(record["gate"][:, 0], np.where(kept, np.take_along_axis(probs, top, -1), 0.0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(record["entropy"][:, 0], -np.sum(probs * np.log(probs), -1), rtol=1e-4)
  assert record["selected"].all()


# Besides top-2 (the fixture): a router reading token ids, Phi-3.5-MoE's sparsemixer and an encoder routing by expert
# choice (slow tier: one more model compiled each, ~10 s on 2 busy cores).
ROUTED = {
    "top_k": None,
    "hash": ("decoder", dict(router="hash")),
    "sparsemixer": ("decoder", dict(router="sparsemixer")),
    "expert_choice": ("encoder_decoder", dict(router="expert_choice", decoder_router="switch")),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if ROUTED[n] else []) for n in ROUTED])
def test_replaying_a_models_own_routing_gives_its_logits_and_another_routing_does_not(name, top2):
  model = _model(_config(ROUTED[name][0], **ROUTED[name][1])) if ROUTED[name] else top2
  tokens = _tokens()
  blocks, record = tracing.routing_record(model, tokens)
  layers = tracing.moe_layers(model)
  forced = {}
  for i, b in enumerate(blocks.tolist()):
    k = tracing.choices_of(layers[b])
    forced[b] = {"expert_index": record["expert_index"][:, i, :k], "slot": record["slot"][:, i, :k],
                 "combine_weight": record["gate"][:, i, :k], "kept": record["kept"][:, i, :k]}
  plain, _ = tracing.replay(model, tokens, {})
  replayed, _ = tracing.replay(model, tokens, forced)
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(plain), rtol=1e-5, atol=1e-6)
  moved = {b: {**f, "expert_index": (f["expert_index"] + 1) % 4} for b, f in forced.items()}
  other, _ = tracing.replay(model, tokens, moved)
  assert float(jnp.max(jnp.abs(other - plain))) > 1e-3
  assert all(layer.forced_routing is None for layer in layers.values())  # the replay leaves no routing behind


@pytest.mark.slow  # two encoder-decoders compiled (~15 s on 2 busy cores)
def test_expert_choice_records_the_tokens_each_expert_picked_and_soft_moe_its_weight_per_expert():
  model = _model(_config("encoder_decoder", router="soft_moe", dispatch="einsum", decoder_router="top_k",
                         soft_moe=dict(slots_per_expert=2)))
  blocks, record = tracing.routing_record(model, _tokens())
  soft = record["gate"][:, 0]  # encoder block 1: Soft MoE, K = E
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.diff(soft, axis=-1) <= 0) and record["kept"][:, 0].all()  # experts by weight, descending
  assert np.all(record["entropy"][:, 0] <= np.log(4) + 1e-5)
  assert not record["selected"][:, 1, 2:].any()  # the decoder's top-2 padded to K = 4, padding not selected
  with pytest.raises(ValueError, match="Soft MoE"):
    tracing.replay(model, _tokens(), {1: {}})

  model = _model(_config("encoder_decoder", router="expert_choice", decoder_router="switch"))
  blocks, record = tracing.routing_record(model, _tokens())
  picked = record["kept"][:, 0].reshape(2, 16, 4)  # [B, L, K]: each sequence is a group
  capacity = routing.compute_capacity(16, 4, model.encoder[1].ffn.config.eval_capacity_factor)
  for row in range(2):
    counts = np.bincount(record["expert_index"][:, 0].reshape(2, 16, 4)[row][picked[row]], minlength=4)
    np.testing.assert_array_equal(counts, capacity)  # every expert picked exactly C tokens of the group
  np.testing.assert_array_equal(record["selected"][:, 0], record["kept"][:, 0])
  assert np.all(record["kept"][:, 0, :-1] >= record["kept"][:, 0, 1:])  # picked experts first


def _eval_set(lengths=(20, 45, 9)):
  rng = np.random.default_rng(0)
  names = ("Lib/a.py", "test/test_b.py", "Doc/c.rst")
  docs = {n: rng.integers(3, BYTES.vocab_size, size=k).astype(np.int32) for n, k in zip(names, lengths)}
  return evalset.build_eval_set(docs, tokenizer=BYTES, seq_len=16, cap_tokens=64, min_tokens=0)


def test_a_traced_eval_set_replays_batch_by_batch_and_labels_its_documents(tmp_path, top2):
  model = top2
  eval_set = _eval_set()
  labels = [analysis.source_label(n) for n in eval_set.names]
  trace = tracing.trace_eval_set(model, eval_set, batch_size=2, document_labels=labels, max_tokens=48)
  assert len(trace.token_ids) == 48  # three whole rows
  np.testing.assert_array_equal(trace.token_ids, eval_set.inputs[:3].reshape(-1))
  analysis.write_trace(tmp_path / "t.npz", trace)
  trace = analysis.read_trace(tmp_path / "t.npz")
  assert [trace.label_names[i] for i in trace.document_labels] == labels
  assert trace.meta["choices"] == [2] and trace.meta["routers"] == ["top_k"]
  rows = np.asarray(eval_set.inputs[:2])
  plain, _ = tracing.replay(model, jnp.asarray(rows), {})
  replayed, _ = tracing.replay(model, jnp.asarray(rows), tracing.forced_from_trace(trace, slice(0, 32)))
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_removing_an_expert_costs_nothing_when_it_takes_no_token_and_something_when_it_does(top2):
  model = top2
  eval_set = _eval_set()
  base, losses, blocks = tracing.ablation_losses(model, eval_set, batch_size=4)
  expected = evalset.evaluate_documents(evalset.token_cross_entropy_fn(model), eval_set, batch_size=4)
  assert base == pytest.approx(expected.mean, rel=1e-5)
  nats, ablated, tokens, _ = tracing.ablation_nats(model, eval_set, batch_size=4)
  np.testing.assert_allclose(nats, expected.per_document, rtol=1e-5)  # per document, as the evaluation sums them
  np.testing.assert_allclose(ablated.sum(-1) / tokens.sum(), losses, rtol=1e-12)
  trace = tracing.trace_eval_set(model, eval_set, batch_size=4, document_labels=["code"] * 3)
  load = analysis.expert_load(trace.expert_index, trace.selected, trace.kept, 4)
  used = load.kept_share[0] > 0
  assert blocks.tolist() == [1] and used.any()
  np.testing.assert_allclose(losses[0, ~used], base, rtol=1e-6)
  assert np.all(np.abs(losses[0, used] - base) > 1e-6)


def test_next_choice_sends_a_removed_experts_tokens_to_their_next_expert_and_reclaims_capacity():
  """Four tokens, three experts, capacity 2, Switch: tokens 0, 1, 3 chose expert 0 (token 3 dropped), token 2 expert 1.
  Without expert 0: token 0 -> 1 (slot 0), token 1 -> 2 (slot 0), token 2 stays at 1 (slot 1), token 3 -> 1 (slot 2:
  dropped), each weighted by its router probability."""
  probs = np.array([[[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.7, 0.2, 0.1]]], np.float32)
  route = routing.switch_route(jnp.log(jnp.asarray(probs)), expert_capacity=2)
  np.testing.assert_array_equal(np.asarray(route.kept)[0, :, 0], [True, True, True, False])
  moved = tracing.next_choice(route, 0)
  np.testing.assert_array_equal(moved["expert_index"][0, :, 0], [1, 2, 1, 1])
  np.testing.assert_array_equal(moved["kept"][0, :, 0], [True, True, True, False])
  np.testing.assert_array_equal(moved["slot"][0, :3, 0], [0, 0, 1])
  np.testing.assert_allclose(moved["combine_weight"][0, :, 0], [0.3, 0.4, 0.7, 0.0], rtol=1e-6)
  unused = tracing.next_choice(route, 2)  # nobody chose expert 2: nothing changes
  for name in ("expert_index", "kept", "combine_weight"):
    np.testing.assert_allclose(unused[name], np.asarray(getattr(route, name)), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_next_choice_routes_as_the_router_does_with_the_experts_logit_at_minus_infinity(k):
  logits = jax.random.normal(jax.random.key(4), (3, 16, 5))
  route = routing.top_k_route(logits, k=k, capacity_factor=1.0)
  for expert in range(5):
    moved = tracing.next_choice(route, expert)
    masked = routing.top_k_route(logits.at[..., expert].set(-jnp.inf), k=k, capacity_factor=1.0)
    np.testing.assert_array_equal(moved["expert_index"], np.asarray(masked.expert_index))
    np.testing.assert_array_equal(moved["kept"], np.asarray(masked.kept))
    np.testing.assert_array_equal(np.where(moved["kept"], moved["slot"], 0), np.asarray(masked.slot))
    unnormalised = np.take_along_axis(np.asarray(route.router_probs), moved["expert_index"], -1)
    np.testing.assert_allclose(moved["combine_weight"], np.where(moved["kept"], unnormalised, 0.0), rtol=1e-6)


def test_next_choice_refuses_weights_that_are_not_the_router_probabilities():
  logits = jax.random.normal(jax.random.key(5), (1, 8, 4))
  with pytest.raises(ValueError, match="combine weights equal to the router probabilities"):
    tracing.next_choice(routing.top_k_route(logits, k=2, capacity_factor=2.0, renormalize=True), 0)


def test_sending_an_experts_tokens_to_their_next_choice_costs_nothing_when_it_takes_none(top2):
  eval_set = _eval_set()
  base, residual, _ = tracing.ablation_losses(top2, eval_set, batch_size=4)
  _, moved, _ = tracing.ablation_losses(top2, eval_set, batch_size=4, removal="next_choice")
  trace = tracing.trace_eval_set(top2, eval_set, batch_size=4, document_labels=["code"] * 3)
  used = analysis.expert_load(trace.expert_index, trace.selected, trace.kept, 4).selected_share[0] > 0
  assert used.any()
  np.testing.assert_allclose(moved[0, ~used], base, rtol=1e-6)
  assert np.all(np.abs(moved[0, used] - residual[0, used]) > 1e-6)  # another expert took the tokens
  with pytest.raises(ValueError, match="removal='both' must be one of"):
    tracing.ablation_losses(top2, eval_set, batch_size=4, removal="both")


# Experts split over 'expert' (all-to-all) in the slow tier: one more 8-device compile (~50 s on 2 busy cores).
@pytest.mark.parametrize("expert_axis", [1, pytest.param(4, marks=pytest.mark.slow)], ids=["data8", "data2_expert4"])
def test_under_an_8_device_mesh_replaying_a_models_own_routing_gives_its_logits(expert_axis):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  config = _config(**TOP2)
  tokens = _tokens(batch=8)  # 8 routing groups (one per row): one per device
  with parallel.mesh_context(parallel.create_mesh(8 // expert_axis, expert_axis)):
    model = models.build(config_lib.model_config(config, vocab_size=BYTES.vocab_size + 100), rngs=nnx.Rngs(0))
    plain, _ = tracing.replay(model, tokens, {})
    blocks, record = tracing.routing_record(model, tokens)
    forced = {b: {"expert_index": record["expert_index"][:, i], "slot": record["slot"][:, i],
                  "combine_weight": record["gate"][:, i], "kept": record["kept"][:, i]}
              for i, b in enumerate(blocks.tolist())}
    replayed, _ = tracing.replay(model, tokens, forced)
    moved = {b: {**f, "expert_index": (f["expert_index"] + 1) % 4} for b, f in forced.items()}
    other, _ = tracing.replay(model, tokens, moved)
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(plain), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(other - plain))) > 1e-3


def test_a_scanned_model_is_refused_with_the_conversion_to_use():
  config = _config(**TOP2)
  config.model.scan_layers = True
  with pytest.raises(ValueError, match="scan_layers=True: trace the unscanned model"):
    tracing.routing_record(_model(config), _tokens())


def _text_files(root):
  for path, text in (("pkg/mod.py", "def f(x):\n  return x + 1\n" * 3), ("tests/test_mod.py", "assert f(1) == 2\n"),
                     ("README.md", "# Title\nSome words, 42.\n")):
    os.makedirs(os.path.dirname(os.path.join(root, path)) or root, exist_ok=True)
    with open(os.path.join(root, path), "w") as f:
      f.write(text)
  return os.path.join(root, "**", "*.*")


def test_a_runs_checkpoint_traces_end_to_end_from_its_files(tmp_path):
  workdir = str(tmp_path / "run")
  write_run(workdir, _config(**TOP2))
  run = runstate.load(workdir)
  texts = tracing.read_text_files(_text_files(str(tmp_path / "text")))
  assert sorted(texts) == ["README.md", "pkg/mod.py", "tests/test_mod.py"]
  trace = tracing.trace_documents(run.model, {n: BYTES.encode(t) for n, t in texts.items()}, tokenizer=BYTES,
                                  seq_len=16, cap_tokens=64, batch_size=4, meta={"step": run.step})
  labels = dict(zip(trace.document_names, (trace.label_names[i] for i in trace.document_labels)))
  assert labels == {"README.md": "docs", "pkg/mod.py": "code", "tests/test_mod.py": "tests"}
  classes = analysis.byte_classes(trace.token_ids[trace.valid], tokenizers.BYTE_OFFSET)
  assert set(np.unique(classes)) >= {analysis.BYTE_CLASSES.index(c) for c in ("letter", "digit", "whitespace")}
  assert trace.meta["step"] == 3 and trace.num_experts == 4


@pytest.mark.slow  # a subprocess: JAX imported and the model compiled once more (~15 s on 2 cores)
def test_the_trace_command_writes_a_trace_of_every_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  write_run(workdir, _config("encoder_decoder"))
  output = str(tmp_path / "trace-{step}.npz")
  result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "trace.py"), f"--workdir={workdir}",
                           f"--text_glob={_text_files(str(tmp_path / 'text'))}", f"--output={output}", "--steps=all",
                           "--max_tokens=64", f"--ablations={tmp_path / 'ablations.json'}", "--ablation_tokens=32"],
                          capture_output=True, text=True, env=cpu_env(1), timeout=300)
  assert result.returncode == 0, result.stderr
  trace = analysis.read_trace(output.format(step=3))
  assert trace.blocks.tolist() == [1, 3] and len(trace.token_ids) == 64  # encoder block 1, decoder block 1
  record = json.loads((tmp_path / "ablations.json").read_text())
  assert record["step"] == 3 and record["blocks"] == [1, 3] and set(record["removals"]) == set(tracing.REMOVALS)
  for removal in record["removals"].values():
    assert np.shape(removal["losses"]) == (2, 4) and len(removal["ranking"]) == 8
    deltas = [entry["delta"] for entry in removal["ranking"]]
    assert deltas == sorted(deltas, reverse=True)


def _constructed_trace(step, rng):
  """A trace of 3 documents x 32 byte tokens, 2 MoE blocks, top-2 of 4 experts: digits prefer expert 0."""
  text = b"def f(x):\n  return x + 1  # 42\n" * 4
  tokens = (np.frombuffer(text[:96], np.uint8).astype(np.int32) + tokenizers.BYTE_OFFSET)
  digit = analysis.byte_classes(tokens, tokenizers.BYTE_OFFSET) == analysis.BYTE_CLASSES.index("digit")
  first = np.where(digit, 0, rng.integers(1, 4, size=96))
  index = np.stack([first, (first + 1 + rng.integers(0, 3, size=96)) % 4], -1)  # [N, K] two distinct experts
  index = np.stack([index, (index + step) % 4], 1).astype(np.int16)  # [N, NB, K]
  selected = np.ones(index.shape, bool)
  kept = selected & (rng.random(index.shape) > 0.05)
  return analysis.Trace(
      token_ids=tokens, document=np.repeat(np.arange(3), 32).astype(np.int32), expert_index=index,
      gate=np.where(kept, 0.5, 0.0).astype(np.float32), slot=np.zeros_like(index), selected=selected, kept=kept,
      entropy=np.full(index.shape[:2], 1.0, np.float32), blocks=np.array([1, 3], np.int32),
      document_names=("a.py", "test/test_a.py", "README.md"), document_labels=np.array([0, 1, 2], np.int8),
      label_names=analysis.SOURCE_LABELS, meta={"num_experts": 4, "routers": ["top_k"] * 2, "choices": [2, 2],
                                                "tokenizer": "byte", "step": step,
                                                "seq_len": 32, "batch_size": 3})


@pytest.mark.slow  # a Jupyter kernel and matplotlib (~20 s on 2 busy cores); tests/test_notebooks.py runs it on the
# committed traces in the default tier
def test_the_routing_analysis_notebook_draws_every_figure_from_a_runs_traces(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  from nbclient import NotebookClient

  rng = np.random.default_rng(0)
  traces = tmp_path / "traces"
  traces.mkdir()
  for step in (4, 8):
    analysis.write_trace(traces / f"trace-{step}.npz", _constructed_trace(step % 8, rng))
  losses = 1.0 + rng.random((2, 4))  # an ablation sweep's losses [NB, E] for the ranking's figure
  (traces / "ablations.json").write_text(json.dumps({
      "step": 8, "tokens": 96, "documents": 3, "base_loss": 1.0, "blocks": [1, 3],
      "removals": {removal: {"losses": losses.tolist(), "ranking": [
          vars(e) for e in analysis.rank_ablations(1.0, losses + i, [1, 3])]} for i, removal in
          enumerate(tracing.REMOVALS)}}))
  monkeypatch.setenv("MOE_JAX_TRACES", str(traces))
  monkeypatch.setenv("MOE_JAX_FIGURES_DIR", str(tmp_path / "figures"))
  notebook = nbformat.read(os.path.join(REPO, "notebooks", "routing_analysis.ipynb"), as_version=4)
  assert all(not c.outputs for c in notebook.cells if c.cell_type == "code")  # stored without outputs
  NotebookClient(notebook, timeout=120, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == {
      f"routing_analysis_{name}" for name in ("load", "saturation", "coactivation", "source", "byte_class",
                                              "ablation")}
  assert "Expert ablation (step 8, n = 96 tokens" in (tmp_path / "figures" / "routing_analysis_reading.md").read_text()
