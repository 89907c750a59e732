"""Train and evaluate a model (dense or MoE, decoder LM or encoder-decoder) from one config: the main loop of moe_jax.

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

Evaluation: `train.eval_batches` of the packed validation stream, or, with `train.eval_set_min_tokens`, the fixed
evaluation set of moe_jax.evalset (its subset at every evaluation, the whole set at the last step, intervals over
documents; docs/evaluation.md), whose fingerprint every checkpoint records.

`train.init_from` starts a fresh run's parameters from the newest checkpoint of another moe_jax workdir (a run to
fine-tune, or the workdir a checkpoint importer wrote), read only through `runstate.load`; the optimizer state is
fresh and the step is 0. The model is the one this run's config describes: the config is not taken from the source
(a run's config.json must say what it trained), so a model/moe field that changes a parameter's shape is refused
naming it, and one that does not (say moe.capacity_factor or dropout) is allowed and printed. Once the run has
checkpoints of its own, a resume restores those and ignores the source; changing `train.init_from` is refused like
any other change of the run's identity.

The model, optimizer, checkpoint tree and batches are made by moe_jax.runstate, as every other tool makes them.
`train_and_evaluate` resolves the config once; from there on everything reads it typed (ExperimentConfig). The
loop is `_start_loop` (build or restore), then `_run`, whose steps `_flush` metrics, `_evaluate` and `_save`
over a `_Loop` state, reading the fixed `_Context`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import config_lib, data as data_lib, evalset, fileio, flops, models, optim, parallel, runstate
from moe_jax import workdir as workdir_lib
from moe_jax import resolve as resolve_lib
from moe_jax.checkpoint import SUPERSEDED_DIR, Checkpointer
from moe_jax.metrics import MetricWriter, Progress, eval_set_stats
# moe_jax.registry looks the names of train.optimizer and train.schedule up in this module; they are moe_jax.optim's.


# RNG streams reseeded from (seed, step) before every step ('params' is only used at initialisation): dropout,
# router jitter and expert dropout all draw from forks of the 'dropout' stream.
RUNTIME_STREAMS = ("dropout",)

EVAL_SEED = 0  # the validation order: fixed, so every run and seed is scored on the same documents
EVAL_SET_FILE = "eval_set.json"  # the final score on the fixed evaluation set, per document, and the set's manifest


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
# Steps.


def summed_cross_entropy(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token cross-entropies, sum of weights); padding has weight 0."""
  token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, L]
  return jnp.sum(token_ce * batch["weights"]), jnp.sum(batch["weights"])


