"""The routers a config can name (`moe.router`): one module per router family, each a `family.RouterFamily`.

  switch.py         top-1 token choice (Switch Transformer)
  top_k.py          token-choice top-k (GShard, Mixtral) with the DeepSeek options       moe.top_k.*
  expert_choice.py  each expert picks its top-C tokens (non-causal)
  soft_moe.py       Soft MoE slots (non-causal)                                           moe.soft_moe.*
  base.py           BASE layers' balanced assignment                                      moe.base.*
  hash_layers.py    Hash layers: a fixed hash of the token id
  sparsemixer.py    Phi-3.5-MoE's two-stage top-2 (sparsemixer, evaluation form)         moe.sparsemixer.*

`family.py` states what a family declares; the routing math is in `moe_jax.routing` (pure functions). The MoE
layer, the config schema, the FLOP counts and `moe_jax.resolve` ask a family (`get(name)`) instead of testing
router names, so adding a router is a module here, a line in `FAMILIES` and its tests (docs/add_a_router.md).
`register` adds one at run time (a notebook, a test, a project outside this package).
"""

from __future__ import annotations

from moe_jax.routers import base, expert_choice, hash_layers, soft_moe, sparsemixer, switch, top_k
from moe_jax.routers.family import RouterFamily, RouterInputs, RouterParam

__all__ = ["FAMILIES", "RouterFamily", "RouterInputs", "RouterParam", "get", "names", "register"]

# name -> family, in the order docs/config.md lists them.
FAMILIES: dict[str, RouterFamily] = {
    family.name: family
    for family in (switch.FAMILY, top_k.FAMILY, expert_choice.FAMILY, soft_moe.FAMILY, base.FAMILY, hash_layers.FAMILY,
                   sparsemixer.FAMILY)
}


def register(family: RouterFamily) -> None:
  """Make `family` a valid moe.router (and its options section moe.<name>) from now on, in this process."""
  if family.name in FAMILIES:
    raise ValueError(f"router {family.name!r} is already registered")
  FAMILIES[family.name] = family


def get(name: str) -> RouterFamily:
  if name not in FAMILIES:
    raise ValueError(f"moe.router={name!r} must be one of " + ", ".join(repr(n) for n in FAMILIES))
  return FAMILIES[name]


def names() -> tuple[str, ...]:
  return tuple(FAMILIES)
