"""Experts: stacked position-wise feed-forward networks, as pure functions over arrays.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length. Here T is any number of rows (token slots) per expert
  and N a number of rows sorted by expert.

Every expert is the Transformer FFN of T5 and Switch, y = act(x W_i) W_o, or with a gated activation
(GLU variants, Shazeer 2020, arXiv:2002.05202, as in T5.1.1 and Switch) y = (act(x W_i0) * (x W_i1)) W_o.
Weights are stacked over experts, [E, M, F] and [E, F, M], so that E experts run as one batched matmul;
the dense FFN is the same math with E = 1 (`moe_jax.moe_layer.FeedForward`).

Expert dropout: Switch (Fedus et al. 2021, Sec. 3, Table 4) fine-tunes best with a higher dropout rate
inside the experts (0.4) than elsewhere (0.1); it drops hidden activations [.., F], as T5's FFN dropout.

Two layouts, one math:
  * `expert_ffn`         padded buffers [E, T, M] (capacity backends; T = G*C slots per expert);
  * `ragged_expert_ffn`  rows sorted by expert [N, M] with group sizes [E] (the dropless backend), through
                         `jax.lax.ragged_dot`: a grouped matmul on GPU and TPU. On CPU (jax 0.10.2) ragged_dot
                         lowers to a dense masked dot over all E groups: correct, gradients too, but E times
                         the FLOPs and [E, N, F] buffers, so it is a test path there, not a fast one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp

# name -> (nonlinearity, gated). Gated variants (GeGLU, SwiGLU) multiply by a second linear projection.
# gelu is the tanh approximation, as in T5.1.1 ("gelu_new") and Flaxformer.
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], bool]] = {
    "relu": (jax.nn.relu, False),
    "gelu": (functools.partial(jax.nn.gelu, approximate=True), False),
    "geglu": (functools.partial(jax.nn.gelu, approximate=True), True),
    "swiglu": (jax.nn.silu, True),
}


def validate_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")


def validate_dropout(name: str, rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{name}={rate} must be in [0, 1)")


def is_gated(activation: str) -> bool:
  """True for GLU variants, which need the second input projection wi_1."""
  validate_activation(activation)
  return ACTIVATIONS[activation][1]


@flax.struct.dataclass
class ExpertWeights:
  """Stacked FFN weights of E experts (T5.1.1 names). E = 1 is a dense FFN."""

  wi_0: jax.Array  # [E, M, F] input projection, through the nonlinearity
  wo: jax.Array  # [E, F, M] output projection
  wi_1: jax.Array | None = None  # [E, M, F] linear branch of a gated activation; None otherwise

  @property
  def num_experts(self) -> int:
    return self.wi_0.shape[0]


class Experts(Protocol):
  """What a dispatch backend calls to run the experts (`moe_jax.dispatch`).

  `__call__` takes padded capacity buffers, expert-major; `ragged` takes rows sorted by expert and is only
  called by the dropless backend. `moe_jax.parallel.AllToAllExperts` implements `__call__` across devices.
  """

  def __call__(self, x: jax.Array) -> jax.Array:  # [E, T, M] -> [E, T, M]
    ...

  def ragged(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:  # [N, M], [E] -> [N, M]
    ...


def _hidden(
    pre: jax.Array,  # [.., F] x W_i0
    linear: jax.Array | None,  # [.., F] x W_i1 when gated
    activation: str,
    dropout_rate: float,
    dropout_key: jax.Array | None,
) -> jax.Array:  # [.., F]
  nonlinearity, gated = ACTIVATIONS[activation]
  h = nonlinearity(pre)
  if gated:
    h = h * linear
  if dropout_rate > 0.0 and dropout_key is not None:
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, h.shape)
    h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0).astype(h.dtype)
  return h


def _check(weights: ExpertWeights, activation: str, dropout_rate: float) -> None:
  validate_activation(activation)
  validate_dropout("expert_dropout", dropout_rate)
  if is_gated(activation) != (weights.wi_1 is not None):
    raise ValueError(
        f"activation={activation!r} {'needs' if is_gated(activation) else 'takes no'} second input "
        "projection wi_1"
    )


def expert_ffn(
    weights: ExpertWeights,
    x: jax.Array,  # [E, T, M]
    *,
    activation: str,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:  # [E, T, M]
  """Expert e applied to its rows x[e]: one batched matmul per projection.

  Computes in x.dtype (weights are cast, so float32 params serve a bfloat16 compute dtype). Dropout acts on
  the hidden activations only when `dropout_key` is given and `dropout_rate` > 0 (pass None to evaluate).
  """
  _check(weights, activation, dropout_rate)
  if x.ndim != 3 or x.shape[0] != weights.num_experts:
    raise ValueError(f"expert inputs must be [E={weights.num_experts}, T, M]; got shape {x.shape}")
  cast = lambda w: None if w is None else w.astype(x.dtype)
  pre = jnp.einsum("etm,emf->etf", x, cast(weights.wi_0))
  linear = None if weights.wi_1 is None else jnp.einsum("etm,emf->etf", x, cast(weights.wi_1))
  h = _hidden(pre, linear, activation, dropout_rate, dropout_key)
  return jnp.einsum("etf,efm->etm", h, cast(weights.wo))


def ragged_expert_ffn(
    weights: ExpertWeights,
    x: jax.Array,  # [N, M] rows sorted by expert
    group_sizes: jax.Array,  # [E] int32: rows of expert 0, then expert 1, ...
    *,
    activation: str,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:  # [N, M], zero beyond sum(group_sizes)
  """The same FFN on rows grouped by expert, through `jax.lax.ragged_dot` (MegaBlocks-style, no capacity).

  Rows after the last group (sum(group_sizes) <= N) give zeros: the dropless backend parks dropped
  assignments there. See the module docstring for the cost of ragged_dot on CPU.
  """
  _check(weights, activation, dropout_rate)
  cast = lambda w: None if w is None else w.astype(x.dtype)
  pre = jax.lax.ragged_dot(x, cast(weights.wi_0), group_sizes)
  linear = None if weights.wi_1 is None else jax.lax.ragged_dot(x, cast(weights.wi_1), group_sizes)
  h = _hidden(pre, linear, activation, dropout_rate, dropout_key)
  return jax.lax.ragged_dot(h, cast(weights.wo), group_sizes)


@dataclasses.dataclass(frozen=True)
class StackedExperts:
  """All E experts on this device: the `Experts` a backend calls when nothing is sharded."""

  weights: ExpertWeights
  activation: str
  dropout_rate: float = 0.0
  dropout_key: jax.Array | None = None  # None: no dropout (deterministic)

  def __call__(self, x: jax.Array) -> jax.Array:  # [E, T, M] -> [E, T, M]
    return expert_ffn(
        self.weights, x, activation=self.activation, dropout_rate=self.dropout_rate, dropout_key=self.dropout_key
    )

  def ragged(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:  # [N, M], [E] -> [N, M]
    return ragged_expert_ffn(
        self.weights,
        x,
        group_sizes,
        activation=self.activation,
        dropout_rate=self.dropout_rate,
        dropout_key=self.dropout_key,
    )
