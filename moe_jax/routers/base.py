"""BASE layers (Lewis et al. 2021, arXiv:2103.16716) and its option, `moe.base.sinkhorn_iterations`: in training a
balanced assignment, every expert exactly S / E tokens of each group (Sinkhorn steps, then the greedy balanced
assignment), so no capacity factor and no drops; greedy top-1 without drops at evaluation, as in the paper. The
pure function is `routing.base_route`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from moe_jax import routing
from moe_jax.routers import family
from moe_jax.schema import Section, at_least, field


@dataclasses.dataclass(frozen=True)
class BaseOptions(Section):
  """Options of router='base'."""

  NAME: ClassVar[str] = "moe.base"
  sinkhorn_iterations: int = field(8, at_least(0), "Sinkhorn steps balancing the affinities before the balanced "
                                   "assignment")


def _capacity(moe, options: BaseOptions, tokens_per_group: int, training: bool) -> int:
  """Exactly S / E per expert in training (S must be a multiple of E); S at evaluation (greedy, no drops)."""
  if not training:
    return tokens_per_group
  if tokens_per_group % moe.num_experts:
    raise ValueError(f"moe.router='base' gives every expert exactly S / E tokens of a group: tokens per group "
                     f"S={tokens_per_group} must be a multiple of moe.num_experts={moe.num_experts}")
  return tokens_per_group // moe.num_experts


def _route(inputs, moe, options: BaseOptions, deterministic):
  # Balanced assignment in training only: the paper routes greedily (top-1) at test time.
  return routing.base_route(family.logits(inputs, moe, deterministic), balanced=not deterministic,
                            sinkhorn_iterations=options.sinkhorn_iterations)


FAMILY = family.RouterFamily(
    name="base",
    summary="balanced assignment, exactly S / E tokens per expert in training (BASE layers, Lewis et al. 2021)",
    route=_route,
    params=lambda d_model, num_experts, options: family.kernel(d_model, num_experts),
    capacity=_capacity,
    experts_per_token=lambda moe, options, factor: 1.0,  # one expert per token, buffers exactly full in training
    options=BaseOptions,
    # BASE never drops; moe.dropless=True only admits the dropless dispatch backends (moe.dispatch).
    reads=(*family.DROPLESS, *family.LOGITS),
)
