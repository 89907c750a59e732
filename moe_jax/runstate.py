"""A run's state: the model and optimizer of a config on a mesh, the checkpoints they are saved to and restored
from, and the batches they run on. The one way to build, restore and feed a model: training (moe_jax.train),
upcycling, planning, the experiments and benchmarks, and every tool that opens a run's workdir use it.

  model = runstate.build(config)                  # one device, no mesh: ready for models.forward(model, batch)
  with parallel.mesh_context(mesh):
    model = runstate.build(config)                # on the context's mesh, each parameter in its sharding
  run = runstate.load(workdir, mesh=mesh)         # a run's newest checkpoint (or `step=`), on any mesh

`config` is an experiment ConfigDict (configs/*.py); `build` and `load` resolve it for the mesh they place the
model on (its `mesh` section replaced by that mesh's sizes), so one config builds on any mesh.

Readers never change a run's files: `load` opens the checkpoints read-only, and a checkpoint that cannot be
restored is reported and skipped, never moved. Only the run's own trainer quarantines one
(`moe_jax.checkpoint`), through `restore` with its writable Checkpointer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import threading
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax import config_lib, data as data_lib, models, optim, parallel
from moe_jax import resolve as resolve_lib
from moe_jax.checkpoint import Checkpointer
from moe_jax.moe_layer import RouterBias

BATCH_SPEC = P(parallel.TOKEN_AXES)  # sequences split over every device but the 'tensor' ones
PREFETCH_STEPS = 2  # global batches the background thread keeps on device ahead of the step


# ----------------------------------------------------------------------------------------------------------
# Building.


def context_mesh() -> Mesh | None:
  """The mesh of the enclosing `parallel.mesh_context` (or `jax.set_mesh`), None outside one."""
  mesh = jax.sharding.get_mesh()
  return None if mesh.empty else mesh


@contextlib.contextmanager
def placed_on(mesh: Mesh | None) -> Iterator[None]:
  """Arrays created inside are placed on `mesh` by their logical axes (`parallel.mesh_context`); with None,
  unplaced on the default device (`models.unplaced_outside_mesh`)."""
  with parallel.mesh_context(mesh) if mesh is not None else models.unplaced_outside_mesh():
    yield


def resolve_for_mesh(config: ml_collections.ConfigDict, mesh: Mesh | None) -> resolve_lib.Resolved:
  """`config` resolved (moe_jax.resolve) with its mesh section set to `mesh`'s axis sizes (all 1 for None: one
  device). ValueError naming the field for a config that does not fit the mesh (say, train.batch_size)."""
  if mesh is not None and tuple(mesh.axis_names) != parallel.MESH_AXES:
    raise ValueError(f"mesh: axes {tuple(mesh.axis_names)} must be {parallel.MESH_AXES} (parallel.create_mesh)")
  config = config.copy_and_resolve_references()
  for name in parallel.MESH_AXES:
    config.mesh[name] = 1 if mesh is None else mesh.shape[name]
  return resolve_lib.resolve(config, 1 if mesh is None else mesh.size)


def model_config(run: resolve_lib.Resolved) -> config_lib.ModelConfig:
  """The typed model config of a resolved run (its vocabulary is concrete after resolution)."""
  return config_lib.model_config(run.typed, vocab_size=run.typed.model.vocab_size)


def _fresh(exp: config_lib.ExperimentConfig, model_cfg: config_lib.ModelConfig) -> tuple[nnx.Module, nnx.Optimizer]:
  """A run's step-0 model and optimizer: parameters seeded by exp.seed, the dropout streams by exp.seed + 1."""
  model = models.build(model_cfg, rngs=nnx.Rngs(params=exp.seed, dropout=exp.seed + 1))
  return model, nnx.Optimizer(model, optim.make_optimizer(exp.train), wrt=nnx.Param)


def create(exp: config_lib.ExperimentConfig, model_cfg: config_lib.ModelConfig,
           mesh: Mesh | None) -> tuple[nnx.Module, nnx.Optimizer]:
  """The model and optimizer a run of `exp` starts from, every array on `mesh` in its `stable_shardings` (None:
  on the default device).

  Initialised under jit: eager initialisers would run replicated on every device (17.6 GB peak for 128 experts
  on 8 devices vs 0.4 GB jitted); jit creates each parameter directly in its sharding.
  """
  with placed_on(mesh):
    model, optimizer = nnx.jit(lambda: _fresh(exp, model_cfg))()
    if mesh is None:
      return model, optimizer
    graphdef, state = nnx.split((model, optimizer))
    return nnx.merge(graphdef, jax.device_put(state, stable_shardings(state, mesh)))


