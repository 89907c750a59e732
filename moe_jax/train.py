"""Train and evaluate a decoder LM (dense or MoE) from one config: the main loop of moe_jax.

loss = cross-entropy + alpha * sum_layers load-balancing loss (Switch eq. 4) + beta * sum_layers z-loss (ST-MoE eq. 5)

The run is resumable at any point: model, optimizer, step and data-iterator position are checkpointed, and all
randomness (dropout, router jitter) is a pure function of (seed, step), so a resumed run reproduces the losses
of an uninterrupted one bit for bit on CPU.

What a run survives and what it refuses is listed in docs/faults.md. In short: every check that can fail on
bad input (config, workdir, lock, resume compatibility, data, memory) runs before anything is compiled and
raises ValueError naming the field or path; SIGTERM and SIGINT save a checkpoint and return (a second SIGINT
exits at once); a non-finite loss stops the run naming the step, keeps every checkpoint written before it, and
says how to go on (`train.skip_nonfinite_batches`, `train.resume_step`); a failed checkpoint save raises
CheckpointError instead of hanging.

The step never waits for the host: metrics stay on device and are fetched every `train.log_every` steps (and
before every evaluation and save, so that no checkpoint is written before the losses leading to it were seen
to be finite); the state buffers are donated; a background thread prepares the next global batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import queue
import signal
import socket
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import config_lib, data as data_lib, flops, models, parallel
from moe_jax import resolve as resolve_lib
from moe_jax.checkpoint import SUPERSEDED_DIR, Checkpointer
from moe_jax.metrics import MetricWriter, Progress
from moe_jax.model import TransformerLM
from moe_jax.moe_layer import RouterBias


BATCH_SPEC = P(parallel.TOKEN_AXES)  # sequences split over every device but the 'tensor' ones
# RNG streams reseeded from (seed, step) before every step ('params' is only used at initialisation): dropout,
# router jitter and expert dropout all draw from forks of the 'dropout' stream.
RUNTIME_STREAMS = ("dropout",)
PREFETCH_STEPS = 2  # global batches the background thread keeps on device ahead of the step

EVAL_SEED = 0  # the validation order: fixed, so every run and seed is scored on the same documents


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived during start-up, before the first step: nothing was trained or saved."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"{signal.Signals(signum).name} during start-up: stopped before the first step; the workdir's "
                     "checkpoints are unchanged")


@dataclasses.dataclass
class TrainResult:
  status: str  # 'completed' | 'preempted' | 'stopped' | 'already_finished'
  step: int
  eval_loss: float | None
  wall_time_s: float
  workdir: str


# ----------------------------------------------------------------------------------------------------------
# Optimizer.

# The choices of train.optimizer and train.schedule (looked up by moe_jax.registry).
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to train.learning_rate, then cosine / linear / constant decay; or 'rsqrt', T5's and
  Switch's lr * sqrt(warmup / max(step, warmup)): constant for `warmup` steps, then inverse square root."""
  peak, warmup, total = train.learning_rate, train.warmup_steps, train.num_steps
  if train.schedule == "rsqrt":
    return lambda count: peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(count, max(warmup, 1)))
  decay_steps = max(total - warmup, 1)
  end = peak * train.min_lr_ratio
  if train.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio)
  elif train.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _state_axes(param_shape: tuple[int, ...], names: tuple, shape: tuple[int, ...]) -> tuple | None:
  """Logical axes for an optimizer-state leaf of `shape` derived from a parameter of `param_shape` with axes
  `names`: the same when the shapes are equal (Adam's moments), the parameter's axes less the one reduced
  for a factored moment of one rank less (Adafactor's row and column statistics; a dimension that could be
  either of two equal-sized ones is left unsplit), None otherwise (Adafactor's (1,) placeholders)."""
  if shape == param_shape:
    return names
  if len(shape) == len(param_shape) - 1:
    candidates = [names[:i] + names[i + 1:] for i in range(len(param_shape))
                  if param_shape[:i] + param_shape[i + 1:] == shape]
    if candidates:
      return tuple(name if all(c[j] == name for c in candidates) else None for j, name in enumerate(candidates[0]))
  return None


