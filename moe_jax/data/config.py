"""The `data` config section as the data package uses it. Its fields, defaults and ranges are declared once, in
`moe_jax.config_lib.DataConfig` (see docs/config.md); this module adds the list of data sets and accepts
partial configs (a dict with some fields), so that the package can be used on its own.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moe_jax import config_lib
from moe_jax.data import builders

DATASETS: tuple[str, ...] = ("stdlib", "text_dir", *builders.REGISTERED)
# What a batch asks of the model (data.objective): the next token (`pipeline`), or T5's masked spans
# (`span_corruption`).
OBJECTIVES: tuple[str, ...] = ("causal_lm", "span_corruption")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults: byte-level tokens of the Python standard library, prepared into the local cache."""
  return config_lib.default_config().data


def validate_data_config(cfg: Any) -> config_lib.DataConfig:
  """The typed data section of `cfg` (ConfigDict, dict or DataConfig; absent fields take their defaults).

  Raises ValueError naming the first bad field. Cheap checks only (no corpus is read): a missing text_dir or
  tokenizer file fails here rather than minutes into a run.
  """
  if isinstance(cfg, config_lib.DataConfig):
    return cfg
  values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  defaults = {f.name: f.default for f in config_lib.config_fields(config_lib.DataConfig)}
  return config_lib.section_from_config(config_lib.DataConfig, {**defaults, **values})


def get_field(cfg: Any, name: str) -> Any:
  """One field of the (validated) data section of `cfg`."""
  return getattr(validate_data_config(cfg), name)


def check_tokenizer(tokenizer: Any) -> None:
  """ValueError naming data.tokenizer unless it is 'byte' or an existing file."""
  validate_data_config({"tokenizer": tokenizer})

