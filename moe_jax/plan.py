"""Ahead-of-time plans: compile a config's training step for a mesh from abstract inputs and read XLA's memory
figures next to the analytical estimate. The command line is experiments/plan.py (its docstring says how to
read the numbers).

The step is `moe_jax.train.make_train_step`, the one a run executes, lowered with abstract inputs
(`jax.ShapeDtypeStruct` state and batch with the run's shardings; no array is allocated) and compiled for the
mesh's devices, which must exist in this process (emulated CPU devices: experiments/plan.py sets
`--xla_force_host_platform_device_count` before jax is imported).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import config_lib, data as data_lib, flops, parallel, runstate, train
from moe_jax.data import span_corruption

GIB = 2.0**30
# Memory per chip (HBM), as the vendors state it: TPU in GiB (cloud.google.com/tpu/docs/system-architecture-tpu-vm),
# NVIDIA in GB (decimal, product pages).
CHIPS = {"TPU v4 32 GiB": 32 * GIB, "TPU v5e 16 GiB": 16 * GIB, "TPU v5p 95 GiB": 95 * GIB,
         "TPU v6e 32 GiB": 32 * GIB, "H100 80 GB": 80e9, "H200 141 GB": 141e9}
# The data fields that shape a training batch (the encoder-decoder's span-corruption lengths); the rest of the
# data section (dataset, paths) does not enter the step.
SHAPING_DATA_FIELDS = ("objective", "noise_density", "mean_noise_span_length", "num_sentinels")


def _checked(config, sizes) -> config_lib.ExperimentConfig:
  """The typed experiment config with the mesh set to `sizes`, checked by the schema (ValueError naming the
  field). The data section does not shape the step: its defaults stand in (a pod config's tokenizer path need
  not exist here), except for the fields that shape the encoder-decoder's batch (the span-corruption lengths)."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = sizes
  sections = {s.NAME: config_lib.section_from_config(s, config[s.NAME]) for s in config_lib.SECTIONS
              if s is not config_lib.DataConfig}
  data = config_lib.DataConfig(**{name: config.data[name] for name in SHAPING_DATA_FIELDS})
  return config_lib.ExperimentConfig(seed=config.seed, data=data, **sections)


def _shard_bytes(leaves) -> float:
  """Bytes one device holds of these abstract arrays (their shard shapes; the largest shard per device)."""
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def abstract_batch(exp: config_lib.ExperimentConfig, model_cfg, sharding: NamedSharding) -> dict:
  """The training batch of `exp` as `jax.ShapeDtypeStruct`s split by `sharding`: inputs, targets and weights
  [B, L] for the decoder LM; for the encoder-decoder, inputs [B, L] and decoder inputs, targets and weights
  [B, T] with T the span-corruption targets length of L (moe_jax.data.span_corruption)."""
  batch_size, seq_len = exp.train.batch_size, exp.train.seq_len
  target_len = seq_len
  if model_cfg.architecture == "encoder_decoder":
    target_len = span_corruption.lengths(seq_len, exp.data.noise_density, exp.data.mean_noise_span_length).targets
  tokens = lambda length, dtype=jnp.int32: jax.ShapeDtypeStruct((batch_size, length), dtype, sharding=sharding)
  batch = {"inputs": tokens(seq_len), "targets": tokens(target_len), "weights": tokens(target_len, jnp.float32)}
  if model_cfg.architecture == "encoder_decoder":
    batch["decoder_inputs"] = tokens(target_len)
  return batch


def compile_step(exp: config_lib.ExperimentConfig, model_cfg, sizes):
  """Lower and compile the training step for the mesh of `sizes`; the per-device figures in bytes."""
  data, fsdp, expert, tensor = sizes
  mesh = parallel.create_mesh(data, expert, fsdp=fsdp, tensor=tensor)
  graphdef, state = runstate.abstract(exp, model_cfg, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  with parallel.mesh_context(mesh):
    step = train.make_train_step(graphdef, exp.train, exp.seed, skip_nonfinite=False, state_sharding=shardings)
    batch = abstract_batch(exp, model_cfg, runstate.batch_sharding(mesh))
    compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jnp.int32)).compile()
  memory = compiled.memory_analysis()
  model_state, optimizer_state = state[0], state[1]  # the State of the (model, optimizer) pair
  return {
      "params": _shard_bytes(jax.tree.leaves(nnx.filter_state(model_state, nnx.Param))),
      "optimizer": _shard_bytes(jax.tree.leaves(optimizer_state)),
      "arguments": float(memory.argument_size_in_bytes),
      "temporaries": float(memory.temp_size_in_bytes),
      "outputs_not_aliased": float(memory.output_size_in_bytes - memory.alias_size_in_bytes),
  }


