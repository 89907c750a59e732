"""The committed interop parity fixtures (tests/fixtures/interop/, made by tools/make_interop_fixtures.py) are whole
and self-consistent, checked without torch, transformers or the `safetensors` package.

A broken or hand-edited fixture would make the importer's parity tests (issue 31) and the greedy-decoding tests
(issue 32) fail for the wrong reason, or pass vacuously. So this checks, per family: the checkpoint parses as
safetensors and is float32 throughout, with every norm weight and bias moved off its 1 / 0 init (else a misplaced
one would go unseen); the reference arrays have the shapes the config implies; the recorded experts are the top-k
of the recorded router logits, away from ties by the recorded margin; the recorded expert weights follow from the
router logits by the family's routing rule (written out here in numpy: the executable form of the routing math in
docs/interop_fixtures.md); Switch's dropped tokens are exactly those beyond expert_capacity in sequence order; and
each greedy token is the argmax of its step's logits.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "interop"
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "dbrx", "phimoe", "switch", "llama", "qwen2", "qwen3",
            "olmo", "olmo2")
# One router weight per MoE layer: `<moe>.gate.weight` (not Qwen2-MoE's `shared_expert_gate.weight`),
# DBRX's `router.layer.weight`, Switch's `router.classifier.weight`.
ROUTER_TENSOR = re.compile(r"(\.gate\.weight|\.router\.layer\.weight|\.router\.classifier\.weight)$")
EMBEDDING_TENSORS = ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight")
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The safetensors format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
  data_offsets}} (plus optional __metadata__), then the tensors' bytes, offsets relative to the end of the header."""
  raw = path.read_bytes()
  header_len = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + header_len])
  header.pop("__metadata__", None)
  data = raw[8 + header_len:]
  tensors, end = {}, 0
  for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
    start, stop = info["data_offsets"]
    assert start == end, f"{name}: a gap or overlap in the data at byte {start} (expected {end})"
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    assert stop - start == int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize, name
    tensors[name] = np.frombuffer(data[start:stop], dtype=dtype).reshape(info["shape"])
    end = stop
  assert end == len(data), "bytes after the last tensor"
  return tensors


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sparsemixer(logits, eps):
  """Phi-3.5-MoE's router at evaluation (transformers' `sparsemixer`, training=False): the argmax, then the argmax of
  the rest; each weight is its softmax over the experts whose relative gap to that stage's max is <= 2 eps."""
  index, weight = [], []
  scores = logits.astype(np.float64)
  for _ in range(2):
    best = scores.argmax(-1)
    top = np.take_along_axis(scores, best[:, None], -1)
    masked = np.where((top - scores) / np.maximum(np.abs(logits), top) > 2 * eps, -np.inf, scores)
    weight.append(np.take_along_axis(softmax(masked), best[:, None], -1)[:, 0])
    index.append(best)
    scores = scores.copy()
    np.put_along_axis(scores, best[:, None], -np.inf, -1)
  return np.stack(index, -1), np.stack(weight, -1)


def routing(config: dict) -> dict | None:
  """Experts, k and the weight rule of a config.json (None for a dense model)."""
  kind = config["model_type"]
  if kind == "mixtral":
    return dict(experts=config["num_local_experts"], k=config["num_experts_per_tok"], rule="renormalised")
  if kind in ("olmoe", "qwen2_moe", "qwen3_moe"):
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; the Hub's configs say num_experts.
    experts = config.get("num_experts", config.get("num_local_experts"))
    rule = "renormalised" if config["norm_topk_prob"] else "softmax"
    return dict(experts=experts, k=config["num_experts_per_tok"], rule=rule)
  if kind == "dbrx":
    ffn = config["ffn_config"]
    return dict(experts=ffn["moe_num_experts"], k=ffn["moe_top_k"], rule="pnorm",
                p=ffn["moe_normalize_expert_weights"])
  if kind == "phimoe":
    return dict(experts=config["num_local_experts"], k=2, rule="sparsemixer", eps=config["router_jitter_noise"])
  if kind == "switch_transformers":
    return dict(experts=config["num_experts"], k=1, rule="softmax", capacity=config["expert_capacity"])
  return None


def expected_weights(logits, index, route):
  probs = softmax(logits.astype(np.float64))
  chosen = np.take_along_axis(probs, index, -1)
  if route["rule"] == "renormalised":
    return chosen / chosen.sum(-1, keepdims=True)
  if route["rule"] == "pnorm":
    return chosen / np.linalg.norm(chosen, ord=route["p"], axis=-1, keepdims=True)
  if route["rule"] == "sparsemixer":
    return sparsemixer(logits, route["eps"])[1]
  return chosen


def kept_by_capacity(index, batch, capacity):
  """Switch (transformers): per sequence, a token keeps its expert while the expert has had <= capacity tokens so
  far, in sequence order (`cumsum` of the one-hot choices over the sequence axis)."""
  choice = index[:, 0].reshape(batch, -1)
  kept = np.zeros(choice.shape, bool)
  for b, row in enumerate(choice):
    counts = {}
    for s, expert in enumerate(row):
      counts[expert] = counts.get(expert, 0) + 1
      kept[b, s] = counts[expert] <= capacity
  return kept.reshape(-1)


