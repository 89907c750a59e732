"""The schema validates every choice without the model: the names live in `moe_jax.registry` and the router
families of `moe_jax.routers`, the implementing modules keep equal tables, and a full validation in a fresh
process imports no model, training or flax code."""

import importlib
import os
import subprocess
import sys
import typing

import pytest

from moe_jax import registry, schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_AND_TRAINING = ("moe_jax.moe_layer", "moe_jax.layers", "moe_jax.model", "moe_jax.models", "moe_jax.encdec",
                      "moe_jax.train", "moe_jax.optim", "flax", "optax", "orbax")


@pytest.mark.parametrize("kind", sorted(registry.NAMES))
def test_registry_names_equal_the_implementing_table(kind):
  module, attribute = registry.IMPLEMENTED_BY[kind]
  table = getattr(importlib.import_module(module), attribute)
  implemented = typing.get_args(table) if typing.get_origin(table) is typing.Literal else tuple(table)
  assert registry.names(kind) == implemented, f"{module}.{attribute} and registry.NAMES[{kind!r}] differ"


@pytest.mark.parametrize("kind", sorted(registry.NAMES))
def test_every_registry_choice_is_valid_and_others_are_refused(kind):
  rule = schema.choice(kind)
  for name in registry.names(kind):
    schema.check_value("x", name, rule)
  with pytest.raises(ValueError, match="x='no-such-choice' must be one of"):
    schema.check_value("x", "no-such-choice", rule)


def test_validating_full_configs_imports_no_model_or_training_code():
  """The default config and a config of configs/ for each router family (the encoder-decoder for the non-causal
  ones), typed and checked in a fresh interpreter: none of the model's or the trainer's modules gets imported
  (`moe_jax.data` imports its grain pipeline, and so orbax, only on first use)."""
  code = f"""
import sys
from moe_jax import config_lib, routers
from configs import lm, switch_t5

def loaded(names):
  return sorted(m for m in sys.modules if m.split(".")[0] in names or m in names)

config_lib.typed(config_lib.default_config())
checked = []
for causal in (True, False):
  for name, family in routers.FAMILIES.items():
    if family.causal != causal:
      continue
    config = lm.get_config("switch-cpu") if causal else switch_t5.get_config("switch-base-cpu")
    config.moe.router = name
    config.moe.group_size = 64
    config.moe.dispatch = "einsum"
    if not causal:
      config.moe.decoder_router = "switch"
      config.train.seq_len = 104  # 16 x 24 span-corruption targets: whole groups of 64 in the decoder too
    assert config_lib.typed(config).moe.family is family
    checked.append(name)
  if causal:
    print(loaded({MODEL_AND_TRAINING!r}))
assert sorted(checked) == sorted(routers.FAMILIES), checked
print(loaded({MODEL_AND_TRAINING!r}))
"""
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split("\n")[:2] == ["[]", "[]"], run.stdout