def _shard_state_like_params(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` whose state leaves are sharded along the parameter axes they keep (`_state_axes`).

  nnx.Optimizer copies each parameter's metadata onto the optimizer state derived from it, so Adam's moments
  are split like their parameters (over 'fsdp', 'expert', 'tensor'). Adafactor's factored second moments are of
  lower rank ([E, M] and [E, F] for an [E, M, F] expert kernel) or placeholders of shape (1,), and the copied
  annotation would fail eager sharding: they get the parameter's axes less the reduced one, so FSDP splits
  them too, and the placeholders become plain (replicated) arrays.
  """
  is_variable = lambda x: isinstance(x, nnx.Variable)

  def init(params):
    state = tx.init(params)
    param_shapes = {path: jnp.shape(leaf.get_value() if is_variable(leaf) else leaf) for path, leaf in
                    jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]}

    def derive(path, leaf):
      if not is_variable(leaf) or leaf.get_metadata().get("out_sharding") is None:
        return leaf
      shape, param_shape = jnp.shape(leaf.get_value()), _param_shape(path, param_shapes)
      if shape == param_shape:
        return leaf
      axes = _state_axes(param_shape, tuple(leaf.get_metadata()["out_sharding"]), shape)
      if axes is None:
        return leaf.get_value()
      return type(leaf)(leaf.get_value(), **{**leaf.get_metadata(), "out_sharding": axes})

    return jax.tree_util.tree_map_with_path(derive, state, is_leaf=is_variable)

  return optax.GradientTransformation(init, tx.update)


def _param_shape(path: tuple, param_shapes: dict[tuple, tuple[int, ...]]) -> tuple[int, ...]:
  """The shape of the parameter whose path ends `path` (optax nests each parameter tree under its state); the
  longest such path, should one parameter's path end another's."""
  matches = [p for p in param_shapes if len(p) <= len(path) and path[len(path) - len(p):] == p]
  if not matches:
    raise KeyError(f"no parameter for optimizer state {jax.tree_util.keystr(path)}")
  return param_shapes[max(matches, key=len)]


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = make_schedule(train)
  if train.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay)
  else:  # Adafactor, factored second moments (Shazeer & Stern 2018), as used by Switch.
    tx = optax.adafactor(schedule, decay_rate=train.adafactor_decay_rate,
                         weight_decay_rate=train.weight_decay or None)
  if train.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
  return _shard_state_like_params(tx)


# ----------------------------------------------------------------------------------------------------------
# Steps.


def summed_cross_entropy(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token cross-entropies, sum of weights); padding has weight 0."""
  token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, L]
  return jnp.sum(token_ce * batch["weights"]), jnp.sum(batch["weights"])


def lm_loss(model: TransformerLM, batch: dict, *, deterministic: bool, aux_loss_weight: float,
            z_loss_weight: float):
  """Weighted token cross-entropy plus the router losses; returns (loss, (cross_entropy, aux))."""
  logits, aux = models.forward(model, batch, deterministic=deterministic)
  ce_sum, weight_sum = summed_cross_entropy(logits, batch)
  ce = ce_sum / jnp.maximum(weight_sum, 1.0)
  loss = ce + aux_loss_weight * aux.load_balancing_loss + z_loss_weight * aux.router_z_loss
  loss = loss + aux.sequence_aux_loss  # DeepSeek-V3's sequence-wise loss, weighted (moe.top_k.sequence_aux_loss_weight)
  return loss, (ce, aux)


def _keep_old_unless(ok: jax.Array, new: Any, old_leaves: list[jax.Array]) -> Any:
  """`new` where `ok`, else the arrays `old_leaves` (PRNG keys are reseeded every step: always the new ones)."""

  def select(n, o):
    if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
      return n
    return jnp.where(ok, n, o)

  leaves, treedef = jax.tree.flatten(new)
  return jax.tree.unflatten(treedef, [select(n, o) for n, o in zip(leaves, old_leaves, strict=True)])


def stable_shardings(state: nnx.State, mesh) -> nnx.State:
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


def make_train_step(graphdef: nnx.GraphDef, train: ml_collections.ConfigDict, seed: int, *,
                    skip_nonfinite: bool, state_sharding: nnx.State | None = None):
  """`step(state, batch, step) -> (state, metrics)` over the split (model, optimizer) state, jitted with the
  state donated: the update happens in place, and nothing returns to the host. `state_sharding`
  (`stable_shardings`) pins the state's output shardings, so that every step runs one compiled program.

  With `skip_nonfinite`, a step whose loss or gradient norm is non-finite returns the state it was given
  (metrics['skipped'] = True), so a bad batch never poisons the parameters.
  """
  base_key = jax.random.key(seed)
  schedule = make_schedule(train)
  grad_sharding = None if state_sharding is None else nnx.filter_state(state_sharding[0], nnx.Param)

  def train_step(state: nnx.State, batch: dict, step: jax.Array):
    # The arrays, not the State: merge shares its Variables with the modules, which the update mutates.
    old_leaves = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    step_key = jax.random.fold_in(base_key, step)
    # match_shape: a scalar key is set as is (as before), the stacked keys of scanned blocks (model.scan_layers)
    # get one split per block.
    nnx.reseed(model, policy="match_shape",
               **{name: jax.random.fold_in(step_key, i) for i, name in enumerate(RUNTIME_STREAMS)})
    grad_fn = nnx.value_and_grad(
        lambda m: lm_loss(m, batch, deterministic=False, aux_loss_weight=train.aux_loss_weight,
                          z_loss_weight=train.z_loss_weight),
        has_aux=True,
    )
    (loss, (ce, aux)), grads = grad_fn(model)
    if grad_sharding is not None:
      # Each gradient split like its parameter as soon as it exists (FSDP's reduce-scatter), not kept whole until
      # the update: left to itself, GSPMD may hold every block's full gradient at once.
      grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    metrics = {
        "loss": loss,
        "cross_entropy": ce,
        "load_balancing_loss": aux.load_balancing_loss,
        "router_z_loss": aux.router_z_loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(step),
    }
    metrics["moe"] = aux.blocks  # {block index: MoeAux}; metric names are made by the writer
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
      new_state = _keep_old_unless(finite, new_state, old_leaves)
      metrics["skipped"] = ~finite
    return new_state, metrics

  out_shardings = None if state_sharding is None else (state_sharding, NamedSharding(
      jax.tree.leaves(state_sharding)[0].mesh, P()))
  return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)


@nnx.jit
def eval_step(model: TransformerLM, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropies and of weights (deterministic: no dropout, no jitter)."""
  logits, _ = models.forward(model, batch, deterministic=True)
  return summed_cross_entropy(logits, batch)


# ----------------------------------------------------------------------------------------------------------
# Helpers.


def measure_peak_flops(size: int = 1024, repeats: int = 5) -> float:
  """Float32 matmul FLOP/s of one device, measured now: the denominator of MFU when none is configured."""
  x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(x).block_until_ready()
  return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Process-local numpy batch -> one global array per field, split over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _checkpoint_tree(model: TransformerLM, optimizer: nnx.Optimizer) -> dict:
  # "params" also holds DeepSeek-V3's balancing bias (moe_layer.RouterBias): model state a resumed run needs,
  # restored by the same nnx.update; a model without one saves the same tree as before.
  return {"params": nnx.state(model, nnx.Any(nnx.Param, RouterBias)), "optimizer": nnx.state(optimizer)}


class _BatchPrefetcher:
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
        item = (_global_batch(batch, self._sharding), self._iterator.get_state())
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


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) during training become a flag the loop polls between steps, so
  the step in flight completes and a checkpoint is saved; a second SIGINT exits at once. During start-up
  (before `training()`), either raises `Interrupted`: there is nothing to save yet."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._training = False
    self._previous: dict = {}

  def __enter__(self):
    try:
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread: signal handling is the caller's business
      self._previous = {}
    return self

  def training(self) -> None:
    self._training = True

  def _handle(self, signum, frame):
    if not self._training:
      raise Interrupted(signum)
    if self.received is not None and signum == signal.SIGINT:
      print("second interrupt: exiting now without saving", flush=True)
      os._exit(128 + signum)
    self.received = signum
    print(f"{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
          "(Ctrl-C again to exit at once)", flush=True)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class _WorkdirLock:
  """An exclusive lock on `<workdir>/lock` naming its holder (pid, host). It is a kernel file lock, released
  when the process ends however it ends, so a killed run never leaves the workdir locked."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self._file = None

  def __enter__(self):
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise ValueError(f"workdir {os.path.dirname(self.path)} is in use by {holder}; wait for it to end or pass "
                       "another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


# ----------------------------------------------------------------------------------------------------------
# Checks before anything is built: each raises ValueError naming the field or path.


# Fields a checkpoint's run must share with the config that resumes it: they shape the state or the data.
RESUME_INVARIANT_FIELDS = ("seed", "model", "moe", "data.dataset", "data.tokenizer", "data.objective",
                           "data.num_sentinels", "train.batch_size", "train.seq_len", "train.optimizer")
# Fields that change the optimisation trajectory or the documents read: refused unless train.allow_changes.
SCHEDULE_FIELDS = ("train.learning_rate", "train.warmup_steps", "train.schedule", "train.min_lr_ratio",
                   "train.weight_decay", "train.b1", "train.b2", "train.adafactor_decay_rate",
                   "train.grad_clip_norm", "train.aux_loss_weight", "train.z_loss_weight")
DATA_FIELDS = ("data.text_dir", "data.text_glob", "data.validation_fraction", "data.noise_density",
               "data.mean_noise_span_length")
# Schedules whose shape depends on train.num_steps (rsqrt and constant do not).
SCHEDULES_OVER_NUM_STEPS = ("cosine", "linear")


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
  return any(path == p or path.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """Every leaf field that differs between a checkpoint's config (JSON dict) and `config`: path -> (old, new).

  A field the checkpoint's config lacks (added to the schema since) and that `config` leaves at its default is no
  change: the checkpoint's run computed what the default computes (e.g. model.remat='none', mesh.fsdp=1).
  """
  old, new = _leaves(config_lib.migrate(saved)), _leaves(json.loads(config.to_json()))
  defaults = _leaves(config_lib.to_dict(config_lib.default_config()))
  return {path: (old.get(path), new.get(path)) for path in sorted(set(old) | set(new))
          if old.get(path) != new.get(path) and not (path not in old and new.get(path) == defaults.get(path))}


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """The changes between a checkpoint's config and `config` that resuming accepts; ValueError for the others.

  Architecture, tokenizer, batch shape, optimizer and seed never change within a run. Schedule/optimizer
  hyper-parameters and the documents read (and num_steps under a schedule that depends on it) may change only
  with train.allow_changes=True. Everything else (logging, evaluation, checkpoint cadence, mesh) may change.
  """
  changes = config_changes(saved, config)
  fixed = [p for p in changes if _under(p, RESUME_INVARIANT_FIELDS)]
  if fixed:
    raise ValueError("the workdir holds a checkpoint of a different run (use a new --workdir or the same config): "
                     + "; ".join(f"{p}: checkpoint {changes[p][0]!r}, config {changes[p][1]!r}" for p in fixed))
  guarded = SCHEDULE_FIELDS + DATA_FIELDS
  if config.train.schedule in SCHEDULES_OVER_NUM_STEPS:
    guarded += ("train.num_steps",)
  refused = [p for p in changes if _under(p, guarded)]
  if refused and not config.train.allow_changes:
    raise ValueError("resuming with a changed schedule or data is refused: "
                     + "; ".join(f"{p}: checkpoint {changes[p][0]!r}, config {changes[p][1]!r}" for p in refused)
                     + ". Pass --config.train.allow_changes=True to resume anyway (recorded in resume_log.jsonl), "
                     "or use a new --workdir")
  return changes


def _check_workdir(workdir: str) -> None:
  """The workdir and its checkpoints folder are (or can be made) writable directories."""
  for path in (workdir, os.path.join(workdir, "checkpoints")):
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"workdir: {path} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as error:
    raise ValueError(f"workdir: {workdir} cannot be written ({error.strerror or error})") from None


def _device_memory() -> tuple[float, str]:
  """(bytes one device may use, where the figure comes from). CPU devices share the host's memory."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"{device.device_kind} memory"
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host / jax.local_device_count(), f"host memory shared by {jax.local_device_count()} CPU device(s)"


def _check_memory(config: ml_collections.ConfigDict, model_cfg, checkpoint_dir: str) -> None:
  """Refuse, with the numbers, a model that cannot fit the devices or whose checkpoint cannot fit the disk."""
  gib = 2.0**30
  estimate = flops.memory_estimate(model_cfg, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                                   optimizer=config.train.optimizer, data_devices=config.mesh.data,
                                   expert_devices=config.mesh.expert, fsdp_devices=config.mesh.fsdp,
                                   tensor_devices=config.mesh.tensor)
  available, source = _device_memory()
  if estimate.total > available:
    raise ValueError(
        f"the model does not fit: about {estimate.total / gib:.1f} GiB per device (parameters "
        f"{estimate.params / gib:.1f}, gradients {estimate.gradients / gib:.1f}, optimizer "
        f"{estimate.optimizer / gib:.1f}, activations {estimate.activations / gib:.1f}) but a device has "
        f"{available / gib:.1f} GiB ({source}); reduce model.d_model, model.d_ff, model.num_layers, "
        "moe.num_experts, train.batch_size or train.seq_len, or use more devices")
  disk = os.statvfs(os.path.dirname(checkpoint_dir))
  free = disk.f_bavail * disk.f_frsize
  if estimate.checkpoint > free:
    raise ValueError(f"workdir: one checkpoint needs about {estimate.checkpoint / gib:.2f} GiB but the disk of "
                     f"{checkpoint_dir} has {free / gib:.2f} GiB free")


def _check_has_tokens(iterator, split: str, num_batches: int, eos_id: int) -> None:
  """A split whose first batches hold no token but EOS and padding (a corpus of empty files) is refused: it
  would train on nothing and evaluate to a cross-entropy of 0."""
  for _ in range(num_batches):
    batch = next(iterator, None)
    if batch is None:
      break
    if np.any((batch["weights"] > 0) & (batch["targets"] != eos_id)):
      return
  raise ValueError(f"data: the {split} split has no tokens to {'train' if split == 'train' else 'evaluate'} on "
                   "(its documents are empty); check data.dataset, data.text_dir and data.text_glob")


def _agree(error: Exception | None) -> None:
  """Raise on every process if a check failed on any: a process that refuses alone would leave its peers
  waiting for it in the first collective."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  messages = parallel.gather_strings("" if error is None else f"{type(error).__name__}: {error}")
  failed = [(i, m) for i, m in enumerate(messages) if m]
  if error is not None:
    raise error
  if failed:
    index, message = failed[0]
    raise ValueError(f"process {index} refused to start: {message}")


def evaluation_iterator(config: ml_collections.ConfigDict):
  """The validation batches of this process: the same ones at every evaluation (EVAL_SEED)."""
  return data_lib.create_iterator(
      config.data, split="validation", batch_size=config.train.batch_size // jax.process_count(),
      seq_len=config.train.seq_len, seed=EVAL_SEED, shard_index=jax.process_index(),
      shard_count=jax.process_count(), repeat=False, num_batches=config.train.eval_batches,
  )


def evaluate(model: TransformerLM, config: ml_collections.ConfigDict, sharding: NamedSharding) -> float:
  """Mean token cross-entropy (nats) over the first `train.eval_batches` validation batches.

  The same batches every time, whatever config.seed (EVAL_SEED), so evaluations are comparable across
  steps, runs and seeds.
  """
  total = count = 0.0
  for batch in evaluation_iterator(config):
    ce_sum, weight_sum = eval_step(model, _global_batch(batch, sharding))
    total += float(ce_sum)
    count += float(weight_sum)
  return total / max(count, 1.0)


@dataclasses.dataclass
class _Start:
  """What the checks before compilation found."""

  resume_step: int | None  # the checkpoint to resume from; None: a fresh run
  changes: dict[str, tuple[Any, Any]]
  data_iter: Any
  record: dict  # config.json: the requested and resolved config and the decisions (resolve.Resolved.record)
  finished: bool = False  # the newest checkpoint is past train.num_steps


def _prepare(config, workdir, checkpointer: Checkpointer, tokenizer, record: dict) -> _Start:
  """Resume checks and data checks: everything that can refuse the run, before anything is written or built."""
  train = config.train
  steps = checkpointer.all_steps()
  wanted = train.resume_step
  if wanted and wanted not in steps:
    raise ValueError(f"train.resume_step={wanted} is not a checkpoint in {checkpointer.directory} "
                     f"(it holds steps {steps or 'none'})")
  candidates = [s for s in steps if not wanted or s <= wanted]
  resume_step, changes = None, {}
  for step in reversed(candidates):  # the newest whose metadata reads; a corrupt one is dealt with at restore
    meta = checkpointer.read_meta(step)
    if meta is not None:
      resume_step = step
      if step > train.num_steps:
        return _Start(resume_step=step, changes={}, data_iter=None, record=record, finished=True)
      changes = check_resumable(meta["config"], config)
      break
  data_iter = data_lib.create_iterator(
      config.data, split="train", batch_size=train.batch_size // jax.process_count(),
      seq_len=train.seq_len, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), repeat=True,
  )
  state = data_iter.get_state()
  _check_has_tokens(data_iter, "train", 1, tokenizer.eos_id)
  data_iter.set_state(state)
  _check_has_tokens(evaluation_iterator(config), "validation", train.eval_batches, tokenizer.eos_id)
  return _Start(resume_step=resume_step, changes=changes, data_iter=data_iter, record=record)


# ----------------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> TrainResult:
  """Train `config` in `workdir`, resuming from its latest checkpoint if there is one.

  `stop_at_step` ends this invocation early at that step with a checkpoint (status 'stopped'), e.g. to fit
  a scheduler's time slot; the learning-rate schedule still follows train.num_steps, and a later call
  continues exactly where this one stopped.
  """
  wall_start = time.perf_counter()
  with _StopSignals() as signals:
    is_lead = jax.process_index() == 0
    run = resolve_lib.resolve(config, jax.device_count(), log=is_lead)  # refuses bad fields before anything
    config = run.config
    workdir = os.path.abspath(workdir)
    with contextlib.ExitStack() as stack:
      error = None
      try:
        _check_workdir(workdir)
        if is_lead:
          stack.enter_context(_WorkdirLock(workdir))
      except ValueError as e:
        error = e
      _agree(error)
      checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
      stack.callback(checkpointer.close)
      tokenizer = data_lib.get_tokenizer(config.data)
      model_cfg = config_lib.model_config(run.typed, vocab_size=config.model.vocab_size)
      start = None
      try:
        _check_memory(config, model_cfg, checkpointer.directory)
        start = _prepare(config, workdir, checkpointer, tokenizer, run.record())
      except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: a TFDS dataset that is not prepared
        error = e
      _agree(error)
      if start.finished:
        print(f"already finished: the checkpoint in {checkpointer.directory} is at step {start.resume_step}, past "
              f"train.num_steps={config.train.num_steps}; nothing to do", flush=True)
        return TrainResult(status="already_finished", step=start.resume_step, eval_loss=None,
                           wall_time_s=time.perf_counter() - wall_start, workdir=workdir)
      stack.callback(start.data_iter.close)
      return _train(config, workdir, stop_at_step, signals, checkpointer, model_cfg, start, stack, wall_start)


def _record_start(workdir: str, checkpointer: Checkpointer, start: _Start) -> None:
  """Process 0 writes config.json (requested and resolved config, `resolve.Resolved.record`), the resume log and
  warnings, once every check has passed."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(start.record, f, indent=2)
  newer = [s for s in checkpointer.all_steps() if start.resume_step is not None and s > start.resume_step]
  if start.resume_step is None:
    return
  if start.changes or newer:
    with open(os.path.join(workdir, "resume_log.jsonl"), "a") as f:
      f.write(json.dumps({"time": time.time(), "resume_step": start.resume_step, "superseded_steps": newer,
                          "changes": {p: list(v) for p, v in start.changes.items()}}) + "\n")
  for path, (old, new) in start.changes.items():
    print(f"resume: {path} changed from {old!r} to {new!r} (recorded in resume_log.jsonl)", flush=True)
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    print(f"WARNING: {workdir}/metrics.jsonl is missing although the workdir holds checkpoints up to step "
          f"{start.resume_step}: the metrics of earlier steps are lost; new ones go to a fresh file", flush=True)


def _train(config, workdir, stop_at_step, signals, checkpointer, model_cfg, start: _Start, stack,
           wall_start) -> TrainResult:
  train = config.train
  is_lead = jax.process_index() == 0
  if is_lead:
    _record_start(workdir, checkpointer, start)
  if start.resume_step is not None:
    for newer in (s for s in checkpointer.all_steps() if s > start.resume_step):
      print(f"train.resume_step={start.resume_step}: checkpoint {newer} moved to "
            f"{checkpointer.set_aside(newer, SUPERSEDED_DIR)}", flush=True)
  writer = MetricWriter(workdir, enabled=is_lead)
  stack.callback(writer.close)
  mesh = parallel.create_mesh_for(config.mesh)
  batch_sharding = NamedSharding(mesh, BATCH_SPEC)
  data_iter = start.data_iter
  skip_limit = train.skip_nonfinite_batches

  # Measured outside the mesh context: the matmul runs on one device, which a multi-device mesh would refuse.
  peak = train.peak_tflops * 1e12 if train.peak_tflops else measure_peak_flops()
  with parallel.mesh_context(mesh):
    # Initialised under jit: eager initialisers would run replicated on every device (17.6 GB peak for
    # 128 experts on 8 devices vs 0.4 GB jitted); jit creates each parameter directly in its sharding.
    model = nnx.jit(lambda: models.build(model_cfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1)))()
    optimizer = nnx.Optimizer(model, make_optimizer(train), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state_sharding = stable_shardings(state, mesh)
    model, optimizer = nnx.merge(graphdef, jax.device_put(state, state_sharding))

    step = 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _checkpoint_tree(model, optimizer)
    )
    restored = checkpointer.restore_latest(abstract, check_meta=lambda meta: check_resumable(meta["config"], config),
                                           max_step=start.resume_step)
    data_state = data_iter.get_state()
    if restored is not None:
      step, tree, meta = restored
      nnx.update(model, tree["params"])
      nnx.update(optimizer, tree["optimizer"])
      data_states = meta["data_state"]  # one JSON state per process
      if len(data_states) != jax.process_count():
        raise ValueError(f"the checkpoint at step {step} was written by {len(data_states)} processes; resume it "
                         f"with that many (this run has {jax.process_count()})")
      data_state = json.loads(data_states[jax.process_index()])
      data_iter.set_state(data_state)
      print(f"resumed from checkpoint at step {step} in {checkpointer.directory}", flush=True)
    graphdef, state = nnx.split((model, optimizer))
    del model, optimizer  # their buffers are donated to the first step: only `state` is current from here on

    train_step = make_train_step(graphdef, train, config.seed, skip_nonfinite=skip_limit > 0,
                                 state_sharding=state_sharding)
    tokens_per_step = train.batch_size * train.seq_len
    train_flops_per_token = resolve_lib.train_flops_per_token(config, model_cfg)
    progress = Progress(train.num_steps, step)
    eval_loss = None
    status = "completed"
    saved_steps = set(checkpointer.all_steps())
    pending: list[dict] = []  # metrics of the steps since the last flush, still on device
    skipped: list[int] = []
    interval_start = time.perf_counter()

    def flush() -> None:
      """Fetch the pending metrics, stop at the first non-finite loss, write one record per step."""
      nonlocal pending, interval_start
      if not pending:
        return
      records = jax.device_get(pending)
      first = step - len(records) + 1
      pending = []
      now = time.perf_counter()
      tokens_per_s = tokens_per_step * len(records) / max(now - interval_start, 1e-9)
      interval_start = now
      mfu = train_flops_per_token * tokens_per_s / (peak * jax.device_count())
      for offset, metrics in enumerate(records):
        at = first + offset
        blocks = metrics.pop("moe")
        metrics.update(tokens_per_s=tokens_per_s, mfu=mfu)
        if metrics.pop("skipped", False):
          skipped.append(at)
          metrics["skipped"] = True
        elif not math.isfinite(float(metrics["loss"])):
          writer.write(at, "train", metrics, moe=blocks)
          _stop_on_nonfinite(float(metrics["loss"]), at, checkpointer)
        writer.write(at, "train", metrics, moe=blocks)
        if len(skipped) > skip_limit > 0:
          raise NonFiniteLossError(
              f"{len(skipped)} batches gave non-finite losses (steps {skipped[:10]}), more than "
              f"train.skip_nonfinite_batches={skip_limit}: the run diverges rather than meeting a bad batch. "
              f"Lower train.learning_rate and resume an earlier checkpoint with train.resume_step and "
              f"train.allow_changes=True; checkpoints kept: {checkpointer.all_steps()} in {checkpointer.directory}")
      last = records[-1]
      shown = {"loss": float(last["loss"]), "ce": float(last["cross_entropy"]), "tokens/s": tokens_per_s, "mfu": mfu}
      if skipped:
        shown["skipped"] = len(skipped)
      print(progress.line(step, shown), flush=True)
      checkpointer.check()  # an asynchronous save that failed since: stop now, not at the next save

    def save(at_step: int) -> None:
      nonlocal interval_start
      flush()  # a checkpoint is written only after every loss leading to it was seen to be finite
      if at_step not in saved_steps:
        meta = {"data_state": parallel.gather_strings(json.dumps(data_state)), "step": at_step,
                "config": json.loads(config.to_json())}
        checkpointer.save(at_step, _checkpoint_tree(*nnx.merge(graphdef, state)), meta)
        saved_steps.add(at_step)
      interval_start = time.perf_counter()  # saving time is not training time

    prefetcher = _BatchPrefetcher(data_iter, batch_sharding)
    stack.callback(prefetcher.close)
    signals.training()
    while step < train.num_steps:
      # Multi-process: agreeing on a stop is a collective, so it happens where the host syncs anyway.
      if jax.process_count() == 1 or step % train.log_every == 0 or step == stop_at_step:
        preempted = parallel.any_process(signals.received is not None)
        if preempted or step == stop_at_step:
          save(step)
          checkpointer.wait()
          status = "preempted" if preempted else "stopped"
          cause = signal.Signals(signals.received).name if signals.received else "signal on another process"
          print(f"{cause if preempted else 'stop_at_step'}: checkpoint at step {step} saved; exiting", flush=True)
          break
      batch, next_data_state = prefetcher.next()
      state, metrics = train_step(state, batch, np.int32(step))
      data_state = next_data_state
      step += 1
      pending.append(metrics)
      evaluate_now = (train.eval_every and step % train.eval_every == 0) or step == train.num_steps
      save_now = (train.checkpoint_every and step % train.checkpoint_every == 0) or step == train.num_steps
      if step % train.log_every == 0 or evaluate_now or save_now:
        flush()
      if evaluate_now:
        eval_loss = evaluate(nnx.merge(graphdef, state)[0], config, batch_sharding)
        writer.write(step, "eval", {"cross_entropy": eval_loss})
        print(f"step {step:>6}  eval cross-entropy {eval_loss:.4f}", flush=True)
        interval_start = time.perf_counter()  # evaluation time is not training time
      if save_now:
        save(step)
    if eval_loss is None and status == "completed":  # resumed a finished run
      eval_loss = evaluate(nnx.merge(graphdef, state)[0], config, batch_sharding)
    checkpointer.wait()
  return TrainResult(status=status, step=step, eval_loss=eval_loss,
                     wall_time_s=time.perf_counter() - wall_start, workdir=workdir)


def _stop_on_nonfinite(loss: float, step: int, checkpointer: Checkpointer) -> None:
  """Raise NonFiniteLossError for a loss at `step`, saying how to go on."""
  checkpointer.wait()
  kept = checkpointer.all_steps()
  last = f"step {kept[-1]}" if kept else "none"
  raise NonFiniteLossError(
      f"non-finite loss ({loss}) at step {step}; stopped without saving. Last good checkpoint: {last} in "
      f"{checkpointer.directory}. To go on: rerun with --config.train.skip_nonfinite_batches=N to discard the "
      f"update of up to N batches with a non-finite loss (step {step} included), or restart from an earlier "
      f"checkpoint (kept: {kept}) with --config.train.resume_step=STEP, with --config.train.allow_changes=True "
      "if you also lower train.learning_rate")