def top2_gap(x):
  top = np.sort(x.reshape(-1, x.shape[-1]), -1)
  return top[:, -1] - top[:, -2]


def load(family):
  path = FIXTURES / family
  config = json.loads((path / "config.json").read_text())
  meta = json.loads((path / "fixture.json").read_text())
  with np.load(path / "reference.npz", allow_pickle=False) as npz:
    ref = dict(npz)
  return config, meta, ref, read_safetensors(path / "model.safetensors")


def test_every_family_has_a_fixture():
  assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(FAMILIES)
  readme = (FIXTURES / "README.md").read_text()
  assert all(f"`{family}`" in readme for family in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint(family):
  config, meta, _, tensors = load(family)
  assert config["dtype"] == "float32" and meta["family"] == family
  assert config["architectures"] == [meta["model_class"]]
  assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
  d_model = config.get("hidden_size", config.get("d_model"))
  embeddings = [name for name in EMBEDDING_TENSORS if name in tensors]
  assert len(embeddings) == 1 and tensors[embeddings[0]].shape == (config["vocab_size"], d_model)
  # A tied LM head is not written; an untied one is.
  assert ("lm_head.weight" in tensors) == (not config["tie_word_embeddings"])
  untouched = [name for name, t in tensors.items() if t.ndim == 1 and (np.all(t == 1) or np.all(t == 0))]
  assert not untouched, f"norm weights / biases still at their init: {untouched}"


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_shapes_and_argmax_margins(family):
  config, meta, ref, _ = load(family)
  ids = ref["decoder_input_ids"] if "decoder_input_ids" in ref else ref["input_ids"]
  assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < config["vocab_size"]
  if "encoder_input_ids" in ref:
    assert ref["encoder_input_ids"].shape[0] == ids.shape[0]
    assert (ids[:, 0] == config["decoder_start_token_id"]).all()
  assert ref["logits"].shape == ids.shape + (config["vocab_size"],) and ref["logits"].dtype == np.float32
  assert np.isfinite(ref["logits"]).all()
  threshold = meta["thresholds"]["min_logit_margin"]
  assert top2_gap(ref["logits"]).min() >= threshold
  assert top2_gap(ref["logits"]).min() == pytest.approx(meta["logit_margin_min"], rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation(family):
  config, meta, ref, _ = load(family)
  prompt, out, steps = ref["generate_prompt_ids"], ref["generate_ids"], ref["generate_step_logits"]
  if config.get("is_encoder_decoder"):
    assert (out[:, 0] == config["decoder_start_token_id"]).all()
    new = out[:, 1:]
  else:
    assert (out[:, :prompt.shape[1]] == prompt).all()
    new = out[:, prompt.shape[1]:]
  assert steps.shape == (new.shape[1], new.shape[0], config["vocab_size"])
  np.testing.assert_array_equal(steps.argmax(-1).T, new)  # greedy: each token is its step's argmax
  assert top2_gap(steps).min() >= meta["thresholds"]["min_logit_margin"]


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layers(family):
  config, meta, ref, tensors = load(family)
  route = routing(config)
  routers = sorted(name for name in tensors if ROUTER_TENSOR.search(name))
  layers = list(ref["moe_layers"])
  assert len(layers) == len(routers)
  assert meta["top_k"] == (route["k"] if route else 0)
  if route is None:
    return
  tokens = ref["logits"].shape[0] * ref["logits"].shape[1]
  margins = []
  for i in range(len(layers)):
    logits, index, weight = (ref[f"moe.{i}.{key}"] for key in ("router_logits", "topk_index", "topk_weight"))
    assert logits.shape == (tokens, route["experts"]) and logits.dtype == np.float32
    assert index.shape == weight.shape == (tokens, route["k"]) and index.dtype == np.int64
    assert index.min() >= 0 and index.max() < route["experts"]
    # The chosen experts are the top-k router logits (as a set: the order is the router's own).
    top_k = np.argsort(-logits, -1, kind="stable")[:, :route["k"]]
    np.testing.assert_array_equal(np.sort(index, -1), np.sort(top_k, -1))
    if route["rule"] == "sparsemixer":  # its order matters: weight j belongs to stage j
      np.testing.assert_array_equal(index, sparsemixer(logits, route["eps"])[0])
    np.testing.assert_allclose(weight, expected_weights(logits, index, route), rtol=0, atol=1e-5)
    top = -np.sort(-logits, -1)
    margins.append((top[:, route["k"] - 1] - top[:, route["k"]]).min())
    if "capacity" in route:
      kept = ref[f"moe.{i}.kept"]
      np.testing.assert_array_equal(kept, kept_by_capacity(index, ref["logits"].shape[0], route["capacity"]))
      assert meta["dropped_tokens"][layers[i]] == int((~kept).sum()) > 0
  assert min(margins) >= meta["thresholds"]["min_router_margin"]
  assert min(margins) == pytest.approx(meta["router_margin_min"], rel=1e-5)
  assert meta["generate_router_margin_min"] >= meta["thresholds"]["min_router_margin"]