def _with_depth(model_cfg, num_layers: int):
  return dataclasses.replace(model_cfg, num_layers=num_layers)


def plan(config, sizes, *, extrapolate: bool = False) -> dict:
  """Every figure plan.py prints, for `config` (an experiment ConfigDict) on the mesh of `sizes`."""
  exp = _checked(config, sizes)
  # Where model.vocab_size is 0: the byte tokenizer's (the data section's default), with span corruption's sentinels.
  model_cfg = config_lib.model_config(exp, vocab_size=data_lib.pipeline.model_vocab_size(exp.data))
  depth = model_cfg.num_layers
  period = model_cfg.moe_layer_interval or 1
  first, second = model_cfg.moe_start_block + period, model_cfg.moe_start_block + 2 * period
  if extrapolate and second < depth:
    low = compile_step(exp, _with_depth(model_cfg, first), sizes)
    high = compile_step(exp, _with_depth(model_cfg, second), sizes)
    xla = {k: low[k] + (high[k] - low[k]) * (depth - first) / period for k in low}
    how = (f"compiled at {first} and {second} blocks and extended linearly to {depth} (exact for parameters and "
           "optimizer state, approximate for temporaries)")
  else:
    xla = compile_step(exp, model_cfg, sizes)
    how = f"compiled at the full depth of {depth} blocks"
  xla["peak"] = xla["arguments"] + xla["temporaries"] + xla["outputs_not_aliased"]
  data, fsdp, expert, tensor = sizes
  estimate = flops.memory_estimate(model_cfg, batch_size=exp.train.batch_size, seq_len=exp.train.seq_len,
                                   optimizer=exp.train.optimizer, data_devices=data, expert_devices=expert,
                                   fsdp_devices=fsdp, tensor_devices=tensor)
  analytical = {"params": estimate.params, "optimizer": estimate.optimizer, "gradients": estimate.gradients,
                "activations": estimate.activations, "total": estimate.total}
  return {
      "mesh": dict(zip(config_lib.MESH_AXES, sizes)), "devices": math.prod(sizes),
      "batch_size": exp.train.batch_size, "seq_len": exp.train.seq_len, "remat": model_cfg.remat,
      "dtype": model_cfg.dtype, "optimizer": exp.train.optimizer, "how": how, "xla": xla,
      "analytical": analytical,
      "fits": {chip: {"capacity": capacity, "fits": xla["peak"] <= capacity}
               for chip, capacity in CHIPS.items()},
  }


def format_plan(result: dict, source: str) -> str:
  unit, scale = ("GiB", GIB) if result["xla"]["peak"] >= GIB else ("MiB", 2.0**20)
  g = lambda b: f"{b / scale:9.2f} {unit}"
  x, a = result["xla"], result["analytical"]
  mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
  lines = [
      f"plan: {source} on mesh {mesh} ({result['devices']} devices); batch {result['batch_size']} x "
      f"{result['seq_len']} tokens, {result['dtype']} compute, remat={result['remat']}, {result['optimizer']}",
      f"      XLA:CPU, {result['how']}",
      f"{'per device':<40}{'XLA (compiled)':>16}{'analytical':>16}",
      f"{'parameters':<40}{g(x['params']):>16}{g(a['params']):>16}",
      f"{'optimizer state':<40}{g(x['optimizer']):>16}{g(a['optimizer']):>16}",
      f"{'arguments (state + batch)':<40}{g(x['arguments']):>16}{'':>16}",
      f"{'gradients':<40}{'in temporaries':>16}{g(a['gradients']):>16}",
      f"{'temporaries (activations, workspace)':<40}{g(x['temporaries']):>16}{g(a['activations']):>16}",
      f"{'outputs not aliased to donated inputs':<40}{g(x['outputs_not_aliased']):>16}{'':>16}",
      f"{'peak':<40}{g(x['peak']):>16}{g(a['total']):>16}",
      "fits (peak <= memory; no margin for the runtime's own reserve): "
      + ", ".join(f"{chip} {'yes' if v['fits'] else 'no'}" for chip, v in result["fits"].items()),
  ]
  return "\n".join(lines)
