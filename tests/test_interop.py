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


def family_param(family):
  return pytest.param(family, id=family)


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
  reader = shards.CheckpointReader(str(FIXTURES / family))
  return {name: reader.read(name) for name in reader.names}


@functools.lru_cache(maxsize=None)
def run(family: str):
  """(logits, [(MoE layer, its input x [B, L, M])] in call order) of the fixture's inputs, one forward per family
  and test process, recording what each MoE layer received."""
  _, model = imported(family)
  calls = []
  original = moe_layer.MoeFeedForward.__call__

  def recording(self, x, **kwargs):
    calls.append((self, x))
    return original(self, x, **kwargs)

  moe_layer.MoeFeedForward.__call__ = recording
  try:
    logits, _ = models.forward(model, batch_of(reference(family)))
  finally:
    moe_layer.MoeFeedForward.__call__ = original
  return np.asarray(logits), calls


@pytest.mark.parametrize("family", ALL)
def test_logits_match_transformers(family):
  logits, _ = run(family)
  ref = reference(family)
  assert np.abs(logits - ref["logits"]).max() <= TOLERANCE
  np.testing.assert_array_equal(logits.argmax(-1), ref["logits"].argmax(-1))


@pytest.mark.parametrize("family", ALL)
def test_experts_match_transformers(family):
  """moe_jax's own router, run on the inputs each MoE layer received, picks transformers' experts."""
  _, calls = run(family)
  ref = reference(family)
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
    index = np.asarray(route.expert_index).reshape(-1, route.expert_index.shape[-1])  # [tokens, K]
    weight = np.asarray(route.combine_weight).reshape(index.shape)
    expected, expected_weight = ref[f"moe.{n}.topk_index"], ref[f"moe.{n}.topk_weight"]
    if f"moe.{n}.kept" in ref:  # Switch: the tokens beyond capacity are dropped (weight 0) as in transformers
      np.testing.assert_array_equal(np.asarray(route.kept).reshape(-1), ref[f"moe.{n}.kept"])
      expected_weight = expected_weight * ref[f"moe.{n}.kept"][:, None]
    if family == "phimoe":  # the sparsemixer's order is meaningful: weight j belongs to stage j
      np.testing.assert_array_equal(index, expected)
    else:  # the same set of experts; weights compared expert by expert
      mine, theirs = np.argsort(index, -1), np.argsort(expected, -1)
      index, weight = np.take_along_axis(index, mine, -1), np.take_along_axis(weight, mine, -1)
      expected = np.take_along_axis(expected, theirs, -1)
      expected_weight = np.take_along_axis(expected_weight, theirs, -1)
      np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(weight, expected_weight, rtol=0, atol=1e-5)


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
  reader = shards.CheckpointReader(str(tmp_path))
  assert reader.names == frozenset(exported)
  for name, value in exported.items():  # float32 in, float32 out: the very bits
    np.testing.assert_array_equal(reader.read(name), value, err_msg=name)
  # Built from the family's template alone (no imported config.json to copy from): transformers' keys.
  hf = shards.read_config(str(tmp_path))
  assert config_keys(hf) - {"transformers_version"} == config_keys(shards.read_config(str(FIXTURES / family))) - {
      "transformers_version"}
  _, again = interop.load(str(tmp_path))
  assert_same_params(model, again)


@pytest.mark.parametrize("family", ALL)
def test_transformers_loads_an_export(family, tmp_path):
  """transformers' own class (AutoModelForCausalLM; Switch: AutoModelForSeq2SeqLM) loads the export, built from the
  family's template alone, and computes the fixture's logits within the tolerance."""
  transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e "
                                     ".[interop-dev])")
  torch = pytest.importorskip("torch")
  config, model = imported(family)
  model_type = interop.hf_config_to_moe(shards.read_config(str(FIXTURES / family)))[1].MODEL_TYPE
  interop.export_model(model, interop.transfer.typed_model(config), model_type, str(tmp_path))
  ref = reference(family)
  if "encoder_input_ids" in ref:
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    inputs = {"input_ids": torch.as_tensor(ref["encoder_input_ids"]),
              "decoder_input_ids": torch.as_tensor(ref["decoder_input_ids"])}
  else:
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    inputs = {"input_ids": torch.as_tensor(ref["input_ids"])}
  with torch.no_grad():
    logits = theirs(**inputs).logits.numpy()
  assert np.abs(logits - ref["logits"]).max() <= TOLERANCE


