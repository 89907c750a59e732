"""What a router family provides: one declaration that the MoE layer, the schema, the FLOP counts and `resolve` read.

A router family (Switch, top-k, expert choice, ...) is one `RouterFamily` in its own module of this package. It
declares, in that one place:
  * `options`: its own config section, `moe.<name>.<option>` (a `moe_jax.schema.Section`; None when it has
    none), and `reads`: which of the options shared by several routers (`SHARED_OPTIONS`: capacity factors,
    dropless, jitter, ...) it reads; the schema refuses a non-default value of any other, and of another
    router's section, so no field is silently ignored;
  * `params`: its parameters, their shapes, logical axes (moe_jax.parallel) and initialisers, and any model state
    it moves after each training step;
  * `route`: the routing call, from `RouterInputs` to a `routing.RoutingResult` (or Soft MoE's
    `SoftRoutingResult`); the math itself is a pure function, arrays in and arrays out (`moe_jax.routing`);
  * whether it is `causal` (a token's routing reads no later token), `needs_token_ids`, `draws_noise`;
  * its capacity per expert and group (`capacity`; None where there is none) and the FLOP fact
    `experts_per_token`; its router parameter count comes from `params`.
Nothing here imports flax: the schema validates a config from these declarations without building a model.

Axis legend (as in `moe_jax.routing`): G groups · S tokens per group · E experts · M d_model.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.init import switch_init
from moe_jax.schema import Section

if TYPE_CHECKING:
  from moe_jax.config_lib import MoeConfig

# The moe.* options that several router families read (each declares which in `RouterFamily.reads`).
CAPACITY = ("capacity_factor", "eval_capacity_factor")  # routers with a capacity per expert
# Token-choice routers that also take an absolute capacity (`token_choice_capacity`) in place of the factors.
EXPERT_CAPACITY = ("expert_capacity",)
DROPLESS = ("dropless",)  # token-choice routers that can give up the capacity
LOGITS = ("jitter_eps", "router_dtype", "check_router_inputs")  # routers whose scores are logits x W
SHARED_OPTIONS = (*CAPACITY, *EXPERT_CAPACITY, *DROPLESS, "batch_prioritized", *LOGITS)


@dataclasses.dataclass(frozen=True)
class RouterParam:
  """One array a router family adds to each MoE layer, created by `moe_layer.MoeFeedForward` under its name."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axes (moe_jax.parallel's rules shard by them)
  # init(init_scale) -> a jax initialiser (key, shape, dtype) -> array; init_scale is model.init_scale.
  init: Callable[[float], Callable[..., jax.Array]]
  # None: a trained parameter. Otherwise model state with no gradient and no optimizer state (moe_layer.RouterBias):
  # after every training call it becomes update(value, routing metrics, options), e.g. DeepSeek-V3's balancing bias.
  update: Callable[[jax.Array, routing.RoutingMetrics, Any], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class RouterInputs:
  """What a router may read inside the MoE block (on one device's groups under a mesh)."""

  groups: jax.Array  # [G, S, M] compute dtype
  params: Mapping[str, jax.Array]  # the family's `params` by name
  token_ids: jax.Array | None  # [G, S] int32 where the family `needs_token_ids`; else None
  jitter_key: jax.Array | None  # None at evaluation or when the layer draws no noise
  policy_key: jax.Array | None


Route = Callable[[RouterInputs, "MoeConfig", Any, bool], "routing.RoutingResult | routing.SoftRoutingResult"]


@dataclasses.dataclass(frozen=True)
class RouterFamily:
  """A router as one unit (see the module docstring). `options` below is the family's options section (None when
  it has none); `moe` the whole `config_lib.MoeConfig`, for the shared options the family `reads`."""

  name: str  # moe.router, and the name of its options section moe.<name>
  summary: str  # one line for docs/config.md: what it does and the paper
  # route(inputs, moe, options, deterministic); deterministic=True at evaluation.
  route: Route
  # params(d_model, num_experts, options) -> {attribute name: RouterParam}, in creation order.
  params: Callable[[int, int, Any], dict[str, RouterParam]]
  # capacity(moe, options, tokens_per_group, training) -> slots per expert and group; None: no capacity.
  capacity: Callable[["MoeConfig", Any, int, bool], int | None]
  # experts_per_token(moe, options, capacity_factor): expert FFNs one token costs. capacity_factor None: the
  # paper's active count (k); a float: the rows executed with buffers padded to that factor.
  experts_per_token: Callable[["MoeConfig", Any, float | None], float]
  options: type[Section] | None = None
  reads: tuple[str, ...] = ()  # the SHARED_OPTIONS it reads
  causal: bool = True  # False: a token's routing reads later tokens of its group (encoders only)
  needs_token_ids: bool = False
  draws_noise: Callable[[Any], bool] = lambda options: False  # noise of its own in training, besides jitter
  # Rules relating its options to the shared moe.* fields: raise ValueError naming the field and its range.
  check: Callable[["MoeConfig", Any], None] = lambda moe, options: None
  # aux_loss(result, options, sequence_length) -> [] an extra loss the training loss adds as it is (weighted).
  aux_loss: Callable[[Any, Any, int], jax.Array] | None = None

  def __post_init__(self):
    unknown = set(self.reads) - set(SHARED_OPTIONS)
    if unknown:
      raise ValueError(f"router family {self.name!r} reads {sorted(unknown)}, which are not shared moe options "
                       f"{SHARED_OPTIONS}; declare them in its own options section")
    if self.options is not None and self.options.NAME != f"moe.{self.name}":
      raise ValueError(f"router family {self.name!r}: its options section NAME must be 'moe.{self.name}'; got "
                       f"{self.options.NAME!r}")

  def router_params(self, d_model: int, num_experts: int, options: Any) -> int:
    """Trained router parameters of one MoE layer (model state that `update` moves is not counted)."""
    return sum(math.prod(p.shape) for p in self.params(d_model, num_experts, options).values() if p.update is None)


# ----------------------------------------------------------------------------------------------------------
# Pieces several families share.


def capacity_factor(moe: MoeConfig, training: bool) -> float:
  """Mesh-TensorFlow MoE: one capacity factor in training, a larger one in evaluation."""
  return moe.capacity_factor if training else moe.eval_capacity_factor


def expert_capacity(moe: MoeConfig) -> int | None:
  """The absolute slots per expert and group, `moe.expert_capacity` (the same in training and evaluation, as in
  Hugging Face Switch Transformers); None when 0 (the capacity factors decide)."""
  return moe.expert_capacity or None


def token_choice_capacity(moe: MoeConfig, tokens_per_group: int, training: bool, k: int = 1) -> int:
  """Slots per expert of a token-choice router, by the one convention `routing.token_choice_capacity`: S when
  dropless (no expert can take a token twice), min(S, moe.expert_capacity) when set, else from the capacity factor
  of training or evaluation."""
  return routing.token_choice_capacity(tokens_per_group, moe.num_experts, top_k=k,
                                       capacity_factor=capacity_factor(moe, training), dropless=moe.dropless,
                                       expert_capacity=expert_capacity(moe))


def padded_experts_per_token(moe: MoeConfig, k: float, factor: float | None) -> float:
  """k experts per token; with capacity-padded buffers (factor given, not dropless) factor x k rows."""
  return k if factor is None or moe.dropless else factor * k


def logits(inputs: RouterInputs, moe: MoeConfig, deterministic: bool) -> jax.Array:  # [G, S, E]
  """The logits x W of the routers that read `LOGITS`: Switch's jitter in training, and the router in
  moe.router_dtype (bfloat16: the ablation of Switch Table 2, logits and softmax in bfloat16)."""
  out = routing.router_logits(inputs.groups, inputs.params["router"],
                              jitter_eps=0.0 if deterministic else moe.jitter_eps, key=inputs.jitter_key,
                              dtype=jnp.dtype(moe.router_dtype))
  if moe.check_router_inputs:  # debug only: a host callback per call
    jax.debug.callback(report_nonfinite_router_inputs, jnp.sum(~jnp.isfinite(inputs.groups)),
                       jnp.sum(~jnp.isfinite(out)))
  return out


def report_nonfinite_router_inputs(bad_inputs, bad_logits) -> None:
  """Host side of `moe.check_router_inputs`: the pure routers do no host checks, so a NaN or inf reaching the
  router would otherwise only surface later as a NaN loss."""
  if bad_inputs or bad_logits:
    print(f"moe: non-finite router input: {int(bad_inputs)} token features, {int(bad_logits)} router logits",
          file=sys.stderr, flush=True)


def kernel(d_model: int, num_experts: int) -> dict[str, RouterParam]:
  """The router kernel W [M, E] of the logit routers, with Switch's init."""
  return {"router": RouterParam((d_model, num_experts), ("embed", "unmodeled"), switch_init)}
