"""Phi-3.5-MoE's router (Microsoft 2024, model card microsoft/Phi-3.5-MoE-instruct; SparseMixer, Liu et al. 2023,
arXiv:2310.00811; GRIN, Liu et al. 2024, arXiv:2409.12136) and its option, `moe.sparsemixer.jitter_eps`: always
two experts, chosen by two argmax stages, each weighted by a softmax over the experts within a relative
threshold of its stage's max, not renormalised (`routing.sparsemixer_route`, the pure function, spells it out).

What is implemented is the routing `transformers` computes at evaluation (`sparsemixer` in
`models/phimoe/modeling_phimoe.py`), which is what reproduces a Phi-3.5-MoE checkpoint's outputs. Training uses
that same evaluation routing, with plain gradients through the two softmax weights; the paper's training
estimator (Gumbel sampling of each stage, Heun's third-order gradient through the choice) is out of scope, so
fine-tuning here is not GRIN's training. `moe.sparsemixer.jitter_eps` is the threshold (Phi-3.5-MoE's
`router_jitter_noise`, 0.01), not `moe.jitter_eps`, which is the multiplicative input noise of training
(Phi-3.5-MoE's `input_jitter_noise`, 0 published). Capacity as for top-k routing with k = 2, or none with
`moe.dropless` (Phi-3.5-MoE drops nothing: `dropless=True`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from moe_jax import routing
from moe_jax.routers import family
from moe_jax.schema import Section, field, in_range

EXPERTS_PER_TOKEN = 2  # sparsemixer always takes two stages; Phi-3.5-MoE's num_experts_per_tok is not read


@dataclasses.dataclass(frozen=True)
class SparsemixerOptions(Section):
  """Options of router='sparsemixer'."""

  NAME: ClassVar[str] = "moe.sparsemixer"
  jitter_eps: float = field(0.01, in_range(0, 1, closed_low=False), "relative threshold eps: a stage's softmax "
                            "keeps the experts within 2 eps of its max (Phi-3.5-MoE router_jitter_noise 0.01)")


def _check(moe, options: SparsemixerOptions) -> None:
  """`moe.num_experts >= 2`: every token takes two distinct experts."""
  if moe.num_experts < EXPERTS_PER_TOKEN:
    raise ValueError(f"moe.num_experts={moe.num_experts} must be >= 2 for moe.router='sparsemixer' (every token "
                     "takes two distinct experts)")


def _route(inputs, moe, options: SparsemixerOptions, deterministic):
  return routing.sparsemixer_route(
      family.logits(inputs, moe, deterministic),
      jitter_eps=options.jitter_eps,
      capacity_factor=family.capacity_factor(moe, not deterministic),
      dropless=moe.dropless,
      expert_capacity=family.expert_capacity(moe),
      dtype=jnp.dtype(moe.router_dtype),
  )


FAMILY = family.RouterFamily(
    name="sparsemixer",
    summary="Phi-3.5-MoE's two-stage top-2 with thresholded softmax weights (sparsemixer, evaluation form)",
    route=_route,
    params=lambda d_model, num_experts, options: family.kernel(d_model, num_experts),
    capacity=lambda moe, options, tokens, training: family.token_choice_capacity(moe, tokens, training,
                                                                                 EXPERTS_PER_TOKEN),
    experts_per_token=lambda moe, options, factor: family.padded_experts_per_token(moe, EXPERTS_PER_TOKEN, factor),
    options=SparsemixerOptions,
    reads=(*family.CAPACITY, *family.EXPERT_CAPACITY, *family.DROPLESS, *family.LOGITS),
    check=_check,
)