@pytest.mark.parametrize("family", [family_param("olmo2")])
def test_exported_token_ids_lie_inside_the_vocabulary(family, tmp_path):
  """An export without the imported config.json takes the family's template token ids (OLMo 2's pad 100277, eos
  100257); past a smaller model's vocabulary they become None, since transformers refuses a padding index past
  the embedding."""
  config, model = imported(family)
  interop.export_model(model, interop.transfer.typed_model(config), family, str(tmp_path))
  hf = shards.read_config(str(tmp_path))
  assert hf["vocab_size"] < 100257
  assert (hf["pad_token_id"], hf["eos_token_id"]) == (None, None)


# ----------------------------------------------------------------------------------------------------------
# The reader's refusals and the sharded layout.


def copy_fixture(family: str, target: pathlib.Path) -> pathlib.Path:
  shutil.copytree(FIXTURES / family, target)
  return target


def rewrite(path: pathlib.Path, change) -> None:
  reader = shards.CheckpointReader(str(path))
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


@pytest.mark.parametrize("family", [family_param("mixtral")])
def test_sharded_checkpoint_reads_like_one_file(family, tmp_path):
  """Shards of at most 40 kB with their index (as save_pretrained writes a large model) import to the same bits."""
  config, model = imported(family)
  interop.export_model(model, interop.transfer.typed_model(config), family, str(tmp_path), max_shard_bytes=40_000)
  index = json.loads((tmp_path / shards.INDEX).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0] == shards.shard_name(0, len(files))
  assert not (tmp_path / shards.SINGLE).exists()
  assert_same_params(model, interop.load(str(tmp_path))[1])


@pytest.mark.slow  # the sharded MoE forward compiles for ~80 s on 2 cores
@pytest.mark.parametrize("family", [family_param("mixtral")])
def test_import_places_parameters_on_the_mesh(family):
  """Onto a mesh of 2 expert x 2 tensor devices: experts split over 'expert', each parameter in its logical
  sharding, the logits those of one device."""
  mesh = parallel.create_mesh(1, 2, tensor=2)
  ref = reference(family)
  with parallel.mesh_context(mesh):
    _, model = interop.load(str(FIXTURES / family), mesh=mesh)
    experts = model.blocks[0].ffn.wi_0[...]
    assert experts.sharding.mesh == mesh and experts.sharding.spec[0] == "expert"
    assert experts.addressable_shards[0].data.shape[0] == experts.shape[0] // 2
    logits, _ = models.forward(model, batch_of(ref))
  _, single = imported(family)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(models.forward(single, batch_of(ref))[0]),
                             rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, workdirs, the command line.


def write_tokenizer(directory: pathlib.Path, vocab_size: int, *, eos: str | None = "</s>") -> pathlib.Path:
  """A word-level tokenizer.json of `vocab_size` ids (pad, eos, unk, then words w3 ...), built offline."""
  from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
  tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])  # as published tokenizer.json files mark them
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(directory / "tokenizer.json"))
  settings = {"pad_token": "<pad>", **({"eos_token": {"content": eos}} if eos else {})}
  (directory / "tokenizer_config.json").write_text(json.dumps(settings))
  return directory / "tokenizer.json"


def test_tokenizer_json_is_a_data_tokenizer(tmp_path):
  from moe_jax import data as data_lib
  from moe_jax.data import tokenizers

  path = write_tokenizer(tmp_path, 12)
  tokenizer = data_lib.get_tokenizer({"tokenizer": str(path)})
  assert isinstance(tokenizer, tokenizers.HuggingFaceTokenizer)
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id) == (12, 0, 1)
  ids = tokenizer.encode("w3 w11 nope w4")
  np.testing.assert_array_equal(ids, [3, 11, 2, 4])
  assert ids.dtype == np.int32
  assert tokenizer.decode([3, 1, 11, 0]) == "w3 w11"  # specials dropped


