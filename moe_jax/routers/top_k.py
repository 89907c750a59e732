"""Token-choice top-k routing and its options, `moe.top_k.*`: GShard top-2 (Lepikhin et al. 2020,
arXiv:2006.16668) with its random second-expert policy, Mixtral's renormalised top-k (Jiang et al. 2024,
arXiv:2401.04088), and the DeepSeek options: sigmoid scores with a routed scaling factor, group-limited routing,
the auxiliary-loss-free balancing bias and the sequence-wise balance loss (DeepSeek-V2 arXiv:2405.04434,
DeepSeek-V3 arXiv:2412.19437). The pure function is `routing.top_k_route`."""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.routers import family
from moe_jax.schema import Section, at_least, boolean, field, in_range, non_negative, one_of, positive


@dataclasses.dataclass(frozen=True)
class TopKOptions(Section):
  """Options of router='top_k'."""

  NAME: ClassVar[str] = "moe.top_k"
  k: int = field(1, at_least(1), "experts per token K (<= moe.num_experts)")
  renormalize: bool = field(False, boolean(), "renormalise the top-k weights to sum to 1 (Mixtral; DeepSeek-V3 "
                            "eq. 13 with sigmoid scores)")
  second_expert_policy: str = field("all", one_of(lambda: typing.get_args(routing.SecondExpertPolicy)),
                                    "GShard policy for choices after the first ('all' when deterministic)")
  second_expert_threshold: float = field(0.2, in_range(0, 1, closed_low=False, closed_high=True),
                                         "GShard 'random' policy threshold")
  score_function: str = field("softmax", one_of(lambda: tuple(routing.SCORE_FUNCTIONS)),
                              "router scores: softmax over experts, or sigmoid affinities (DeepSeek-V3 eq. 15)")
  routed_scaling: float = field(1.0, positive(), "factor on every routed combine weight (DeepSeek-V3: 2.5)")
  num_expert_groups: int = field(1, at_least(1), "group-limited routing: experts form this many groups of "
                                 "consecutive experts (DeepSeek-V3: 8); 1 = off")
  topk_expert_groups: int = field(1, at_least(1), "group-limited routing: groups each token may use (DeepSeek-V3: 4)")
  group_score: str = field("max", one_of(lambda: typing.get_args(routing.GroupScore)),
                           "a group's score: its best expert's (DeepSeek-V2) or its best two's sum (DeepSeek-V3)")
  balancing_bias_rate: float = field(0.0, non_negative(), "gamma of DeepSeek-V3's auxiliary-loss-free balancing: "
                                     "step of the per-expert selection bias after each training step; 0 = off")
  sequence_aux_loss_weight: float = field(0.0, non_negative(), "alpha of DeepSeek-V3's sequence-wise balance loss "
                                          "(eqs. 17-20; V3: 1e-4); 0 = off")

  def _check(self) -> None:
    """`topk_expert_groups <= num_expert_groups`; group_score='top2_sum' needs num_expert_groups > 1."""
    if self.topk_expert_groups > self.num_expert_groups:
      raise ValueError(f"moe.top_k.topk_expert_groups={self.topk_expert_groups} must be in [1, num_expert_groups="
                       f"{self.num_expert_groups}]")
    if self.group_score == "top2_sum" and self.num_expert_groups == 1:
      raise ValueError("moe.top_k.group_score='top2_sum' needs moe.top_k.num_expert_groups > 1")


def _check(moe, options: TopKOptions) -> None:
  """`k <= moe.num_experts`; `num_expert_groups` divides `moe.num_experts`, `k <= topk_expert_groups * experts per
  group` and group_score='top2_sum' needs >= 2 experts per group."""
  if options.k > moe.num_experts:
    raise ValueError(f"moe.top_k.k={options.k} must be in [1, moe.num_experts={moe.num_experts}]")
  if moe.num_experts % options.num_expert_groups:
    raise ValueError(f"moe.top_k.num_expert_groups={options.num_expert_groups} must divide moe.num_experts="
                     f"{moe.num_experts}")
  per_group = moe.num_experts // options.num_expert_groups
  if options.k > options.topk_expert_groups * per_group:
    raise ValueError(f"moe.top_k.k={options.k} must be <= topk_expert_groups * experts per group = "
                     f"{options.topk_expert_groups} * {per_group}")
  if options.group_score == "top2_sum" and per_group < 2:
    raise ValueError(f"moe.top_k.group_score='top2_sum' needs >= 2 experts per group; got "
                     f"num_expert_groups={options.num_expert_groups} of {per_group} experts")


def _params(d_model: int, num_experts: int, options: TopKOptions) -> dict[str, family.RouterParam]:
  params = family.kernel(d_model, num_experts)
  if options.balancing_bias_rate > 0:
    # DeepSeek-V3's per-expert selection bias b [E] (eq. 16), moved toward balance after every training call.
    params["router_bias"] = family.RouterParam(
        (num_experts,), ("unmodeled",), lambda scale: jax.nn.initializers.zeros,
        update=lambda bias, metrics, opts: routing.balancing_bias_update(bias, metrics.expert_selection,
                                                                         opts.balancing_bias_rate))
  return params


def _route(inputs, moe, options: TopKOptions, deterministic):
  random_policy = options.second_expert_policy == "random" and not deterministic
  return routing.top_k_route(
      family.logits(inputs, moe, deterministic),
      k=options.k,
      capacity_factor=family.capacity_factor(moe, not deterministic),
      dropless=moe.dropless,
      expert_capacity=family.expert_capacity(moe),
      renormalize=options.renormalize,
      batch_prioritized=moe.batch_prioritized,
      second_expert_policy="random" if random_policy else "all",
      second_expert_threshold=options.second_expert_threshold,
      key=inputs.policy_key,
      score_function=options.score_function,
      routed_scaling=options.routed_scaling,
      selection_bias=inputs.params.get("router_bias"),
      num_expert_groups=options.num_expert_groups,
      topk_expert_groups=options.topk_expert_groups,
      group_score=options.group_score,
      dtype=jnp.dtype(moe.router_dtype),
  )


def _sequence_loss(result: routing.RoutingResult, options: TopKOptions, sequence_length: int) -> jax.Array:
  """DeepSeek-V3's L_Bal (eq. 17) with its alpha = moe.top_k.sequence_aux_loss_weight; 0 when off."""
  weight = options.sequence_aux_loss_weight
  if not weight:
    return jnp.zeros((), jnp.float32)
  return weight * routing.sequence_balance_loss(result.router_probs, result.expert_index, sequence_length)


FAMILY = family.RouterFamily(
    name="top_k",
    summary="token-choice top-k (GShard, Mixtral) with the DeepSeek options",
    route=_route,
    params=_params,
    capacity=lambda moe, options, tokens, training: family.token_choice_capacity(moe, tokens, training, options.k),
    experts_per_token=lambda moe, options, factor: family.padded_experts_per_token(moe, options.k, factor),
    options=TopKOptions,
    reads=(*family.CAPACITY, *family.EXPERT_CAPACITY, *family.DROPLESS, "batch_prioritized", *family.LOGITS),
    draws_noise=lambda options: options.second_expert_policy == "random",
    check=_check,
    aux_loss=_sequence_loss,
)
