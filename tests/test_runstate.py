"""moe_jax.runstate: a model builds and runs in one call with or without a mesh (decoder LM and encoder-decoder, the
same outputs either way), and a run's checkpoint loads onto any mesh without its workdir being changed."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from configs import mixtral
from moe_jax import config_lib, models, parallel, runstate
from moe_jax.checkpoint import Checkpointer

VOCAB = 259  # the byte tokenizer's (model.vocab_size = 0 takes it; the encoder-decoder adds its sentinels)


def _config(architecture: str = "decoder"):
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2,
                           max_seq_len=32))
  config.moe.num_experts = 8
  config.train.update(dict(batch_size=8, seq_len=32))
  if architecture == "encoder_decoder":
    config.model.update(dict(architecture="encoder_decoder", positions="relative", num_decoder_layers=2))
    config.data.objective = "span_corruption"
  return config


def _batch(architecture: str) -> dict:
  inputs = jax.random.randint(jax.random.key(0), (8, 32), 3, VOCAB)
  if architecture == "decoder":
    return {"inputs": inputs}
  return {"inputs": inputs, "decoder_inputs": jax.random.randint(jax.random.key(1), (8, 8), 3, VOCAB)}


_forward = nnx.jit(models.forward)


def test_models_build_runs_a_config_without_any_mesh():
  """The notebook cell of issue 29: configs/mixtral.py:cpu built and run on one device, no mesh context."""
  model = models.build(config_lib.model_config(mixtral.get_config("cpu"), vocab_size=259), rngs=nnx.Rngs(0))
  logits, aux = models.forward(model, {"inputs": jnp.ones((2, 8), jnp.int32)})
  assert logits.shape == (2, 8, model.config.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
  assert aux.blocks  # the MoE blocks routed


# The encoder-decoder in the slow tier: two more models compiled on eight devices (~20 s on 2 cores).
@pytest.mark.parametrize("architecture", ["decoder", pytest.param("encoder_decoder", marks=pytest.mark.slow)])
def test_a_model_built_without_a_mesh_computes_what_it_computes_on_eight_devices(architecture):
  config, batch = _config(architecture), _batch(architecture)
  alone = runstate.build(config)
  logits, _ = _forward(alone, batch)
  mesh = parallel.create_mesh(2, 2, fsdp=2)
  with parallel.mesh_context(mesh):
    sharded = runstate.build(config)  # on the context's mesh
    mesh_logits, _ = _forward(sharded, batch)
  embedding = sharded.embed.embedding[...]  # [V, M], d_model split over 'fsdp'
  assert isinstance(embedding.sharding, NamedSharding) and embedding.sharding.mesh == mesh
  assert embedding.sharding.shard_shape(embedding.shape) == (embedding.shape[0], 16)
  assert len(alone.embed.embedding[...].sharding.device_set) == 1
  np.testing.assert_allclose(np.asarray(mesh_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)


def _params(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _write_run(workdir, config, steps) -> dict:
  """A workdir as a training run leaves it: config.json and a checkpoint at each of `steps` (the parameters
  shifted by the step, so that each checkpoint is told apart); the parameters saved, by step."""
  run = runstate.resolve_for_mesh(config, None)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(run.record(), f)
  model, optimizer = runstate.create(run.typed, runstate.model_config(run), None)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=len(steps))
  saved = {}
  for step in steps:
    nnx.update(model, jax.tree.map(lambda x: x + 1.0, nnx.state(model, nnx.Param)))
    checkpointer.save(step, runstate.checkpoint_tree(model, optimizer), {"step": step})
    checkpointer.wait()
    saved[step] = _params(model)
  checkpointer.close()
  return saved


@pytest.fixture(scope="module")
def written_run(tmp_path_factory) -> tuple[str, dict]:
  """(workdir, parameters by step) of a run with checkpoints at steps 2 and 4; tests that damage it copy it."""
  workdir = str(tmp_path_factory.mktemp("runstate") / "run")
  return workdir, _write_run(workdir, _config(), steps=(2, 4))


def _files(directory) -> dict[str, float]:
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, dirs, names in os.walk(directory) for name in names + dirs}


def test_load_restores_any_step_onto_any_mesh(written_run):
  workdir, saved = written_run
  newest = runstate.load(workdir)  # one device, no mesh
  assert newest.step == 4
  jax.tree.map(np.testing.assert_array_equal, _params(newest.model), saved[4])
  mesh = parallel.create_mesh(2, 4)
  with parallel.mesh_context(mesh):
    earlier = runstate.load(workdir, step=2)
  assert earlier.step == 2 and earlier.config.mesh.expert == 4
  kernel = earlier.model.blocks[1].ffn.wi_0[...]  # [E, M, F], experts split over the 'expert' axis
  assert kernel.sharding.mesh == mesh and kernel.sharding.shard_shape(kernel.shape)[0] == 2
  jax.tree.map(np.testing.assert_array_equal, _params(earlier.model), saved[2])
  with pytest.raises(ValueError, match=r"step=3 is not a checkpoint in .* \(it holds steps \[2, 4\]\)"):
    runstate.load(workdir, step=3)


def test_loading_never_changes_the_workdir_even_when_a_checkpoint_is_corrupt(written_run, tmp_path, capsys):
  workdir, saved = str(tmp_path / "run"), written_run[1]
  shutil.copytree(written_run[0], workdir)
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
    for name in names:  # every array file of step 4 truncated to half, as a crash mid-copy would leave it
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64:
        os.truncate(path, os.path.getsize(path) // 2)
  before = _files(workdir)
  loaded = runstate.load(workdir)
  assert loaded.step == 2  # the newest that restores
  jax.tree.map(np.testing.assert_array_equal, _params(loaded.model), saved[2])
  out = capsys.readouterr().out
  assert "checkpoint step 4" in out and "left in place" in out
  with pytest.raises(ValueError, match="step 4 cannot be restored"):
    runstate.load(workdir, step=4)
  assert _files(workdir) == before  # nothing moved aside, created or rewritten


def test_a_directory_that_is_not_a_run_is_refused_without_being_written(tmp_path):
  with pytest.raises(ValueError, match="config.json does not exist"):
    runstate.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"resolved": config_lib.to_dict(_config())}))
  with pytest.raises(ValueError, match="has saved no checkpoint"):
    runstate.load(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json"]
