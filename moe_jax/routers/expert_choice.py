"""Expert-choice routing (Zhou et al. 2022, arXiv:2202.09368): each expert takes its top-C tokens of the group,
C = capacity_factor * S / E, so capacity_factor is the paper's average experts per token c. NON-CAUSAL: a token's
assignment compares it with the later tokens of its group, so it routes encoders only. The pure function is
`routing.expert_choice_route`."""

from __future__ import annotations

from moe_jax import routing
from moe_jax.routers import family


def _route(inputs, moe, options, deterministic):
  return routing.expert_choice_route(family.logits(inputs, moe, deterministic),
                                     capacity_factor=family.capacity_factor(moe, not deterministic))


FAMILY = family.RouterFamily(
    name="expert_choice",
    summary="each expert picks its top-C tokens (Zhou et al. 2022); non-causal",
    route=_route,
    params=lambda d_model, num_experts, options: family.kernel(d_model, num_experts),
    capacity=lambda moe, options, tokens, training: routing.compute_capacity(
        tokens, moe.num_experts, family.capacity_factor(moe, training)),
    # c = capacity_factor experts per token on average; executed, the buffers hold exactly that many rows.
    experts_per_token=lambda moe, options, factor: moe.capacity_factor if factor is None else factor,
    reads=(*family.CAPACITY, *family.LOGITS),
    causal=False,
)