def test_tokenizer_json_without_eos_is_refused(tmp_path):
  from moe_jax import data as data_lib

  path = write_tokenizer(tmp_path, 12, eos=None)
  with pytest.raises(ValueError, match="data.tokenizer=.*has no EOS token"):
    data_lib.get_tokenizer({"tokenizer": str(path)})


def fixture_with_tokenizer(family: str, tmp_path: pathlib.Path) -> pathlib.Path:
  path = copy_fixture(family, tmp_path / family)
  write_tokenizer(path, json.loads((path / "config.json").read_text())["vocab_size"])
  return path


@pytest.mark.parametrize("family", [family_param("mixtral"), family_param("llama")])
def test_workdir_import_is_a_run_that_exports_back(family, tmp_path):
  """import_to_workdir writes a run runstate.load restores (the same parameters, the tokenizer with it), and
  export_workdir gives back the fixture's tensors, bit for bit."""
  source = fixture_with_tokenizer(family, tmp_path)
  workdir = tmp_path / "run"
  summary = interop.import_to_workdir(str(source), str(workdir))
  assert summary.dtypes == ("float32",) and summary.bytes == (source / shards.SINGLE).stat().st_size - \
      8 - int.from_bytes((source / shards.SINGLE).read_bytes()[:8], "little")
  loaded = runstate.load(str(workdir))
  assert loaded.step == 0 and loaded.typed.data.tokenizer == str(workdir / "tokenizer" / "tokenizer.json")
  assert_same_params(imported(family)[1], loaded.model)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    interop.import_to_workdir(str(source), str(workdir))
  interop.export_workdir(str(workdir), str(tmp_path / "out"))
  assert (tmp_path / "out" / "tokenizer.json").exists()
  reader = shards.CheckpointReader(str(tmp_path / "out"))
  expected = fixture_tensors(family)
  assert reader.names == frozenset(expected)
  for name in reader.names:
    np.testing.assert_array_equal(reader.read(name), expected[name], err_msg=name)


