"""Soft MoE (Puigcerver et al. 2023, arXiv:2308.00951) and its option, `moe.soft_moe.slots_per_expert`: every
expert has P slots, each a softmax mixture of all tokens of the group, and every token's output a softmax mixture
of all slot outputs. Nothing is dropped, so it has no capacity; its dense weights need dispatch='einsum'
(`dispatch.soft_dispatch`). NON-CAUSAL: every slot mixes the whole group, so it routes encoders only. The pure
function is `routing.soft_moe_route`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from moe_jax import routing
from moe_jax.init import switch_init
from moe_jax.routers import family
from moe_jax.schema import Section, at_least, field


@dataclasses.dataclass(frozen=True)
class SoftMoeOptions(Section):
  """Options of router='soft_moe'."""

  NAME: ClassVar[str] = "moe.soft_moe"
  slots_per_expert: int = field(1, at_least(1), "slots P per expert; P = S / E slots in all give each token one "
                                "expert's FLOPs")


def _params(d_model: int, num_experts: int, options: SoftMoeOptions) -> dict[str, family.RouterParam]:
  return {
      # phi [M, E, P]: each slot's parameters (the paper's Phi), Switch init.
      "router": family.RouterParam((d_model, num_experts, options.slots_per_expert),
                                   ("embed", "unmodeled", "unmodeled"), switch_init),
      # The learned scale of the normalised logits, initialised to 1 (Sec. 2.3 "Normalization").
      "router_scale": family.RouterParam((), (), lambda scale: jax.nn.initializers.ones),
  }


def _check(moe, options: SoftMoeOptions) -> None:
  """`moe.dispatch='einsum'`: the slot weights are dense [G, S, E, P], which no index-based backend takes."""
  if moe.dispatch != "einsum":
    raise ValueError(f"moe.dispatch={moe.dispatch!r} must be 'einsum' for moe.router='soft_moe' (its dense slot "
                     "weights have no index form)")


FAMILY = family.RouterFamily(
    name="soft_moe",
    summary="every expert slot a softmax mixture of the group's tokens (Puigcerver et al. 2023); non-causal",
    route=lambda inputs, moe, options, deterministic: routing.soft_moe_route(
        inputs.groups, inputs.params["router"], inputs.params["router_scale"]),
    params=_params,
    capacity=lambda moe, options, tokens, training: None,
    # E * P slots for S tokens: one expert per token at the paper's P = S / E, which the counts assume.
    experts_per_token=lambda moe, options, factor: 1.0,
    options=SoftMoeOptions,
    causal=False,
    check=_check,
)
