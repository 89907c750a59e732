"""moe_jax.interop against `transformers`, offline: every family's committed fixture (tests/fixtures/interop/, made
by tools/make_interop_fixtures.py with transformers 5.25) imported and run.

Parity, per family: the logits of the fixture's inputs within 1e-4 (max abs) of transformers' and the same argmax
everywhere; at every MoE layer the router logits within 1e-4 and the same experts per token (as sets; Phi-3.5's
sparsemixer order too; Switch's capacity drops the same tokens), the experts read from moe_jax's own router on the
MoE layer's inputs. Export then import is bitwise the identity, and the exported tensor names and config.json keys
are transformers' (the fixture's). A further test runs transformers on an export when it is installed.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import models, moe_layer, parallel, routers, runstate
from moe_jax import interop
from moe_jax.interop import shards

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "interop"
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "dbrx", "phimoe", "switch", "llama", "qwen2", "qwen3",
            "olmo", "olmo2")
TOLERANCE = 1e-4
# Families whose architecture settings have not landed in moe_jax yet: their parity tests must fail (strict xfail).
BLOCKED: dict[str, str] = {}


def family_param(family):
  marks = [pytest.mark.xfail(strict=True, reason=BLOCKED[family])] if family in BLOCKED else []
  return pytest.param(family, marks=marks, id=family)


ALL = [family_param(f) for f in FAMILIES]


def reference(family: str) -> dict:
  with np.load(FIXTURES / family / "reference.npz", allow_pickle=False) as npz:
    return dict(npz)


@functools.lru_cache(maxsize=None)
def imported(family: str):
  """(config, model) of a fixture, imported once per test process."""
  return interop.load(str(FIXTURES / family))


def batch_of(ref: dict) -> dict:
  if "encoder_input_ids" in ref:
    return {"inputs": jnp.asarray(ref["encoder_input_ids"]), "decoder_inputs": jnp.asarray(ref["decoder_input_ids"])}
  return {"inputs": jnp.asarray(ref["input_ids"])}


def fixture_tensors(family: str) -> dict[str, np.ndarray]:
  with shards.CheckpointReader(str(FIXTURES / family)) as reader:
    return {name: reader.read(name) for name in reader.names}


@pytest.mark.parametrize("family", ALL)
def test_logits_match_transformers(family):
  _, model = imported(family)
  ref = reference(family)
  logits, _ = models.forward(model, batch_of(ref))
  logits = np.asarray(logits)
  assert np.abs(logits - ref["logits"]).max() <= TOLERANCE
  np.testing.assert_array_equal(logits.argmax(-1), ref["logits"].argmax(-1))


@pytest.mark.parametrize("family", ALL)
def test_experts_match_transformers(family, monkeypatch):
  """moe_jax's own router, run on the inputs each MoE layer received, picks transformers' experts."""
  _, model = imported(family)
  ref = reference(family)
  calls = []
  original = moe_layer.MoeFeedForward.__call__

  def recording(self, x, **kwargs):
    calls.append((self, x))
    return original(self, x, **kwargs)

  monkeypatch.setattr(moe_layer.MoeFeedForward, "__call__", recording)
  models.forward(model, batch_of(ref))
  assert len(calls) == len(ref["moe_layers"])
  for n, (layer, x) in enumerate(calls):
    config = layer.config
    params = {name: getattr(layer, name)[...] for name in config.family.params(layer.d_model, config.num_experts,
                                                                                 config.router_options)}
    np.testing.assert_allclose(np.asarray(x.reshape(-1, x.shape[-1]) @ params["router"]),
                               ref[f"moe.{n}.router_logits"], rtol=0, atol=TOLERANCE)
    groups = moe_layer.group_tokens(x.astype(layer.dtype), config.group_size)
    route = config.family.route(routers.RouterInputs(groups, params, None, None, None), config,
                                config.router_options, True)
    index = np.asarray(route.expert_index).reshape(-1, route.expert_index.shape[-1])
    expected = ref[f"moe.{n}.topk_index"]
    if family == "phimoe":  # the sparsemixer's order is meaningful: weight j belongs to stage j
      np.testing.assert_array_equal(index, expected)
    else:
      np.testing.assert_array_equal(np.sort(index, -1), np.sort(expected, -1))
    np.testing.assert_allclose(np.asarray(route.combine_weight).reshape(index.shape),
                               ref[f"moe.{n}.topk_weight"] * (ref[f"moe.{n}.kept"][:, None]
                                                              if f"moe.{n}.kept" in ref else 1), rtol=0, atol=1e-5)
    if f"moe.{n}.kept" in ref:
      np.testing.assert_array_equal(np.asarray(route.kept).reshape(-1), ref[f"moe.{n}.kept"])


def params_of(model) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
  a, b = params_of(a), params_of(b)
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path


def config_keys(config: dict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    keys.add(prefix + key)
    if isinstance(value, dict) and key not in ("rope_parameters", "id2label", "label2id"):
      keys |= config_keys(value, f"{prefix}{key}.")
  return keys


@pytest.mark.parametrize("family", ALL)
def test_export_then_import_is_the_identity(family, tmp_path):
  config, model = imported(family)
  model_type = interop.hf_config_to_moe(shards.read_config(str(FIXTURES / family)))[1].MODEL_TYPE
  interop.export_model(model, interop.transfer.typed_model(config), model_type, str(tmp_path))
  exported = fixture_tensors(family)  # the fixture's names and values, to compare with the export's
  with shards.CheckpointReader(str(tmp_path)) as reader:
    assert reader.names == frozenset(exported)
    for name, value in exported.items():  # float32 in, float32 out: the very bits
      np.testing.assert_array_equal(reader.read(name), value, err_msg=name)
  # Built from the family's template alone (no imported config.json to copy from): transformers' keys.
  hf = shards.read_config(str(tmp_path))
  assert config_keys(hf) - {"transformers_version"} == config_keys(shards.read_config(str(FIXTURES / family))) - {
      "transformers_version"}
  _, again = interop.load(str(tmp_path))
  assert_same_params(model, again)


@pytest.mark.parametrize("family", ["mixtral", "qwen2"])
def test_transformers_loads_an_export(family, tmp_path):
  transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e "
                                     ".[interop-dev])")
  torch = pytest.importorskip("torch")
  config, model = imported(family)
  interop.export_model(model, interop.transfer.typed_model(config), family, str(tmp_path))
  ref = reference(family)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  with torch.no_grad():
    logits = theirs(torch.as_tensor(ref["input_ids"])).logits.numpy()
  assert np.abs(logits - ref["logits"]).max() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# The reader's refusals and the sharded layout.


def copy_fixture(family: str, target: pathlib.Path) -> pathlib.Path:
  shutil.copytree(FIXTURES / family, target)
  return target


def rewrite(path: pathlib.Path, change) -> None:
  with shards.CheckpointReader(str(path)) as reader:
    tensors = {name: reader.read(name) for name in reader.names}
  change(tensors)
  os.remove(path / shards.SINGLE)
  shards.write_checkpoint(str(path), tensors.items())


def test_unknown_tensor_is_named(tmp_path):
  path = copy_fixture("mixtral", tmp_path / "mixtral")
  rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"does not know: \['model.layers.0.mlp.extra.weight'\]"):
    interop.load(str(path))


def test_missing_tensor_is_named(tmp_path):
  path = copy_fixture("mixtral", tmp_path / "mixtral")
  rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
  with pytest.raises(ValueError, match=r"lacks the tensors \['model.layers.1.self_attn.k_proj.weight'\]"):
    interop.load(str(path))


def test_wrong_shape_is_named(tmp_path):
  path = copy_fixture("mixtral", tmp_path / "mixtral")
  rewrite(path, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
  with pytest.raises(ValueError, match=r"model.norm.weight \[31\] do not make moe_jax's final_norm.scale \[32\]"):
    interop.load(str(path))


@pytest.mark.parametrize("family, change, message", [
    ("mixtral", {"model_type": "gpt2"}, "model_type='gpt2' is not a family moe_jax converts"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     "rope_type='yarn' is not supported"),
    ("mixtral", {"sliding_window": 64}, "sliding_window=64 is not supported"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("dbrx", {"ffn_config": {"moe_normalize_expert_weights": 2.0, "moe_num_experts": 16, "moe_top_k": 4,
                             "ffn_hidden_size": 16}},
     "moe_normalize_expert_weights=2.0 is not supported"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\] is not supported"),
])
def test_unsupported_settings_are_refused(family, change, message):
  hf = {**shards.read_config(str(FIXTURES / family)), **change}
  with pytest.raises(ValueError, match=message):
    interop.hf_config_to_moe(hf)
