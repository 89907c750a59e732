"""Bad input fails early and clearly: every invalid config gives a ValueError naming the problem, before any
mesh, array or compilation exists; the CLI turns it into a one-line message, without a traceback."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from moe_jax import config_lib, dispatch, parallel, resolve, train
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(path, value):
  def mutate(config):
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    with node.ignore_type():
      node[leaf] = value
  return mutate


def _unknown_field(config):
  with config.model.unlocked():
    config.model.d_modle = 64


def _replace_model(config):
  """A config file that builds its own section with a wrong type (string instead of int)."""
  model = config.model.to_dict()
  model["num_layers"] = "12"
  with config.unlocked():
    config.model = ml_collections.ConfigDict(model)


INVALID = {
    "unknown field": (_unknown_field, "unknown config field 'model.d_modle'"),
    "wrong type": (_replace_model, r"model.num_layers='12' has type str"),
    "bool for an int": (_set("train.batch_size", True), "train.batch_size=True has type bool"),
    "experts not divisible by the expert axis": (
        lambda c: (_set("mesh.data", 2)(c), _set("mesh.expert", 4)(c), _set("moe.num_experts", 6)(c)),
        r"moe.num_experts=6 must be divisible by mesh.expert=4"),
    "batch not divisible by the mesh": (
        lambda c: (_set("mesh.data", 8)(c), _set("mesh.expert", 1)(c), _set("train.batch_size", 12)(c)),
        r"train.batch_size=12 must be divisible by mesh.data \* mesh.fsdp \* mesh.expert = 8 \* 1 \* 1 = 8"),
    "mesh larger than the devices": (_set("mesh.data", 16), r"must equal the number of devices \(8\)"),
    "two mesh axes of size 0": (
        lambda c: (_set("mesh.data", 0)(c), _set("mesh.fsdp", 0)(c)), r"mesh.fsdp=0: only one mesh axis may be 0"),
    "negative mesh axis": (_set("mesh.tensor", -1), r"mesh.tensor=-1 must be >= 0"),
    "mesh axes not dividing the devices": (
        lambda c: (_set("mesh.data", 0)(c), _set("mesh.fsdp", 3)(c)),
        r"mesh.fsdp=3 \* mesh.expert=4 must divide the number of devices \(8\)"),
    "four-axis mesh larger than the devices": (
        lambda c: (_set("mesh.data", 2)(c), _set("mesh.fsdp", 2)(c), _set("mesh.expert", 2)(c),
                   _set("mesh.tensor", 2)(c), _set("train.batch_size", 8)(c)),
        r"mesh.data \* mesh.fsdp \* mesh.expert \* mesh.tensor = 2 \* 2 \* 2 \* 2 = 16 must equal"),
    "fsdp not dividing d_model": (
        lambda c: (_set("mesh.data", 1)(c), _set("mesh.fsdp", 8)(c), _set("mesh.expert", 1)(c),
                   _set("model.d_model", 100)(c)),
        r"mesh.fsdp=8 must divide model.d_model=100"),
    "tensor not dividing the heads": (
        lambda c: (_set("mesh.data", 1)(c), _set("mesh.tensor", 8)(c), _set("mesh.expert", 1)(c)),
        r"mesh.tensor=8 must divide model.num_heads=4"),
    "sequence longer than the model's maximum": (
        _set("train.seq_len", 512), r"train.seq_len=512 must be <= model.max_seq_len=256"),
    "top_k > num_experts": (
        lambda c: (_set("moe.router", "top_k")(c), _set("moe.top_k.k", 9)(c)), r"moe.top_k.k=9 must be in \[1"),
    "top_k > 1 for switch": (_set("moe.top_k.k", 2), "moe.top_k.k=2 is an option of router 'top_k'"),
    "expert choice in a causal decoder": (_set("moe.router", "expert_choice"), "non-causal"),
    "missing data directory": (
        lambda c: (_set("data.dataset", "text_dir")(c), _set("data.text_dir", "/no/such/dir")(c)),
        "data.text_dir"),
    "unknown data set": (_set("data.dataset", "c5/en"), r"data.dataset='c5/en' must be one of"),
    "tokenizer vocabulary larger than the model's": (
        _set("model.vocab_size", 100), r"model.vocab_size=100 must be >= the tokenizer's vocabulary \(259\)"),
    "missing tokenizer file": (_set("data.tokenizer", "/no/such.model"), "data.tokenizer"),
    "capacity factor <= 0": (_set("moe.capacity_factor", 0.0), r"moe.capacity_factor=0.0 must be > 0"),
    "negative capacity factor": (_set("moe.capacity_factor", -1.25), "moe.capacity_factor"),
    "jitter out of range": (_set("moe.jitter_eps", 1.0), r"moe.jitter_eps=1.0 must be in \[0, 1\)"),
    "zero experts": (_set("moe.num_experts", 0), r"moe.num_experts=0 must be >= 1"),
    "unknown dispatch backend": (_set("moe.dispatch", "scatter"), "moe.dispatch='scatter' must be one of"),
    "unknown router": (_set("moe.router", "lsh"), "moe.router='lsh' must be one of"),
    "unknown optimizer": (_set("train.optimizer", "sgd"), "train.optimizer='sgd' must be one of"),
    "negative learning rate": (_set("train.learning_rate", -1e-3), "train.learning_rate=-0.001 must be > 0"),
    "nan learning rate": (_set("train.learning_rate", float("nan")), "train.learning_rate=nan must be > 0"),
    # Finite and positive in Python, but inf and 0 in float32, where the optimizer computes.
    "learning rate infinite in float32": (_set("train.learning_rate", 1e300),
                                          r"train.learning_rate=1e\+300 must be > 0 and in float32's normal range"),
    "learning rate zero in float32": (_set("train.learning_rate", 1e-300),
                                      r"train.learning_rate=1e-300 must be > 0 and in float32's normal range"),
    # Below 1 in Python, 1.0 in float32: Adam's bias correction divides by 1 - b^t = 0 (NaN at the first update).
    "adam b2 equal to 1 in float32": (_set("train.b2", 0.999999999),
                                      r"train.b2=0.999999999 must be in \[0, 1\) in float32"),
    "adam b1 equal to 1 in float32": (_set("train.b1", 0.99999999999),
                                      r"train.b1=0.99999999999 must be in \[0, 1\) in float32"),
    # Above 0 in Python, 0 in float32 (below its smallest normal number, flushed to zero).
    "validation fraction zero in float32": (_set("data.validation_fraction", 1e-50),
                                            r"data.validation_fraction=1e-50 must be in \(0, 0.5\] in float32"),
    "span length infinite in float32": (_set("data.mean_noise_span_length", 1e300),
                                        r"data.mean_noise_span_length=1e\+300 must be >= 1 and at most float32's"),
    "rotary factor infinite in float32": (_set("model.rope_short_factor", (1.0, 1e300)),
                                          r"model.rope_short_factor=\(1.0, 1e\+300\) must be a tuple of numbers each "
                                          r"> 0 and in float32's normal range"),
    "dropout of 1": (_set("model.dropout", 1.0), r"model.dropout=1.0 must be in \[0, 1\)"),
    "odd head dimension": (_set("model.head_dim", 7), "model.head_dim"),
    "unknown norm": (_set("model.norm", "batchnorm"), "model.norm='batchnorm' must be one of"),
    "zero steps": (_set("train.num_steps", 0), "train.num_steps=0 must be >= 1"),
    "moe interval beyond the depth": (_set("model.moe_layer_interval", 9), "model.moe_layer_interval=9"),
    "init scale of zero": (_set("model.init_scale", 0.0), "model.init_scale=0.0 must be > 0"),
    "validation fraction out of range": (_set("data.validation_fraction", 0.9), "data.validation_fraction"),
    "routing group not dividing the batch": (_set("moe.group_size", 100), r"moe.group_size=100 must divide"),
    "fewer routing groups than devices": (_set("moe.group_size", 1024), r"gives 4 routing groups"),
    "seed beyond 32 bits": (_set("seed", 2**32), r"seed=4294967296 must be in \[0, 2\*\*32\)"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_config_raises_value_error_naming_the_problem_before_any_compilation(name, monkeypatch, tmp_path):
  mutate, message = INVALID[name]
  config = config_lib.default_config()
  config.mesh.data, config.mesh.expert = 2, 4
  config.data.data_dir = str(tmp_path / "tfds")
  mutate(config)

  def unreachable(*args, **kwargs):
    raise AssertionError("validation let a bad config through to mesh creation")

  monkeypatch.setattr(parallel, "create_mesh", unreachable)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_every_config_in_configs_validates():
  from configs import lm

  for variant in ("switch-cpu", "dense-cpu", "switch-base", "dense-base", "switch-large", "dense-large"):
    devices = 1 if variant.endswith("cpu") else 128
    config = lm.get_config(variant)
    config.data.tokenizer = "byte"  # the paper configs point at a pod's SentencePiece model
    config.data.dataset = "stdlib"
    resolve.resolve(config, device_count=devices)


def test_every_field_is_documented():
  docs = open(os.path.join(REPO, config_lib.DOCS_PATH)).read()
  assert config_lib.config_docs() == docs, "docs/config.md is stale: run python -m moe_jax.config_lib"
  for field in config_lib.default_config().data:
    assert f"data.{field}" in docs


def test_cli_reports_bad_values_in_one_line_without_a_traceback(tmp_path):
  cases = {
      "--config.moe.capacity_factor=0": "moe.capacity_factor=0.0 must be > 0",
      "--config.model.no_such_field=1": "no_such_field",
      "--config.train.num_steps=ten": "num_steps",
      "--config.data.dataset=c5/en": "data.dataset='c5/en' must be one of",
  }
  for flag, message in cases.items():
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "train.py"), f"--config={REPO}/configs/lm.py:switch-cpu",
         f"--workdir={tmp_path}", flag],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"), capture_output=True,
        text=True, timeout=120,
    )
    assert run.returncode != 0, flag
    assert message in run.stderr, (flag, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "jaxlib" not in run.stderr, (flag, run.stderr[-2000:])


def test_resolve_records_each_auto_value_it_makes_concrete(capsys):
  config = config_lib.default_config()
  config.mesh.data, config.mesh.expert = 0, 4
  config.moe.dropless, config.moe.dispatch, config.moe.router, config.moe.top_k.k = True, "dropless", "top_k", 2
  run = resolve.resolve(config, device_count=8, platform="cpu", log=True)
  decided = {d.field: (d.requested, d.resolved) for d in run.decisions}
  assert decided == {"mesh.data": (0, 2), "model.vocab_size": (0, 259), "moe.dispatch": ("dropless", "gather")}
  assert run.config.mesh.data == 2 and run.requested.mesh.data == 0  # the request is kept as it was
  assert run.derived == {"moe.tokens_per_group": 128, "moe.capacity": 128, "moe.eval_capacity": 128}
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 3 and all(line.startswith("resolve: ") for line in printed)
  record = run.record()
  assert record["requested"]["mesh"]["data"] == 0 and record["resolved"]["mesh"]["data"] == 2
  assert [d["field"] for d in record["decisions"]] == ["mesh.data", "model.vocab_size", "moe.dispatch"]


@pytest.mark.parametrize("platform,mesh,backend", [("cpu", (8, 1), "dropless"), ("gpu", (8, 1), "ragged_dot"),
                                                   ("tpu", (2, 4), "gather")])
def test_auto_dispatch_resolves_per_platform_and_mesh(platform, mesh, backend, monkeypatch):
  # Without the optional packages: with tokamax installed a GPU's auto is 'tokamax' (tests/test_dispatch_backends.py).
  monkeypatch.setattr(dispatch, "installed_optional", lambda: ())
  config = config_lib.default_config()
  config.mesh.data, config.mesh.expert = mesh
  config.moe.dropless, config.moe.dispatch = True, "auto"
  run = resolve.resolve(config, device_count=8, platform=platform)
  assert run.config.moe.dispatch == backend
  assert [d for d in run.decisions if d.field == "moe.dispatch"][0].requested == "auto"


def test_resolve_computes_capacity_from_the_one_convention():
  config = config_lib.default_config()  # 8 experts, groups of 128 tokens, capacity factors 1.25 / 2.0
  run = resolve.resolve(config, device_count=1)
  assert run.derived == {"moe.tokens_per_group": 128, "moe.capacity": 20, "moe.eval_capacity": 32}
  assert run.decisions[0].field == "model.vocab_size" and len(run.decisions) == 1


def test_config_json_records_requested_and_resolved_values(tmp_path):
  config = tiny_config(str(tmp_path / "tfds"), steps=1, mesh=(0, 4))
  # config.json is written once every check passed, before the first step: stopping at step 0 compiles no step.
  assert train.train_and_evaluate(config, str(tmp_path), stop_at_step=0).status == "stopped"
  record = json.load(open(tmp_path / "config.json"))
  assert record["requested"]["mesh"]["data"] == 0
  assert record["resolved"]["mesh"]["data"] == 2
  assert {"field": "mesh.data", "requested": 0, "resolved": 2, "why": "8 devices / mesh.expert=4"} in record["decisions"]


def test_routing_groups_must_tile_the_decoder_targets_of_an_encoder_decoder():
  """The decoder stack routes batch x targets-length tokens: 16 x 29 at 128 inputs, which 64 does not divide."""
  from configs import switch_t5

  config = switch_t5.get_config("switch-base-cpu")
  config.moe.group_size = 64
  with pytest.raises(ValueError, match=r"moe.group_size=64 must divide train.batch_size \* span-corruption targets "
                                       r"length \(of train.seq_len=128\) = 16 \* 29 = 464"):
    resolve.resolve(config, device_count=1)
  config.train.seq_len = 104  # 24 targets: 64 tiles 16 x 104 and 16 x 24
  resolve.resolve(config, device_count=1)
  config.moe.router, config.moe.group_size = "base", 0  # one group per sequence: 24 targets, 104 inputs, 8 | both
  resolve.resolve(config, device_count=1)
  config.train.seq_len = 128  # 29 decoder tokens cannot split evenly over 8 experts
  with pytest.raises(ValueError, match=r"S=29 must be a multiple of moe.num_experts=8 \(span-corruption targets length"):
    resolve.resolve(config, device_count=1)
