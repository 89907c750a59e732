"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055, Sec. 3): a dense model's parameters as the start
of a mixture-of-experts model, each expert of a MoE layer a copy of the dense FFN it replaces, the routers new.

Axis legend: E experts · M d_model · F d_ff.

Works on parameter states (`nnx.State`), so on any architecture built from the same blocks (the decoder LM,
`moe_jax.model`, and the encoder-decoder, `moe_jax.encdec`): the MoE model is the dense config with
`model.moe_layer_interval` > 0, so its parameter paths are the dense model's, except that a MoE block's
`ffn.wi_0` / `ffn.wi_1` / `ffn.wo` gain a leading expert axis and its `ffn.router` (and DeepSeek-V3's
`ffn.router_bias`) are new.

Why the upcycled model starts where the dense one is. All E experts compute the dense FFN(x), so a layer's
output is (sum of the token's combine weights) x FFN(x). With weights that sum to 1 and no token dropped
(router='top_k' with `moe.top_k.renormalize`, and `moe.dropless` or enough capacity), the MoE layer equals the dense
FFN exactly, whatever the fresh router says: the upcycled model's loss at step 0 is the dense model's. Switch's
top-1 router scales by its softmax probability (< 1), and capacity drops tokens, so there the start differs
(Komatsuzaki et al. keep top-k routing in the decoder and expert choice in the encoder; both start near the
dense model rather than on it).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import config_lib, parallel, runstate
from moe_jax import workdir as workdir_lib
from moe_jax import resolve as resolve_lib
from moe_jax.checkpoint import Checkpointer

EXPERT_WEIGHTS = ("wi_0", "wi_1", "wo")  # a MoE layer's stacked expert kernels [E, ...]
NEW_IN_MOE = ("router", "router_bias")  # initialised fresh, not taken from the dense model


def upcycle(dense: nnx.State, moe: nnx.State) -> nnx.State:
  """`moe` (the state of a freshly initialised MoE model) with every parameter taken from `dense` (the state of
  the dense model of the same widths): shared parameters copied, each MoE layer's expert kernels [E, M, F] /
  [E, F, M] the dense FFN's [M, F] / [F, M] repeated E times, routers kept as initialised.

  ValueError when the two do not correspond (a parameter of either without its counterpart, or a shape that is
  neither the dense one nor E copies of it): upcycling silently from a different config would train something
  else than intended.
  """
  dense_flat = dict(nnx.to_flat_state(dense))
  used = set()
  out = []
  for path, variable in nnx.to_flat_state(moe):
    name = ".".join(map(str, path))
    if path[-1] in NEW_IN_MOE:
      out.append((path, variable))
      continue
    if path not in dense_flat:
      raise ValueError(f"upcycle: the MoE model's {name} has no counterpart in the dense model")
    source = dense_flat[path][...]
    used.add(path)
    target_shape = variable[...].shape
    if target_shape == source.shape:
      value = source
    elif path[-1] in EXPERT_WEIGHTS and target_shape[1:] == source.shape:
      value = jnp.broadcast_to(source[None], target_shape)  # E copies of the dense FFN (Komatsuzaki Sec. 3.1)
    else:
      raise ValueError(f"upcycle: {name} has shape {target_shape} in the MoE model but {source.shape} in the dense "
                       "one (the experts must have the dense FFN's width: moe.expert_d_ff = 0)")
    out.append((path, variable.replace(value.astype(variable[...].dtype))))
  unused = sorted(".".join(map(str, p)) for p in set(dense_flat) - used)
  if unused:
    raise ValueError(f"upcycle: the dense model's {unused[:5]} have no place in the MoE model")
  return nnx.from_flat_state(out)


def upcycle_model(dense_model: nnx.Module, moe_model: nnx.Module) -> nnx.Module:
  """`moe_model` updated in place with `upcycle` of both models' parameters, and returned."""
  nnx.update(moe_model, upcycle(nnx.state(dense_model, nnx.Param), nnx.state(moe_model, nnx.Param)))
  return moe_model


def upcycle_checkpoint(dense_workdir: str, config, workdir: str) -> int:
  """Start the MoE run of `config` (an experiment ConfigDict) in `workdir` from the newest checkpoint of the dense
  run in `dense_workdir`: writes `workdir`'s step-0 checkpoint, the upcycled parameters with a fresh optimizer
  and data position, which `train.train_and_evaluate(config, workdir)` (or experiments/train.py) then resumes.
  Returns the dense step it upcycled.

  Both models live on the mesh the MoE run trains on (`config`'s, as training builds it). The dense run's widths
  must be `config`'s with every FFN dense (`upcycle` refuses anything else); its optimizer state is not carried
  over (Komatsuzaki et al. reset it too: the expert copies and the new routers start their own moments). The
  dense run's workdir is only read (`runstate.load`): a config.json that disagrees with its checkpoints is named,
  and no checkpoint of the dense run is moved. ValueError for an empty path (an unset shell variable would
  otherwise mean the current directory) or a workdir entry of the wrong type.
  """
  dense_workdir = workdir_lib.check_path_given(dense_workdir, "--dense_workdir")
  workdir = workdir_lib.check_workdir(workdir)
  dense_config = runstate.run_config(dense_workdir)
  if dense_config.model.moe_layer_interval:
    raise ValueError(f"upcycle: the run in {dense_workdir} already has MoE blocks (model.moe_layer_interval="
                     f"{dense_config.model.moe_layer_interval}); upcycling starts from a dense model")
  run = resolve_lib.resolve(config, jax.device_count())
  exp = run.typed
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ValueError(f"upcycle: {workdir} already holds checkpoints; pass a new workdir")
  mesh = parallel.create_mesh_for(exp.mesh)
  with parallel.mesh_context(mesh):
    dense = runstate.load(dense_workdir, mesh=mesh)
    moe, optimizer = runstate.create(exp, runstate.model_config(run), mesh)
    upcycle_model(dense.model, moe)
    data_iter = runstate.train_batches(exp)
    data_state = parallel.gather_strings(json.dumps(data_iter.get_state()))
    data_iter.close()
    os.makedirs(workdir, exist_ok=True)
    target = Checkpointer(checkpoints, keep=exp.train.keep_checkpoints)
    target.save(0, runstate.checkpoint_tree(moe, optimizer),
                {"data_state": data_state, "step": 0, "config": config_lib.to_dict(run.config),
                 "upcycled_from": {"workdir": os.path.abspath(dense_workdir), "step": dense.step}})
    target.wait()
    target.close()
  return dense.step
