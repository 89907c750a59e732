"""Helpers shared by the tests: a tiny config, the CLI command, losses read back from a run, a run's workdir
written without training, and the parameter count of a built model."""

import json
import math
import os
import sys

import jax
from flax import nnx

from moe_jax import config_lib, parallel
from moe_jax.metrics import read_metrics
from moe_jax.model import TransformerLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, *, steps: int = 8, mesh=(2, 4), experts: int = 8):
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2, max_seq_len=32))
  config.moe.num_experts = experts
  config.moe.jitter_eps = 0.01  # exercise the noise RNG stream in resume tests
  config.data.data_dir = data_dir
  config.train.update(dict(
      batch_size=8, seq_len=32, num_steps=steps, warmup_steps=2, learning_rate=1e-2, eval_every=0,
      eval_batches=2, log_every=4, checkpoint_every=4, peak_tflops=1.0,
  ))
  config.mesh.data, config.mesh.expert = mesh
  return config


def train_command(variant: str, workdir, data_dir, **overrides) -> list[str]:
  """`python experiments/train.py` for configs/lm.py:<variant> with --config.<field>=<value> overrides
  (keys use '__' for '.', e.g. train__num_steps=12)."""
  return [
      sys.executable, os.path.join(REPO, "experiments", "train.py"), f"--config={REPO}/configs/lm.py:{variant}",
      f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.train.peak_tflops=1.0",
      *(f"--config.{key.replace('__', '.')}={value}" for key, value in overrides.items()),
  ]


def cpu_env(devices: int) -> dict:
  """The environment of a training subprocess with `devices` emulated CPU devices."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def train_losses(workdir) -> dict[int, float]:
  """Step -> training loss from metrics.jsonl (a resumed step's later record wins)."""
  return read_metrics(str(workdir)).series("loss")


def built_param_count(cfg: config_lib.ModelConfig) -> int:
  """The number of parameters of `TransformerLM(cfg)` as built (abstractly: a count needs shapes, not values,
  and initialising a model on the CPU takes seconds)."""
  with parallel.mesh_context(parallel.create_mesh(1, 1)):  # parameters carry logical axes
    model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def write_run(workdir: str, config, step: int = 3):
  """A run's workdir as training leaves it (config.json and one checkpoint at `step`) of a freshly created model
  of `config`, without training; returns the model."""
  from moe_jax import runstate
  from moe_jax.checkpoint import Checkpointer

  run = runstate.resolve_for_mesh(config, None)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(run.record(), f)
  model, optimizer = runstate.create(run.typed, runstate.model_config(run), None)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  checkpointer.save(step, runstate.checkpoint_tree(model, optimizer), {"step": step})
  checkpointer.wait()
  checkpointer.close()
  return model
