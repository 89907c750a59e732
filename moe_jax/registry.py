"""Named implementations that a config chooses between, looked up where they are implemented.

Each kind of choice (a router, a dispatch backend, an activation, ...) is a mapping or tuple of names kept in
the module that implements it, next to the code the names select. The config schema (`moe_jax.config_lib`)
validates a choice by asking `names(kind)`, which imports the implementing module only then: the schema
declares *which registry* a field draws from, never the names themselves, and imports no model code.
"""

from __future__ import annotations

import importlib
import typing

# kind -> (module, attribute): the attribute is a dict or tuple whose keys/items are the valid names, or a
# typing.Literal of them.
PROVIDERS: dict[str, tuple[str, str]] = {
    "router": ("moe_jax.moe_layer", "ROUTERS"),
    "dispatch": ("moe_jax.dispatch", "CHOICES"),
    "dropless_dispatch": ("moe_jax.dispatch", "DROPLESS"),
    "activation": ("moe_jax.experts", "ACTIVATIONS"),
    "norm": ("moe_jax.layers", "NORMS"),
    "dtype": ("moe_jax.moe_layer", "DTYPES"),
    "second_expert_policy": ("moe_jax.routing", "SecondExpertPolicy"),
    "score_function": ("moe_jax.routing", "SCORE_FUNCTIONS"),
    "group_score": ("moe_jax.routing", "GroupScore"),
    "optimizer": ("moe_jax.train", "OPTIMIZERS"),
    "schedule": ("moe_jax.train", "SCHEDULES"),
    "dataset": ("moe_jax.data.config", "DATASETS"),
}


def names(kind: str) -> tuple[str, ...]:
  """The valid names of a kind of choice, in the implementing module's order."""
  module, attribute = PROVIDERS[kind]
  provided = getattr(importlib.import_module(module), attribute)
  if typing.get_origin(provided) is typing.Literal:
    return typing.get_args(provided)
  return tuple(provided)
