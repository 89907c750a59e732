"""The Hugging Face families moe_jax reads and writes, by their config.json `model_type`.

Each family is a module of `moe_jax.interop` with: MODEL_TYPE and ARCHITECTURE (the `transformers` class that
loads an export), TEMPLATE (config.json keys that are not architecture: token ids, training-only settings, at
`transformers`' defaults), `to_config(hf) -> experiment ConfigDict`, `to_hf(model_cfg) -> architecture keys`,
`rules(model_cfg) -> layout table`, and optionally ALIASES (tensor names a checkpoint may hold as copies of
others, accepted and not read).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# model_type -> module of moe_jax.interop
MODULES = {
    "mixtral": "mixtral", "olmoe": "olmoe", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "dbrx": "dbrx",
    "phimoe": "phimoe", "switch_transformers": "switch", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "olmo": "olmo", "olmo2": "olmo2",
}

# The systems of configs/moe_systems.py (README's table) -> (family, the Hub checkpoint) where a published
# checkpoint exists in a family moe_jax converts, else why not.
PUBLISHED = {
    "mixtral-8x7b": ("mixtral", "mistralai/Mixtral-8x7B-v0.1"),
    "dbrx": ("dbrx", "databricks/dbrx-base"),
    "olmoe-1b-7b": ("olmoe", "allenai/OLMoE-1B-7B-0924"),
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen/Qwen3-30B-A3B"),
    "deepseekmoe-16b": (None, "deepseek-ai/deepseek-moe-16b-base is custom code (trust_remote_code), not converted"),
    "glam-64b-64e": (None, "weights not published"),
    "deepseek-v3-style": (None, "multi-head latent attention is not implemented"),
}


def published(system: str) -> str:
  """README's "loads the published checkpoint" cell of a system."""
  family, where = PUBLISHED.get(system, (None, "no public checkpoint"))
  return f"yes: `{family}` ({where})" if family else f"no ({where})"


def names() -> tuple[str, ...]:
  return tuple(MODULES)


def get(model_type: str) -> ModuleType:
  """The family of a `model_type` (or of its module's name: 'switch' for 'switch_transformers')."""
  module = MODULES.get(model_type, model_type if model_type in MODULES.values() else None)
  if module is None:
    raise ValueError(f"model_type={model_type!r} is not a family moe_jax converts; it converts "
                     + ", ".join(MODULES))
  return importlib.import_module(f"moe_jax.interop.{module}")


def of(hf: dict) -> ModuleType:
  """The family of a config.json (its `model_type`)."""
  if "model_type" not in hf:
    raise ValueError("config.json has no 'model_type': not a transformers model config")
  return get(hf["model_type"])
