"""Hash layers (Roller et al. 2021, arXiv:2106.04426): a fixed hash of the token id picks the expert, weight 1;
nothing is learned, so it has no router parameters and reads the token ids instead of the token features.
Capacity as for Switch, or none with moe.dropless. The pure function is `routing.hash_route`."""

from __future__ import annotations

from moe_jax import routing
from moe_jax.routers import family

FAMILY = family.RouterFamily(
    name="hash",
    summary="a fixed hash of the token id, no learned router (Hash layers, Roller et al. 2021)",
    route=lambda inputs, moe, options, deterministic: routing.hash_route(
        inputs.token_ids, num_experts=moe.num_experts, capacity_factor=family.capacity_factor(moe, not deterministic),
        dropless=moe.dropless, expert_capacity=family.expert_capacity(moe)),
    params=lambda d_model, num_experts, options: {},
    capacity=lambda moe, options, tokens, training: family.token_choice_capacity(moe, tokens, training),
    experts_per_token=lambda moe, options, factor: family.padded_experts_per_token(moe, 1, factor),
    reads=(*family.CAPACITY, *family.EXPERT_CAPACITY, *family.DROPLESS),
    needs_token_ids=True,
)