def test_workdir_import_refuses_a_tokenizer_beyond_the_vocabulary(tmp_path):
  """The fixtures' 96 ids cannot hold the byte tokenizer's 259: a run needs a tokenizer that fits."""
  with pytest.raises(ValueError, match=r"model.vocab_size=96 must be >= the tokenizer's vocabulary \(259\)"):
    interop.import_to_workdir(str(FIXTURES / "llama"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  source = copy_fixture("llama", tmp_path / "llama")
  write_tokenizer(source, 100)  # 4 ids more than the model embeds
  with pytest.raises(ValueError, match=r"model.vocab_size=96 must be >= the tokenizer's vocabulary \(100\)"):
    interop.import_to_workdir(str(source), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_workdir_import_of_a_checkpoint_missing_a_tensor_leaves_no_file(tmp_path):
  """The tokenizer is copied before the tensors are checked; a refused import takes it away again."""
  source = copy_fixture("llama", tmp_path / "llama")
  write_tokenizer(source, 96)
  rewrite(source, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
  with pytest.raises(ValueError, match=r"lacks the tensors"):
    interop.import_to_workdir(str(source), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def run_convert(*args: str):
  import subprocess
  import sys

  root = pathlib.Path(__file__).parent.parent
  env = {**os.environ, "PYTHONPATH": str(root)}
  return subprocess.run([sys.executable, str(root / "experiments" / "convert.py"), *args], capture_output=True,
                        text=True, env=env, timeout=300, check=False)


@pytest.mark.slow  # two fresh processes that import jax and convert: ~30 s
@pytest.mark.parametrize("family", [family_param("llama")])
def test_convert_cli_both_ways(family, tmp_path):
  source = fixture_with_tokenizer(family, tmp_path)
  done = run_convert(f"--from=hf:{source}", f"--to={tmp_path / 'run'}")
  assert done.returncode == 0, done.stderr
  assert "converted llama: " in done.stdout and "parameters" in done.stdout and "float32" in done.stdout
  assert "import [" in done.stderr  # the progress bar
  done = run_convert(f"--from={tmp_path / 'run'}", f"--to=hf:{tmp_path / 'out'}", "--shard_mb=0")
  assert done.returncode == 0, done.stderr
  assert (tmp_path / "out" / shards.INDEX).exists()  # one tensor per shard
  reader = shards.CheckpointReader(str(tmp_path / "out"))
  expected = fixture_tensors(family)
  assert reader.names == frozenset(expected)
  assert all(np.array_equal(reader.read(n), expected[n]) for n in reader.names)


def test_convert_cli_bad_input_is_one_line(tmp_path):
  done = run_convert(f"--from=hf:{tmp_path / 'nothing'}", f"--to={tmp_path / 'run'}")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [f"cannot convert: {tmp_path / 'nothing'}/config.json does not exist: "
                                              f"{tmp_path / 'nothing'} is not a Hugging Face model directory"]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # writes and imports a checkpoint in a fresh process: ~15 s
@pytest.mark.parametrize("family", [family_param("mixtral")])
def test_import_benchmark_reports_memory_and_throughput(family, tmp_path):
  """benchmarks/interop_import.py end to end at a tiny size (the figures are the lead's to measure, not checked)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("interop_import", pathlib.Path(__file__).parent.parent /
                                                "benchmarks" / "interop_import.py")
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  report = benchmark.main(["--family", family, "--d_model", "128", "--d_ff", "128", "--num_layers", "2",
                           "--vocab_size", "1024", "--shard_mb", "1", "--output", str(tmp_path / "out.json")])
  assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(report))
  assert report["checkpoint_bytes"] > 2_000_000 and len(report["files"]) > 3  # shards and their index
  assert report["peak_rss_bytes"] >= report["rss_before_bytes"] and report["mb_per_s"] > 0


def test_layout_transforms_are_exact_and_invert():
  """Each transform is the spec's map (docs/interop_fixtures.md: q_proj.T.reshape(M, H, D) then the k and v heads;
  o_proj.T.reshape(H, D, M); experts stacked transposed; DBRX's w1 reshape(E, F, M).transpose(0, 2, 1) and w2
  reshape(E, F, M)): the tensors written into their `views` of an empty parameter (views of it, as import needs)
  make the parameter, and `to_tensors` gives back the very tensors."""
  from moe_jax.interop import layout

  rng = np.random.default_rng(0)
  m, h, k, d, f, e = 6, 4, 2, 3, 5, 3
  q, kk, v = (rng.standard_normal((n * d, m)).astype(np.float32) for n in (h, k, k))
  cases = [
      (layout.heads_in([h, k, k], d), [q, kk, v],
       np.concatenate([q.T.reshape(m, h, d), kk.T.reshape(m, k, d), v.T.reshape(m, k, d)], axis=1)),
      (layout.heads_bias([h, k, k], d), [q[:, 0], kk[:, 0], v[:, 0]],
       np.concatenate([q[:, 0], kk[:, 0], v[:, 0]]).reshape(h + 2 * k, d)),
      (layout.heads_out(h, d), [q.T], q.reshape(h, d, m)),
      (layout.TRANSPOSED, [q], q.T),
      (layout.SAME, [q], q),
      (layout.experts(e), [x[:f] for x in (q, kk, v)], np.stack([x[:f].T for x in (q, kk, v)])),
      (layout.fused_experts(transpose=True), [q[:e * 2]],
       q[:e * 2].reshape(e, 2, m).transpose(0, 2, 1)),
      (layout.fused_experts(transpose=False), [q[:e * 2]], q[:e * 2].reshape(e, 2, m)),
  ]
  for transform, tensors, expected in cases:
    param = np.full(expected.shape, np.nan, np.float32)
    views = transform.views(param)
    assert len(views) == len(tensors)
    for view, tensor in zip(views, tensors):
      assert np.shares_memory(view, param) and view.size == tensor.size
      view[...] = tensor.reshape(view.shape)  # the tensor's C order, as read_into fills it
    np.testing.assert_array_equal(param, expected)
    back = transform.to_tensors(param)
    assert len(back) == len(tensors)
    for a, b in zip(back, tensors):
      assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("family", [family_param("mixtral"), family_param("dbrx")])
def test_reader_reads_what_safetensors_reads(family, tmp_path, monkeypatch):
  """CheckpointReader (plain file reads at the header's offsets) against safetensors' own reader: every tensor of
  the fixture, in float32 and in bfloat16, read whole and read into a transposed float32 view a few elements at a
  time (READ_BYTES shrunk to 8 elements, so reads split rows and rows split into reads)."""
  import ml_dtypes
  from safetensors import safe_open

  source = copy_fixture(family, tmp_path / family)
  rewrite(source, lambda t: t.update({f"{n}.bf16": v.astype(ml_dtypes.bfloat16) for n, v in list(t.items())}))
  monkeypatch.setattr(shards, "READ_BYTES", 32)
  reader = shards.CheckpointReader(str(source))
  with safe_open(str(source / shards.SINGLE), framework="numpy") as handle:
    for name in sorted(reader.names):
      expected = handle.get_tensor(name)
      got = reader.read(name)
      assert got.dtype == expected.dtype and got.shape == expected.shape, name
      np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8), err_msg=name)
      into = np.full(expected.shape[::-1], np.nan, np.float32)
      reader.read_into(name, into.T)
      np.testing.assert_array_equal(into.T, expected.astype(np.float32), err_msg=name)


def test_reader_refuses_a_damaged_shard(tmp_path):
  """A shard cut short, or one whose header is not safetensors, is a ValueError naming the file, on opening."""
  path = copy_fixture("mixtral", tmp_path / "mixtral") / shards.SINGLE
  data = path.read_bytes()
  path.write_bytes(data[:-4])
  with pytest.raises(ValueError, match=rf"{path}: tensor .* has the bytes .* of a data section of"):
    shards.CheckpointReader(str(path.parent))
  path.write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!" + data[24:])
  with pytest.raises(ValueError, match=rf"{path} is not a safetensors file \(its header is not JSON"):
    shards.CheckpointReader(str(path.parent))


@pytest.mark.parametrize("family", [family_param("llama")])
def test_bfloat16_checkpoint_round_trips_in_bfloat16(family, tmp_path):
  """A bfloat16 checkpoint: float32 parameters holding its values exactly, bfloat16 compute (model.dtype), and
  an export in bfloat16 with the very bits it came with."""
  import ml_dtypes

  source = copy_fixture(family, tmp_path / family)
  rewrite(source, lambda t: t.update({n: v.astype(ml_dtypes.bfloat16) for n, v in t.items()}))
  hf = shards.read_config(str(source))
  (source / "config.json").write_text(json.dumps({**hf, "dtype": "bfloat16"}))
  config, model = interop.load(str(source))
  assert config.model.dtype == "bfloat16"
  assert all(p.dtype == np.float32 for p in params_of(model).values())
  interop.export_model(model, interop.transfer.typed_model(config), family, str(tmp_path / "out"), base=hf | {
      "dtype": "bfloat16"})
  assert shards.read_config(str(tmp_path / "out"))["dtype"] == "bfloat16"
  exported, original = shards.CheckpointReader(str(tmp_path / "out")), shards.CheckpointReader(str(source))
  assert exported.names == original.names
  for name in original.names:
    assert exported.read(name).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(exported.read(name).view(np.uint16), original.read(name).view(np.uint16))


@pytest.mark.parametrize("family", [family_param("olmo")])
def test_workdir_tokenizer_takes_eos_from_config_json(family, tmp_path):
  """A tokenizer.json with no tokenizer_config.json: the run's tokenizer ends documents with config.json's
  eos_token_id (95 in the OLMo fixture)."""
  from moe_jax import data as data_lib

  source = fixture_with_tokenizer(family, tmp_path)
  (source / "tokenizer_config.json").unlink()
  interop.import_to_workdir(str(source), str(tmp_path / "run"))
  tokenizer = data_lib.get_tokenizer(runstate.run_config(str(tmp_path / "run")).data)
  assert (tokenizer.eos_id, tokenizer.vocab_size) == (95, 96)
