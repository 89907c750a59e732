"""Train and evaluate a decoder LM (dense or MoE) from one config: the main loop of moe_jax.

loss = cross-entropy + alpha * sum_layers load-balancing loss (Switch eq. 4) + beta * sum_layers z-loss (ST-MoE eq. 5)

The run is resumable at any point: model, optimizer, step and data-iterator position are checkpointed, and all
randomness (dropout, router jitter) is a pure function of (seed, step), so a resumed run reproduces the losses
of an uninterrupted one bit for bit on CPU. SIGTERM (TPU preemption) saves a checkpoint and returns; a
non-finite loss stops the run with the step named and the last good checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import config_lib, data as data_lib, flops, parallel
from moe_jax import resolve as resolve_lib
from moe_jax.checkpoint import Checkpointer
from moe_jax.metrics import MetricWriter, Progress
from moe_jax.model import TransformerLM
from moe_jax.moe_layer import RouterBias

BATCH_SPEC = P(("data", "expert"))  # sequences split over every device
# RNG streams reseeded from (seed, step) before every step ('params' is only used at initialisation): dropout,
# router jitter and expert dropout all draw from forks of the 'dropout' stream.
RUNTIME_STREAMS = ("dropout",)


EVAL_SEED = 0  # the validation order: fixed, so every run and seed is scored on the same documents


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


@dataclasses.dataclass
class TrainResult:
  status: str  # 'completed' | 'preempted' | 'stopped'
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


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = make_schedule(train)
  if train.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay)
  else:  # Adafactor, factored second moments (Shazeer & Stern 2018), as used by Switch.
    tx = optax.adafactor(schedule, decay_rate=train.adafactor_decay_rate,
                         weight_decay_rate=train.weight_decay or None)
  if train.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
  return tx


# ----------------------------------------------------------------------------------------------------------
# Steps.


def summed_cross_entropy(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token cross-entropies, sum of weights); padding has weight 0."""
  token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, L]
  return jnp.sum(token_ce * batch["weights"]), jnp.sum(batch["weights"])


def lm_loss(model: TransformerLM, batch: dict, *, deterministic: bool, aux_loss_weight: float,
            z_loss_weight: float):
  """Weighted token cross-entropy plus the router losses; returns (loss, (cross_entropy, aux))."""
  logits, aux = model(batch["inputs"], deterministic=deterministic)
  ce_sum, weight_sum = summed_cross_entropy(logits, batch)
  ce = ce_sum / jnp.maximum(weight_sum, 1.0)
  loss = ce + aux_loss_weight * aux.load_balancing_loss + z_loss_weight * aux.router_z_loss
  loss = loss + aux.sequence_aux_loss  # DeepSeek-V3's sequence-wise loss, weighted by moe.sequence_aux_loss_weight
  return loss, (ce, aux)


def make_train_step(train: ml_collections.ConfigDict, seed: int):
  """A jitted step: (model, optimizer, batch, step) -> (scalar metrics, {MoE block index: MoeAux})."""
  base_key = jax.random.key(seed)

  @nnx.jit
  def train_step(model: TransformerLM, optimizer: nnx.Optimizer, batch: dict, step: jax.Array):
    step_key = jax.random.fold_in(base_key, step)
    nnx.reseed(model, **{name: jax.random.fold_in(step_key, i) for i, name in enumerate(RUNTIME_STREAMS)})
    grad_fn = nnx.value_and_grad(
        lambda m: lm_loss(m, batch, deterministic=False, aux_loss_weight=train.aux_loss_weight,
                          z_loss_weight=train.z_loss_weight),
        has_aux=True,
    )
    (loss, (ce, aux)), grads = grad_fn(model)
    optimizer.update(model, grads)
    metrics = {
        "loss": loss,
        "cross_entropy": ce,
        "load_balancing_loss": aux.load_balancing_loss,
        "router_z_loss": aux.router_z_loss,
        "grad_norm": optax.tree.norm(grads),
    }
    return metrics, aux.blocks

  return train_step