def lm_loss(model: nnx.Module, batch: dict, *, deterministic: bool, aux_loss_weight: float,
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


def make_train_step(graphdef: nnx.GraphDef, train: config_lib.TrainConfig, seed: int, *,
                    skip_nonfinite: bool, state_sharding: nnx.State | None = None):
  """`step(state, batch, step) -> (state, metrics)` over the split (model, optimizer) state, jitted with the
  state donated: the update happens in place, and nothing returns to the host. `state_sharding`
  (`runstate.stable_shardings`) pins the state's output shardings, so that every step runs one compiled program.

  With `skip_nonfinite`, a step whose loss or gradient norm is non-finite returns the state it was given
  (metrics['skipped'] = True), so a bad batch never poisons the parameters.
  """
  base_key = jax.random.key(seed)
  schedule = optim.make_schedule(train)
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
def eval_step(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
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


# ----------------------------------------------------------------------------------------------------------
# Checks before anything is built: each raises ValueError naming the field or path.


# Fields a checkpoint's run must share with the config that resumes it: they shape the state or the data.
RESUME_INVARIANT_FIELDS = ("seed", "model", "moe", "data.dataset", "data.tokenizer", "data.objective",
                           "data.num_sentinels", "train.batch_size", "train.seq_len", "train.optimizer",
                           "train.init_from")
# Fields that change the optimisation trajectory or the documents read: refused unless train.allow_changes.
SCHEDULE_FIELDS = ("train.learning_rate", "train.warmup_steps", "train.schedule", "train.min_lr_ratio",
                   "train.weight_decay", "train.b1", "train.b2", "train.adafactor_decay_rate",
                   "train.grad_clip_norm", "train.aux_loss_weight", "train.z_loss_weight")
DATA_FIELDS = ("data.text_dir", "data.text_glob", "data.validation_fraction", "data.noise_density",
               "data.mean_noise_span_length")
# Schedules whose shape depends on train.num_steps (rsqrt and constant do not).
SCHEDULES_OVER_NUM_STEPS = ("cosine", "linear")


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
  return any(path == p or path.startswith(p + ".") for p in prefixes)


def check_resumable(saved: dict, current: dict, train: config_lib.TrainConfig) -> dict[str, tuple[Any, Any]]:
  """The changes between a checkpoint's config and `current` (the resolved config resuming it, as JSON; `train`
  its typed train section) that resuming accepts; ValueError for the others.

  Architecture, tokenizer, batch shape, optimizer and seed never change within a run. Schedule/optimizer
  hyper-parameters and the documents read (and num_steps under a schedule that depends on it) may change only
  with train.allow_changes=True. Everything else (logging, evaluation, checkpoint cadence, mesh) may change.
  """
  changes = config_lib.config_changes(saved, current)
  fixed = [p for p in changes if _under(p, RESUME_INVARIANT_FIELDS)]
  if fixed:
    raise ValueError("the workdir holds a checkpoint of a different run (use a new --workdir or the same config): "
                     + "; ".join(f"{p}: checkpoint {changes[p][0]!r}, config {changes[p][1]!r}" for p in fixed))
  guarded = SCHEDULE_FIELDS + DATA_FIELDS
  if train.schedule in SCHEDULES_OVER_NUM_STEPS:
    guarded += ("train.num_steps",)
  refused = [p for p in changes if _under(p, guarded)]
  if refused and not train.allow_changes:
    raise ValueError("resuming with a changed schedule or data is refused: "
                     + "; ".join(f"{p}: checkpoint {changes[p][0]!r}, config {changes[p][1]!r}" for p in refused)
                     + ". Pass --config.train.allow_changes=True to resume anyway (recorded in resume_log.jsonl), "
                     "or use a new --workdir")
  return changes


def check_checkpoint(meta: dict, current: dict, train: config_lib.TrainConfig,
                     eval_fingerprints: dict | None = None) -> dict[str, tuple[Any, Any]]:
  """A checkpoint's metadata against the run resuming it: `check_resumable`; the number of processes that wrote
  it (one data-iterator state each) equal to this run's; and, when both score on a fixed evaluation set, the same
  set (`EvalSets.fingerprints`: the same text, or the run's evaluations would not compare). The changes resuming
  accepts."""
  data_states = meta["data_state"]
  if len(data_states) != jax.process_count():
    raise ValueError(f"the checkpoint at step {meta['step']} was written by {len(data_states)} processes; resume it "
                     f"with that many (this run has {jax.process_count()})")
  changes = check_resumable(meta["config"], current, train)
  saved = meta.get("eval_set")
  if saved and eval_fingerprints and saved != eval_fingerprints:
    differing = "; ".join(f"{name}: checkpoint {str(saved.get(name))[:16]}, now {str(eval_fingerprints.get(name))[:16]}"
                          for name in sorted(set(saved) | set(eval_fingerprints))
                          if saved.get(name) != eval_fingerprints.get(name))
    raise ValueError(f"the fixed evaluation set differs from the one the checkpoint at step {meta['step']} was scored "
                     f"on ({differing}): its validation files, tokenizer, train.seq_len or train.eval_set_min_tokens, "
                     "eval_file_cap_tokens, eval_subset_cap_tokens differ, or this machine's corpus does; resume with "
                     "the same set, or use a new --workdir")
  return changes


def _check_writable(workdir: str) -> None:
  """The (existing) workdir can be written from this process: a file is created and removed, so a file system
  that refuses writes despite its permissions (read-only mount, quota) is named before anything else."""
  try:
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


def _check_memory(exp: config_lib.ExperimentConfig, model_cfg: config_lib.ModelConfig, checkpoint_dir: str) -> None:
  """Refuse, with the numbers, a model that cannot fit the devices or whose checkpoint cannot fit the disk."""
  gib = 2.0**30
  estimate = flops.memory_estimate(model_cfg, batch_size=exp.train.batch_size, seq_len=exp.train.seq_len,
                                   optimizer=exp.train.optimizer, data_devices=exp.mesh.data,
                                   expert_devices=exp.mesh.expert, fsdp_devices=exp.mesh.fsdp,
                                   tensor_devices=exp.mesh.tensor)
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


def evaluation_iterator(exp: config_lib.ExperimentConfig, num_batches: int | None = None):
  """The validation batches of this process: the first `num_batches` (default train.eval_batches) in the order of
  EVAL_SEED, the same at every evaluation."""
  return data_lib.create_iterator(
      exp.data, split="validation", batch_size=exp.train.batch_size // jax.process_count(),
      seq_len=exp.train.seq_len, seed=EVAL_SEED, shard_index=jax.process_index(),
      shard_count=jax.process_count(), repeat=False, num_batches=num_batches or exp.train.eval_batches,
  )


def evaluate(model: nnx.Module, exp: config_lib.ExperimentConfig, sharding: NamedSharding) -> float:
  """Mean token cross-entropy (nats) over the first `train.eval_batches` validation batches.

  The same batches every time, whatever the seed (EVAL_SEED), so evaluations are comparable across steps, runs
  and seeds.
  """
  total = count = 0.0
  for batch in evaluation_iterator(exp):
    ce_sum, weight_sum = eval_step(model, runstate.global_batch(batch, sharding))
    total += float(ce_sum)
    count += float(weight_sum)
  return total / max(count, 1.0)


@dataclasses.dataclass(frozen=True)
class EvalSets:
  """A run's fixed evaluation set (moe_jax.evalset, results/SCALING.md) and the subset scored at every evaluation
  (None: the whole set every time)."""

  full: evalset.EvalSet
  subset: evalset.EvalSet | None

  def fingerprints(self) -> dict[str, str | None]:
    """What every checkpoint records and a resume must match."""
    return {"full": self.full.fingerprint, "subset": self.subset.fingerprint if self.subset else None}

  def record(self) -> dict[str, Any]:
    """For config.json: each set's parameters and summary (documents, targets, bytes, fingerprint)."""
    return {name: {**s.parameters, **s.summary()} for name, s in (("full", self.full), ("subset", self.subset)) if s}


def eval_sets(exp: config_lib.ExperimentConfig) -> EvalSets | None:
  """The fixed evaluation set of the run's validation split and its subset, by train.eval_set_min_tokens,
  eval_file_cap_tokens and eval_subset_cap_tokens (None when train.eval_set_min_tokens is 0). ValueError naming
  the field when the split holds too little text or the corpus has no files."""
  train = exp.train
  if not train.eval_set_min_tokens:
    return None
  try:
    full = evalset.validation_eval_set(exp.data, seq_len=train.seq_len, cap_tokens=train.eval_file_cap_tokens,
                                       min_tokens=train.eval_set_min_tokens)
  except ValueError as error:
    raise ValueError(f"train.eval_set_min_tokens={train.eval_set_min_tokens}: {error}") from None
  subset = None
  if train.eval_subset_cap_tokens:
    subset = evalset.eval_subset(full, tokenizer=data_lib.get_tokenizer(exp.data),
                                 cap_tokens=train.eval_subset_cap_tokens)
  return EvalSets(full=full, subset=subset)


def evaluate_set(model: nnx.Module, eval_set: evalset.EvalSet, exp: config_lib.ExperimentConfig,
                 sharding: NamedSharding) -> evalset.EvalResult:
  """Every row of `eval_set`, train.batch_size rows at a time (the training batch shape, so a capacity-limited MoE
  routes groups of the size it trained with), each process feeding its share of every batch: per-document sums
  and the bootstrap interval over documents (train.eval_bootstrap_resamples)."""
  share = exp.train.batch_size // jax.process_count()
  first = jax.process_index() * share  # this process's rows of a global batch: the order global_batch lays out

  def place(batch: dict) -> dict:
    return runstate.global_batch({key: value[first:first + share] for key, value in batch.items()}, sharding)

  return evalset.evaluate_documents(evalset.token_cross_entropy_fn(model, place), eval_set,
                                    batch_size=exp.train.batch_size, resamples=exp.train.eval_bootstrap_resamples)


def _param_shapes(model_cfg: config_lib.ModelConfig) -> dict[str, tuple]:
  """Parameter path -> (shape, dtype) of the model `model_cfg` builds, traced abstractly (nothing allocated or
  compiled)."""
  with runstate.placed_on(None):
    model = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))
  return {jax.tree_util.keystr(path): (leaf.shape, str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def check_init_from(source: str, run: resolve_lib.Resolved,
                    model_cfg: config_lib.ModelConfig) -> dict[str, tuple[Any, Any]]:
  """The run in `source` (train.init_from) can start this one: a moe_jax workdir with a checkpoint whose model has
  this model's parameters (every path, shape and dtype); ValueError naming the model/moe fields that differ
  otherwise. Returns the model/moe fields that differ without changing a parameter (e.g. moe.capacity_factor,
  dropout), which fine-tuning may change: path -> (source, this run)."""
  source = os.path.abspath(os.path.expanduser(source))
  try:
    source_config = runstate.run_config(source)
  except ValueError as error:
    raise ValueError(f"train.init_from={source!r}: {error}") from None
  if not os.path.isdir(os.path.join(source, "checkpoints")):
    raise ValueError(f"train.init_from={source!r}: the run there has saved no checkpoint")
  source_run = runstate.resolve_for_mesh(source_config, None)
  changes = config_lib.config_changes(config_lib.to_dict(source_run.config), run.record()["resolved"])
  differing = {path: change for path, change in changes.items() if _under(path, ("model", "moe"))}
  if differing and _param_shapes(runstate.model_config(source_run)) != _param_shapes(model_cfg):
    raise ValueError(f"train.init_from={source!r}: its model has other parameters than this run's; "
                     + "; ".join(f"{p}: source {old!r}, config {new!r}" for p, (old, new) in differing.items())
                     + ". Set those fields as the source's config.json has them")
  return differing


@dataclasses.dataclass
class _Start:
  """What the checks before compilation found."""

  resume_step: int | None  # the checkpoint to resume from; None: a fresh run
  changes: dict[str, tuple[Any, Any]]
  data_iter: Any
  record: dict  # config.json: the requested and resolved config and the decisions (resolve.Resolved.record)
  finished: bool = False  # the newest checkpoint is past train.num_steps
  eval_sets: EvalSets | None = None  # the fixed evaluation set, when train.eval_set_min_tokens is set
  init_from: str = ""  # a fresh run starts from this workdir's newest checkpoint (train.init_from)


def _prepare(exp: config_lib.ExperimentConfig, checkpointer: Checkpointer | None, checkpoint_dir: str, tokenizer,
             record: dict, init_from: Callable[[], dict] | None = None) -> _Start:
  """Resume checks and data checks: everything that can refuse the run, before anything is written or built.
  `checkpointer` is None when the workdir holds no checkpoint directory; `init_from` (`check_init_from` of the run)
  is called for a run that starts fresh, and returns the model/moe fields it may change."""
  train = exp.train
  steps = checkpointer.all_steps() if checkpointer else []
  wanted = train.resume_step
  if wanted and wanted not in steps:
    raise ValueError(f"train.resume_step={wanted} is not a checkpoint in {checkpoint_dir} "
                     f"(it holds steps {steps or 'none'})")
  candidates = [s for s in steps if not wanted or s <= wanted]
  sets = eval_sets(exp)
  fingerprints = sets.fingerprints() if sets else None
  if sets:
    record = {**record, "eval_set": sets.record()}
  resume_step, changes = None, {}
  for step in reversed(candidates):  # the newest whose metadata reads; a corrupt one is dealt with at restore
    meta = checkpointer.read_meta(step)
    if meta is not None:
      resume_step = step
      if step > train.num_steps:
        return _Start(resume_step=step, changes={}, data_iter=None, record=record, finished=True)
      changes = check_checkpoint(meta, record["resolved"], train, fingerprints)
      break
  if resume_step is None and init_from is not None:
    for path, (old, new) in init_from().items():
      print(f"init_from: {path} is {new!r} here, {old!r} in the source (the parameters are the same)", flush=True)
  data_iter = runstate.train_batches(exp)
  state = data_iter.get_state()
  _check_has_tokens(data_iter, "train", 1, tokenizer.eos_id)
  data_iter.set_state(state)
  _check_has_tokens(evaluation_iterator(exp), "validation", train.eval_batches, tokenizer.eos_id)
  return _Start(resume_step=resume_step, changes=changes, data_iter=data_iter, record=record, eval_sets=sets,
                init_from=exp.train.init_from if resume_step is None else "")


# ----------------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> TrainResult:
  """Train `config` in `workdir`, resuming from its latest checkpoint if there is one.

  `stop_at_step` ends this invocation early at that step with a checkpoint (status 'stopped'), e.g. to fit
  a scheduler's time slot; the learning-rate schedule still follows train.num_steps, and a later call
  continues exactly where this one stopped. From here on the run reads its config typed (`resolve.Resolved.typed`).
  """
  wall_start = time.perf_counter()
  with _StopSignals() as signals:
    is_lead = jax.process_index() == 0
    run = resolve_lib.resolve(config, jax.device_count(), log=is_lead)  # refuses bad fields before anything
    exp = run.typed
    workdir = workdir_lib.check_path_given(workdir)  # '' would mean the current directory
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    with contextlib.ExitStack() as stack:
      # Until lock.commit() nothing is written: a refusal leaves the workdir as it was (the lock undoes itself).
      error, lock = None, None
      try:
        workdir_lib.check_workdir(workdir)
        if is_lead:
          lock = stack.enter_context(workdir_lib.WorkdirLock(workdir))
      except (ValueError, OSError) as e:
        error = e if isinstance(e, ValueError) else ValueError(f"workdir: {workdir}: {fileio.describe(e)}")
      _agree(error)
      # An existing checkpoint directory is read as it is (orbax creates nothing there); a new one is made only
      # once every check passed.
      checkpointer = (Checkpointer(checkpoint_dir, keep=exp.train.keep_checkpoints)
                      if os.path.isdir(checkpoint_dir) else None)
      if checkpointer is not None:
        stack.callback(checkpointer.close)
      tokenizer = data_lib.get_tokenizer(exp.data)
      model_cfg = runstate.model_config(run)
      start = None
      try:
        _check_writable(workdir)
        _check_memory(exp, model_cfg, checkpoint_dir)
        init_from = None
        if exp.train.init_from:
          init_from = lambda: check_init_from(exp.train.init_from, run, model_cfg)  # noqa: E731
        start = _prepare(exp, checkpointer, checkpoint_dir, tokenizer, run.record(), init_from)
      # FileNotFoundError: a TFDS dataset that is not prepared; EnvironmentFailure: a full or failing data_dir.
      except (ValueError, FileNotFoundError, fileio.EnvironmentFailure) as e:
        error = e
      _agree(error)
      if start.finished:
        print(f"already finished: the checkpoint in {checkpoint_dir} is at step {start.resume_step}, past "
              f"train.num_steps={exp.train.num_steps}; nothing to do", flush=True)
        return TrainResult(status="already_finished", step=start.resume_step, eval_loss=None,
                           wall_time_s=time.perf_counter() - wall_start, workdir=workdir)
      if lock is not None:
        lock.commit()
      if checkpointer is None:
        checkpointer = Checkpointer(checkpoint_dir, keep=exp.train.keep_checkpoints)
        stack.callback(checkpointer.close)
      stack.callback(start.data_iter.close)
      status, loop = _train(exp, model_cfg, workdir, start, checkpointer, signals, stack, stop_at_step, lock)
  return TrainResult(status=status, step=loop.step, eval_loss=loop.eval_loss,
                     wall_time_s=time.perf_counter() - wall_start, workdir=workdir)


def _record_start(workdir: str, checkpointer: Checkpointer, start: _Start) -> workdir_lib.KeptFile:
  """Process 0 writes config.json (requested and resolved config, `resolve.Resolved.record`; kept as written until
  the run ends), the resume log and warnings, once every check has passed."""
  config_file = workdir_lib.KeptFile(os.path.join(workdir, "config.json"), json.dumps(start.record, indent=2))
  newer = [s for s in checkpointer.all_steps() if start.resume_step is not None and s > start.resume_step]
  if start.resume_step is None:
    return config_file
  if start.changes or newer:
    with open(os.path.join(workdir, "resume_log.jsonl"), "a") as f:
      f.write(json.dumps({"time": time.time(), "resume_step": start.resume_step, "superseded_steps": newer,
                          "changes": {p: list(v) for p, v in start.changes.items()}}) + "\n")
  for path, (old, new) in start.changes.items():
    print(f"resume: {path} changed from {old!r} to {new!r} (recorded in resume_log.jsonl)", flush=True)
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    print(f"WARNING: {workdir}/metrics.jsonl is missing although the workdir holds checkpoints up to step "
          f"{start.resume_step}: the metrics of earlier steps are lost; new ones go to a fresh file", flush=True)
  return config_file


@dataclasses.dataclass(frozen=True)
class _Context:
  """What the loop reads and never replaces."""

  exp: config_lib.ExperimentConfig
  resolved: dict  # the resolved config as JSON: what every checkpoint records
  checkpointer: Checkpointer
  writer: MetricWriter
  progress: Progress
  graphdef: nnx.GraphDef
  train_step: Callable  # make_train_step's jitted step
  batch_sharding: NamedSharding
  tokens_per_step: int
  flops_per_token: float  # training FLOPs per token (resolve.train_flops_per_token)
  peak_flops: float  # FLOP/s of all devices together: the denominator of MFU
  # The workdir's files the run relies on (process 0: the lock, config.json), checked at every metrics fetch:
  # deleted or replaced mid-run they are restored with a warning, or the run stops in one line.
  kept_files: tuple = ()
  workdir: str = ""
  eval_sets: EvalSets | None = None


@dataclasses.dataclass
class _Loop:
  """The loop's state between steps."""

  step: int
  state: nnx.State  # the split (model, optimizer) state: donated to each step, so the only current copy
  data_state: dict  # the data-iterator position after the batches consumed up to `step`
  saved_steps: set[int]
  interval_start: float  # when the interval of the throughput figures began (evaluation and saving excluded)
  pending: list[dict] = dataclasses.field(default_factory=list)  # metrics since the last flush, still on device
  skipped: list[int] = dataclasses.field(default_factory=list)  # steps whose update was discarded (non-finite)
  eval_loss: float | None = None


def _train(exp, model_cfg, workdir: str, start: _Start, checkpointer: Checkpointer, signals: _StopSignals,
           stack: contextlib.ExitStack, stop_at_step: int | None,
           lock: workdir_lib.WorkdirLock | None) -> tuple[str, _Loop]:
  """Once every check passed: record the start, build or restore the state, train to train.num_steps (or
  `stop_at_step`, or a stop signal), evaluate. (status, final loop state)."""
  is_lead = jax.process_index() == 0
  kept_files = (lock, _record_start(workdir, checkpointer, start)) if is_lead else ()
  if start.resume_step is not None:
    for newer in (s for s in checkpointer.all_steps() if s > start.resume_step):
      print(f"train.resume_step={start.resume_step}: checkpoint {newer} moved to "
            f"{checkpointer.set_aside(newer, SUPERSEDED_DIR)}", flush=True)
  writer = MetricWriter(workdir, enabled=is_lead)
  stack.callback(writer.close)
  mesh = parallel.create_mesh_for(exp.mesh)
  # Measured outside the mesh context: the matmul runs on one device, which a multi-device mesh would refuse.
  peak = exp.train.peak_tflops * 1e12 if exp.train.peak_tflops else measure_peak_flops()
  with parallel.mesh_context(mesh):
    ctx, loop = _start_loop(exp, model_cfg, mesh, start, checkpointer, writer, peak * jax.device_count(),
                            kept_files, workdir)
    prefetcher = runstate.BatchPrefetcher(start.data_iter, ctx.batch_sharding)
    stack.callback(prefetcher.close)
    signals.training()
    status = _run(ctx, loop, prefetcher, signals, stop_at_step)
    if loop.eval_loss is None and status == "completed":  # resumed a finished run: score it, write nothing
      loop.eval_loss = _score(ctx, loop)[0]
    checkpointer.wait()
  return status, loop


def _start_loop(exp, model_cfg, mesh, start: _Start, checkpointer: Checkpointer, writer: MetricWriter,
                peak_flops: float, kept_files: tuple, workdir: str) -> tuple[_Context, _Loop]:
  """The state at step 0, or restored from the checkpoint the run resumes (model, optimizer, data position), and
  the step compiled for it."""
  model, optimizer = runstate.create(exp, model_cfg, mesh)
  step, data_state = 0, start.data_iter.get_state()
  restored = runstate.restore(
      checkpointer, model, optimizer, max_step=start.resume_step,
      # _prepare checked the newest checkpoint; this checks an older one that restore falls back to.
      check_meta=lambda meta: check_checkpoint(meta, start.record["resolved"], exp.train,
                                               start.eval_sets.fingerprints() if start.eval_sets else None))
  if restored is not None:
    step, meta = restored
    data_state = json.loads(meta["data_state"][jax.process_index()])  # one JSON state per process
    start.data_iter.set_state(data_state)
    print(f"resumed from checkpoint at step {step} in {checkpointer.directory}", flush=True)
  elif start.init_from:
    # Read only (runstate.load never moves the source's files); the optimizer state stays fresh.
    source = runstate.load(os.path.abspath(os.path.expanduser(start.init_from)), mesh=mesh)
    nnx.update(model, runstate.checkpoint_tree(source.model, source.optimizer)["params"])
    print(f"init_from: parameters of {start.init_from} at step {source.step}; fresh optimizer state, step 0",
          flush=True)
    del source
  # From here on only `state` is current: the model's and optimizer's buffers are donated to the first step.
  graphdef, state = nnx.split((model, optimizer))
  train_step = make_train_step(graphdef, exp.train, exp.seed, skip_nonfinite=exp.train.skip_nonfinite_batches > 0,
                               state_sharding=runstate.stable_shardings(state, mesh))
  ctx = _Context(exp=exp, resolved=start.record["resolved"], checkpointer=checkpointer, writer=writer,
                 progress=Progress(exp.train.num_steps, step), graphdef=graphdef, train_step=train_step,
                 batch_sharding=runstate.batch_sharding(mesh), tokens_per_step=exp.train.batch_size * exp.train.seq_len,
                 flops_per_token=resolve_lib.train_flops_per_token(exp, model_cfg), peak_flops=peak_flops,
                 kept_files=kept_files, workdir=workdir, eval_sets=start.eval_sets)
  loop = _Loop(step=step, state=state, data_state=data_state, saved_steps=set(checkpointer.all_steps()),
               interval_start=time.perf_counter())
  return ctx, loop


def _model(ctx: _Context, loop: _Loop) -> nnx.Module:
  return nnx.merge(ctx.graphdef, loop.state)[0]


def _run(ctx: _Context, loop: _Loop, prefetcher: runstate.BatchPrefetcher, signals: _StopSignals,
         stop_at_step: int | None) -> str:
  """Step until train.num_steps ('completed'), `stop_at_step` ('stopped') or a stop signal ('preempted'), logging,
  evaluating and saving on the way."""
  train = ctx.exp.train
  while loop.step < train.num_steps:
    stopped = _stop_requested(ctx, loop, signals, stop_at_step)
    if stopped:
      return stopped
    batch, next_data_state = prefetcher.next()
    loop.state, metrics = ctx.train_step(loop.state, batch, np.int32(loop.step))
    loop.data_state = next_data_state
    loop.step += 1
    loop.pending.append(metrics)
    evaluate_now = (train.eval_every and loop.step % train.eval_every == 0) or loop.step == train.num_steps
    save_now = (train.checkpoint_every and loop.step % train.checkpoint_every == 0) or loop.step == train.num_steps
    if loop.step % train.log_every == 0 or evaluate_now or save_now:
      _flush(ctx, loop)
    if evaluate_now:
      _evaluate(ctx, loop)
    if save_now:
      _save(ctx, loop)
  return "completed"


def _stop_requested(ctx: _Context, loop: _Loop, signals: _StopSignals, stop_at_step: int | None) -> str | None:
  """After saving a checkpoint of the current step: 'preempted' when a stop signal reached any process, 'stopped'
  at `stop_at_step`; else None. Multi-process, agreeing on a stop is a collective, so it is asked only where the
  host syncs anyway (every train.log_every steps)."""
  step = loop.step
  if not (jax.process_count() == 1 or step % ctx.exp.train.log_every == 0 or step == stop_at_step):
    return None
  preempted = parallel.any_process(signals.received is not None)
  if not (preempted or step == stop_at_step):
    return None
  _save(ctx, loop)
  ctx.checkpointer.wait()
  cause = signal.Signals(signals.received).name if signals.received else "signal on another process"
  print(f"{cause if preempted else 'stop_at_step'}: checkpoint at step {step} saved; exiting", flush=True)
  return "preempted" if preempted else "stopped"


def _flush(ctx: _Context, loop: _Loop) -> None:
  """Fetch the pending metrics, write one record per step (`_write_records`), print the progress line."""
  if not loop.pending:
    return
  for kept in ctx.kept_files:
    kept.check()
  records = jax.device_get(loop.pending)
  loop.pending = []
  now = time.perf_counter()
  tokens_per_s = ctx.tokens_per_step * len(records) / max(now - loop.interval_start, 1e-9)
  loop.interval_start = now
  mfu = ctx.flops_per_token * tokens_per_s / ctx.peak_flops
  _write_records(ctx, loop, records, tokens_per_s=tokens_per_s, mfu=mfu)
  last = records[-1]
  shown = {"loss": float(last["loss"]), "ce": float(last["cross_entropy"]), "tokens/s": tokens_per_s, "mfu": mfu}
  if loop.skipped:
    shown["skipped"] = len(loop.skipped)
  print(ctx.progress.line(loop.step, shown), flush=True)
  ctx.checkpointer.check()  # an asynchronous save that failed since: stop now, not at the next save


def _write_records(ctx: _Context, loop: _Loop, records: list[dict], *, tokens_per_s: float, mfu: float) -> None:
  """One metrics record for each of the steps up to loop.step; NonFiniteLossError at the first non-finite loss,
  or once more than train.skip_nonfinite_batches updates were discarded."""
  skip_limit = ctx.exp.train.skip_nonfinite_batches
  first = loop.step - len(records) + 1
  for offset, metrics in enumerate(records):
    at = first + offset
    blocks = metrics.pop("moe")
    metrics.update(tokens_per_s=tokens_per_s, mfu=mfu)
    if metrics.pop("skipped", False):
      loop.skipped.append(at)
      metrics["skipped"] = True
    elif not math.isfinite(float(metrics["loss"])):
      ctx.writer.write(at, "train", metrics, moe=blocks)
      _stop_on_nonfinite(float(metrics["loss"]), at, ctx.checkpointer)
    ctx.writer.write(at, "train", metrics, moe=blocks)
    if len(loop.skipped) > skip_limit > 0:
      raise NonFiniteLossError(
          f"{len(loop.skipped)} batches gave non-finite losses (steps {loop.skipped[:10]}), more than "
          f"train.skip_nonfinite_batches={skip_limit}: the run diverges rather than meeting a bad batch. "
          f"Lower train.learning_rate and resume an earlier checkpoint with train.resume_step and "
          f"train.allow_changes=True; checkpoints kept: {ctx.checkpointer.all_steps()} in "
          f"{ctx.checkpointer.directory}")


def _score(ctx: _Context, loop: _Loop) -> tuple[float, dict, evalset.EvalResult | None]:
  """(the evaluation loss, the eval record's values, the whole fixed set's result or None).

  Without a fixed evaluation set: train.eval_batches of the validation stream. With one: its subset (the whole set
  when there is none) at every evaluation, and the whole set at the last step (results/SCALING.md), each with its
  interval over documents (`metrics.eval_set_stats`). 'cross_entropy' is the score of every evaluation (subset or
  stream), the curve sweeps read; the loss returned is the whole set's at the last step."""
  model = _model(ctx, loop)
  sets = ctx.eval_sets
  if sets is None:
    loss = evaluate(model, ctx.exp, ctx.batch_sharding)
    return loss, {"cross_entropy": loss}, None
  values, full = {}, None
  if sets.subset is not None:
    subset = evaluate_set(model, sets.subset, ctx.exp, ctx.batch_sharding)
    values.update(cross_entropy=subset.mean, **eval_set_stats("subset", subset))
  if sets.subset is None or loop.step >= ctx.exp.train.num_steps:
    full = evaluate_set(model, sets.full, ctx.exp, ctx.batch_sharding)
    values.update(eval_set_stats("full", full))
    values.setdefault("cross_entropy", full.mean)
  return (full.mean if full is not None else values["cross_entropy"]), values, full


def _evaluate(ctx: _Context, loop: _Loop) -> None:
  loop.eval_loss, values, full = _score(ctx, loop)
  ctx.writer.write(loop.step, "eval", values)
  shown = "  ".join(f"{key} {values[key]:.4f}" for key in ("subset/cross_entropy", "full/cross_entropy")
                    if key in values) or f"cross-entropy {loop.eval_loss:.4f}"
  print(f"step {loop.step:>6}  eval {shown}", flush=True)
  if full is not None and loop.step >= ctx.exp.train.num_steps and jax.process_index() == 0:
    # Per-document sums: what the bootstrap over files of a study (SCALING.md) resamples across runs.
    fileio.write_json(os.path.join(ctx.workdir, EVAL_SET_FILE),
                      {"step": loop.step, "result": full.record(), "manifest": ctx.eval_sets.full.manifest()})
  loop.interval_start = time.perf_counter()  # evaluation time is not training time


def _save(ctx: _Context, loop: _Loop) -> None:
  """Checkpoint the current step (once), only after every loss leading to it was seen to be finite."""
  _flush(ctx, loop)
  if loop.step not in loop.saved_steps:
    meta = {"data_state": parallel.gather_strings(json.dumps(loop.data_state)), "step": loop.step,
            "config": ctx.resolved}
    if ctx.eval_sets is not None:
      meta["eval_set"] = ctx.eval_sets.fingerprints()
    ctx.checkpointer.save(loop.step, runstate.checkpoint_tree(*nnx.merge(ctx.graphdef, loop.state)), meta)
    loop.saved_steps.add(loop.step)
  loop.interval_start = time.perf_counter()  # saving time is not training time


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

