"""Named implementations that a config chooses between, looked up where they are implemented.

Each kind of choice (a router, a dispatch backend, an activation, ...) is a mapping or tuple of names kept in
the module that implements it, next to the code the names select. The config schema (`moe_jax.config_lib`)
validates a choice by asking `names(kind)`, which imports the implementing module only then: the schema
declares *which registry* a field draws from, never the names themselves, and imports no model code.
"""

from __future__ import annotations

import importlib
import typing

# module -> {kind: attribute}: the attribute is a dict or tuple whose keys/items are the valid names of that kind
# of choice, or a typing.Literal of them. Listed by module, in the order of the data path.
_BY_MODULE: dict[str, dict[str, str]] = {
    "moe_jax.routing": {"score_function": "SCORE_FUNCTIONS", "group_score": "GroupScore",
                        "second_expert_policy": "SecondExpertPolicy"},
    "moe_jax.dispatch": {"dispatch": "CHOICES", "dropless_dispatch": "DROPLESS"},
    "moe_jax.experts": {"activation": "ACTIVATIONS"},
    "moe_jax.moe_layer": {"router": "ROUTERS", "non_causal_router": "NON_CAUSAL_ROUTERS",
                          "decoder_router": "DECODER_ROUTERS", "dtype": "DTYPES"},
    "moe_jax.layers": {"norm": "NORMS", "positions": "POSITIONS"},
    "moe_jax.model": {"remat": "REMAT_POLICIES"},
    "moe_jax.models": {"architecture": "ARCHITECTURES"},
    "moe_jax.data.config": {"dataset": "DATASETS", "objective": "OBJECTIVES"},
    "moe_jax.train": {"optimizer": "OPTIMIZERS", "schedule": "SCHEDULES"},
}
# kind -> (module, attribute)
PROVIDERS: dict[str, tuple[str, str]] = {
    kind: (module, attribute) for module, kinds in _BY_MODULE.items() for kind, attribute in kinds.items()
}


def names(kind: str) -> tuple[str, ...]:
  """The valid names of a kind of choice, in the implementing module's order."""
  module, attribute = PROVIDERS[kind]
  provided = getattr(importlib.import_module(module), attribute)
  if typing.get_origin(provided) is typing.Literal:
    return typing.get_args(provided)
  return tuple(provided)