@nnx.jit
def eval_step(model: TransformerLM, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token cross-entropies and of weights (deterministic: no dropout, no jitter)."""
  logits, _ = model(batch["inputs"], deterministic=True)
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


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls between steps, so the step in flight completes first."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: preemption handling is the caller's business
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# Fields a checkpoint's run must share with the config that resumes it (num_steps, logging, mesh may change).
RESUME_INVARIANT_FIELDS = ("seed", "model", "moe", "data.dataset", "data.tokenizer", "train.batch_size",
                           "train.seq_len", "train.optimizer")


def check_resumable(saved: dict, config: ml_collections.ConfigDict) -> None:
  """ValueError naming the fields that differ between a checkpoint's config and this run's."""
  current = json.loads(config.to_json())
  differ = []
  for path in RESUME_INVARIANT_FIELDS:
    old, new = saved, current
    for part in path.split("."):
      old, new = old.get(part), new.get(part)
    if old != new:
      differ.append(f"{path}: checkpoint {old!r} vs config {new!r}")
  if differ:
    raise ValueError("the workdir holds a checkpoint of a different run; use a new --workdir or the same "
                     "config. Differences: " + "; ".join(differ))


def evaluate(model: TransformerLM, config: ml_collections.ConfigDict, sharding: NamedSharding) -> float:
  """Mean token cross-entropy (nats) over the first `train.eval_batches` validation batches.

  The same batches every time, whatever config.seed (EVAL_SEED), so evaluations are comparable across
  steps, runs and seeds.
  """
  iterator = data_lib.create_iterator(
      config.data, split="validation", batch_size=config.train.batch_size // jax.process_count(),
      seq_len=config.train.seq_len, seed=EVAL_SEED, shard_index=jax.process_index(),
      shard_count=jax.process_count(), repeat=False, num_batches=config.train.eval_batches,
  )
  total = count = 0.0
  for batch in iterator:
    ce_sum, weight_sum = eval_step(model, _global_batch(batch, sharding))
    total += float(ce_sum)
    count += float(weight_sum)
  return total / max(count, 1.0)


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
  is_lead = jax.process_index() == 0
  run = resolve_lib.resolve(config, jax.device_count(), log=is_lead)
  config = run.config
  train = config.train
  model_cfg = config_lib.model_config(run.typed, vocab_size=config.model.vocab_size)
  os.makedirs(workdir, exist_ok=True)
  if is_lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(run.record(), f, indent=2)

  mesh = parallel.create_mesh(config.mesh.data, config.mesh.expert)
  batch_sharding = NamedSharding(mesh, BATCH_SPEC)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=train.keep_checkpoints)
  writer = MetricWriter(workdir, enabled=is_lead)

  with parallel.mesh_context(mesh):
    # Initialised under jit: eager initialisers would run replicated on every device (17.6 GB peak for
    # 128 experts on 8 devices vs 0.4 GB jitted); jit creates each parameter directly in its sharding.
    model = nnx.jit(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1)))()
    optimizer = nnx.Optimizer(model, make_optimizer(train), wrt=nnx.Param)
    data_iter = data_lib.create_iterator(
        config.data, split="train", batch_size=train.batch_size // jax.process_count(),
        seq_len=train.seq_len, seed=config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), repeat=True,
    )

    step = 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _checkpoint_tree(model, optimizer)
    )
    restored = checkpointer.restore_latest(abstract, check_meta=lambda meta: check_resumable(meta["config"], config))
    if restored is not None:
      step, tree, meta = restored
      nnx.update(model, tree["params"])
      nnx.update(optimizer, tree["optimizer"])
      data_states = meta["data_state"]  # one JSON state per process
      if len(data_states) != jax.process_count():
        raise ValueError(f"the checkpoint at step {step} was written by {len(data_states)} processes; resume it "
                         f"with that many (this run has {jax.process_count()})")
      data_iter.set_state(json.loads(data_states[jax.process_index()]))
      print(f"resumed from checkpoint at step {step} in {checkpointer.directory}", flush=True)

    train_step = make_train_step(train, config.seed)
    tokens_per_step = train.batch_size * train.seq_len
    train_flops_per_token = flops.flops_per_token(model_cfg, train.seq_len).train
    peak = train.peak_tflops * 1e12 if train.peak_tflops else measure_peak_flops()
    schedule = make_schedule(train)
    progress = Progress(train.num_steps, step)
    eval_loss = None
    status = "completed"
    saved_steps = set(checkpointer.all_steps())

    def save(at_step: int) -> None:
      if at_step not in saved_steps:
        meta = {"data_state": parallel.gather_strings(json.dumps(data_iter.get_state())), "step": at_step,
                "config": json.loads(config.to_json())}
        checkpointer.save(at_step, _checkpoint_tree(model, optimizer), meta)
        saved_steps.add(at_step)

    try:
      with _SigtermFlag() as sigterm:
        last = time.perf_counter()
        while step < train.num_steps:
          preempted = parallel.any_process(sigterm.raised)
          if preempted or step == stop_at_step:
            save(step)
            checkpointer.wait()
            status = "preempted" if preempted else "stopped"
            print(f"{'SIGTERM' if preempted else 'stop_at_step'}: checkpoint at step {step} saved; exiting",
                  flush=True)
            break
          batch = _global_batch(next(data_iter), batch_sharding)
          metrics, blocks = jax.device_get(train_step(model, optimizer, batch, jnp.asarray(step, jnp.int32)))
          step += 1
          now = time.perf_counter()
          step_time, last = now - last, now
          loss = float(metrics["loss"])
          if not math.isfinite(loss):
            checkpointer.wait()
            kept = checkpointer.all_steps()
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) at step {step}; stopped without saving. Last good checkpoint: "
                f"{f'step {kept[-1]}' if kept else 'none'} in {checkpointer.directory}"
            )
          metrics["learning_rate"] = float(schedule(step - 1))
          metrics["tokens_per_s"] = tokens_per_step / step_time
          metrics["mfu"] = train_flops_per_token * metrics["tokens_per_s"] / (peak * jax.device_count())
          writer.write(step, "train", metrics, moe=blocks)
          if step % train.log_every == 0 or step == train.num_steps:
            print(progress.line(step, {"loss": loss, "ce": float(metrics["cross_entropy"]),
                                       "mfu": metrics["mfu"]}), flush=True)
          if (train.eval_every and step % train.eval_every == 0) or step == train.num_steps:
            eval_loss = evaluate(model, config, batch_sharding)
            writer.write(step, "eval", {"cross_entropy": eval_loss})
            print(f"step {step:>6}  eval cross-entropy {eval_loss:.4f}", flush=True)
            last = time.perf_counter()  # evaluation time is not training time
          if (train.checkpoint_every and step % train.checkpoint_every == 0) or step == train.num_steps:
            save(step)
      if eval_loss is None and status == "completed":  # resumed a finished run
        eval_loss = evaluate(model, config, batch_sharding)
      checkpointer.wait()
    finally:
      # Whatever stopped the run, saves already started must reach the disk intact.
      checkpointer.close()
      writer.close()
  return TrainResult(status=status, step=step, eval_loss=eval_loss,
                     wall_time_s=time.perf_counter() - wall_start, workdir=workdir)
