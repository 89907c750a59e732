"""Optimizers and learning-rate schedules of a run (the `train` section's optimizer fields), with optimizer state
sharded like the parameters it belongs to.

AdamW (Loshchilov & Hutter 2019), or Adafactor with factored second moments (Shazeer & Stern 2018) as Switch
used; linear warmup then cosine / linear / constant decay, or T5's and Switch's inverse square root ('rsqrt').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.config_lib import TrainConfig

# The choices of train.optimizer and train.schedule.
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(train: TrainConfig) -> optax.Schedule:
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


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
  """`train.optimizer` over `make_schedule(train)`, after clipping the global gradient norm to
  `train.grad_clip_norm` (0: no clipping); its state sharded like the parameters (`_shard_state_like_params`)."""
  schedule = make_schedule(train)
  if train.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay)
  else:  # Adafactor, factored second moments (Shazeer & Stern 2018), as used by Switch.
    tx = optax.adafactor(schedule, decay_rate=train.adafactor_decay_rate,
                         weight_decay_rate=train.weight_decay or None)
  if train.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
  return _shard_state_like_params(tx)
