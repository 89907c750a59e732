"""Switch Transformer routing (Fedus et al. 2021, arXiv:2101.03961): each token to its argmax expert while the
expert has room, weighted by the router probability of that expert (eqs. 1-3). `routing.switch_route` is the
pure function; this is top-k routing with k = 1 and no options of its own."""

from __future__ import annotations

import jax.numpy as jnp

from moe_jax import routing
from moe_jax.routers import family


def _route(inputs, moe, options, deterministic):
  return routing.switch_route(family.logits(inputs, moe, deterministic),
                              capacity_factor=family.capacity_factor(moe, not deterministic), dropless=moe.dropless,
                              expert_capacity=family.expert_capacity(moe), batch_prioritized=moe.batch_prioritized,
                              dtype=jnp.dtype(moe.router_dtype))


FAMILY = family.RouterFamily(
    name="switch",
    summary="top-1 token choice (Switch Transformer, Fedus et al. 2021)",
    route=_route,
    params=lambda d_model, num_experts, options: family.kernel(d_model, num_experts),
    capacity=lambda moe, options, tokens, training: family.token_choice_capacity(moe, tokens, training),
    experts_per_token=lambda moe, options, factor: family.padded_experts_per_token(moe, 1, factor),
    reads=(*family.CAPACITY, *family.EXPERT_CAPACITY, *family.DROPLESS, "batch_prioritized", *family.LOGITS),
)