def build(config: ml_collections.ConfigDict, *, mesh: Mesh | None = None) -> nnx.Module:
  """The model of `config` (an experiment config, e.g. `configs/lm.py`'s) at step 0, ready to run:
  `logits, aux = models.forward(model, batch)`.

  mesh: where its parameters live; default the mesh of the enclosing `parallel.mesh_context`, or outside one
  the default device with no mesh. Run it where it was built (under the same mesh context). Only the model is
  made: no optimizer state.
  """
  mesh = mesh if mesh is not None else context_mesh()
  run = resolve_for_mesh(config, mesh)
  model_cfg = model_config(run)
  with placed_on(mesh):
    return nnx.jit(lambda: _fresh(run.typed, model_cfg)[0])()


def abstract(exp: config_lib.ExperimentConfig, model_cfg: config_lib.ModelConfig,
             mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) of the (model, optimizer) pair `create` makes, every leaf a `jax.ShapeDtypeStruct` with
  its sharding on `mesh` (replicated where its variable has no logical axes): no array is allocated, so a model
  of any size can be lowered and compiled ahead of time (moe_jax.plan)."""
  with parallel.mesh_context(mesh):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _fresh(exp, model_cfg)))
    shardings = nnx.get_named_sharding(state, mesh)
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated, shardings)
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def stable_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """Each leaf's sharding on `mesh`, replicated where it has none there (optimizer counts, factored moments).

  The step's state goes in and comes out with exactly these: were the compiler to choose other shardings for
  its outputs, the second step would compile a second program, and a run resumed from a checkpoint (restored
  with the initial shardings) would run the first-step program where an uninterrupted run runs the other one,
  with results that may differ in the last bits. Pinned, every step of every run is one program, and the
  donated input buffers can be reused for the outputs.
  """
  replicated = NamedSharding(mesh, P())

  def pick(x):
    sharding = x.sharding
    return sharding if isinstance(sharding, NamedSharding) and sharding.mesh == mesh else replicated

  return jax.tree.map(pick, state)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_tree(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
  """The array tree a checkpoint holds: {'params': the model's parameters, 'optimizer': the optimizer's state}.

  'params' also holds DeepSeek-V3's balancing bias (moe_layer.RouterBias): model state a resumed run needs,
  restored by the same nnx.update; a model without one saves the same tree as before.
  """
  return {"params": nnx.state(model, nnx.Any(nnx.Param, RouterBias)), "optimizer": nnx.state(optimizer)}


def restore(checkpointer: Checkpointer, model: nnx.Module, optimizer: nnx.Optimizer, *,
            max_step: int | None = None,
            check_meta: Callable[[dict], None] = lambda meta: None) -> tuple[int, dict] | None:
  """Update `model` and `optimizer` in place from the newest restorable checkpoint at or before `max_step` (None:
  any); (its step, its metadata), or None when there is none.

  Each array is read straight into the sharding it has now, so a checkpoint written on one mesh restores onto
  any other. `check_meta` sees each step's metadata first; its ValueError propagates (a user error, not a
  corrupt file). A checkpoint that cannot be read is skipped for the one before it: moved aside by a writable
  `checkpointer` (the run's own trainer), left in place by a read-only one.
  """
  abstract_tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                               checkpoint_tree(model, optimizer))
  restored = checkpointer.restore_latest(abstract_tree, check_meta=check_meta, max_step=max_step)
  if restored is None:
    return None
  step, tree, meta = restored
  nnx.update(model, tree["params"])
  nnx.update(optimizer, tree["optimizer"])
  return step, meta


@dataclasses.dataclass
class Loaded:
  """A run's checkpoint, restored by `load`."""

  config: ml_collections.ConfigDict  # the run's resolved config, its mesh section the mesh it was loaded on
  typed: config_lib.ExperimentConfig  # the same, typed
  model: nnx.Module
  optimizer: nnx.Optimizer
  step: int
  meta: dict  # the checkpoint's metadata: data position, config, ...


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of the training run in `workdir` (its config.json); ValueError naming the path when
  `workdir` is not a run's."""
  record = os.path.join(workdir, "config.json")
  if not os.path.isfile(record):
    raise ValueError(f"{record} does not exist: {workdir} is not the workdir of a training run")
  with open(record) as f:
    # Runs saved before a field was renamed, moved (config_lib.RENAMED) or added keep loading.
    return config_lib.saved_config(json.load(f)["resolved"])


def _check_recorded_config(workdir: str, config: ml_collections.ConfigDict, meta: dict) -> None:
  """ValueError naming config.json and each model/moe field where it disagrees with the config the checkpoint of
  `meta` was saved with (config.json edited by hand): the model built from config.json would not have the
  checkpoint's shapes, and its arrays would fail to restore as if the checkpoint were corrupt. A checkpoint that
  recorded no config (one written by hand, as some tests do; the trainer, upcycling and imports all record it) is
  not checked."""
  if "config" not in meta:
    return
  changes = config_lib.config_changes(meta["config"], config_lib.to_dict(config))
  differing = {path: change for path, change in changes.items() if path.split(".")[0] in ("model", "moe")}
  if differing:
    raise ValueError(
        f"{os.path.join(workdir, 'config.json')} disagrees with the config its checkpoint at step {meta['step']} was "
        "saved with (was it edited?): "
        + "; ".join(f"{path}: config.json {new!r}, checkpoint {old!r}" for path, (old, new) in differing.items())
        + ". Nothing was changed; rerunning the run's own command writes config.json again")


def load(workdir: str, *, mesh: Mesh | None = None, step: int | None = None) -> Loaded:
  """The model and optimizer of the training run in `workdir` at checkpoint `step` (None: the newest that
  restores) on `mesh` (default: the enclosing mesh context's, else one device), whatever mesh the run used.

  Read-only: nothing in `workdir` is created, moved or changed, so another run's workdir (a running one
  included) is safe to open. ValueError naming the path or the step when there is nothing to restore, and naming
  config.json's fields when they disagree with the checkpoint's recorded config (an edited config.json).
  """
  config = run_config(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory} does not exist: the run in {workdir} has saved no checkpoint")
  mesh = mesh if mesh is not None else context_mesh()
  run = resolve_for_mesh(config, mesh)
  checkpointer = Checkpointer(directory, keep=run.typed.train.keep_checkpoints, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if step is not None and step not in steps:
      raise ValueError(f"step={step} is not a checkpoint in {directory} (it holds steps {steps or 'none'})")
    model, optimizer = create(run.typed, model_config(run), mesh)
    restored = restore(checkpointer, model, optimizer, max_step=step,
                       check_meta=lambda meta: _check_recorded_config(workdir, config, meta))
  finally:
    checkpointer.close()
  if restored is None or (step is not None and restored[0] != step):
    wanted = f"step {step}" if step is not None else f"any of steps {steps or 'none'}"
    raise ValueError(f"{directory}: {wanted} cannot be restored (see the warnings above)")
  return Loaded(config=run.config, typed=run.typed, model=model, optimizer=optimizer, step=restored[0], meta=restored[1])


# ----------------------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """How a global batch [B, ...] lies on `mesh`: its rows split over the token axes (`BATCH_SPEC`)."""
  return NamedSharding(mesh, BATCH_SPEC)


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Process-local numpy batch -> one global array per field, split over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train_batches(exp: config_lib.ExperimentConfig):
  """The training batches this process reads: its rows of every global batch of exp.train.batch_size, in the
  order of exp.seed, endless (a grain iterator: `get_state()` / `set_state()` resume it exactly)."""
  return data_lib.create_iterator(
      exp.data, split="train", batch_size=exp.train.batch_size // jax.process_count(), seq_len=exp.train.seq_len,
      seed=exp.seed, shard_index=jax.process_index(), shard_count=jax.process_count(), repeat=True)


class BatchPrefetcher:
  """Prepares the next global batches on device in a background thread, each with the data-iterator state
  right after it, so that a checkpoint records the position of the batches consumed, not of those prefetched."""

  def __init__(self, iterator, sharding: NamedSharding, depth: int = PREFETCH_STEPS):
    self._iterator, self._sharding = iterator, sharding
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
    self._thread.start()

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        batch = next(self._iterator)
        item = (global_batch(batch, self._sharding), self._iterator.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except BaseException as error:  # handed to the training thread, which raises it
      self._queue.put(error)

  def next(self) -> tuple[dict, dict]:
    """(global batch, iterator state after it)."""
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    with contextlib.suppress(queue.Empty):
      while True:
        self._queue.get_nowait()
    self._thread.join(timeout=10)
