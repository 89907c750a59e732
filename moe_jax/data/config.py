"""The `data` section of an experiment config: its fields, defaults and validation.

Fields (all errors name them with the `data.` prefix, as they sit in the experiment config):
  dataset              one of DATASETS
  data_dir             cache of prepared TFDS data; None: see `builders.default_data_dir` for
                       stdlib/text_dir, TFDS's default ($TFDS_DATA_DIR, ~/tensorflow_datasets)
                       for registered datasets
  text_dir, text_glob  the directory and glob ('**' recurses) of dataset 'text_dir'
  tokenizer            'byte', or the path of a SentencePiece .model file
  download             registered datasets only: may this run download and prepare them?
  validation_fraction  stdlib/text_dir only: the share of files held out, in (0, 0.5]
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from moe_jax.data import builders

DATASETS: tuple[str, ...] = ("stdlib", "text_dir", *builders.REGISTERED)


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults: byte-level tokens of the Python standard library, prepared into the local cache."""
  return ml_collections.ConfigDict({
      "dataset": "stdlib",
      "data_dir": ml_collections.FieldReference(None, field_type=str),
      "text_dir": ml_collections.FieldReference(None, field_type=str),
      "text_glob": "**/*.txt",
      "tokenizer": "byte",
      "download": False,
      "validation_fraction": builders.DEFAULT_VALIDATION_FRACTION,
  })


_DEFAULTS = default_data_config().to_dict()


def get_field(cfg: Any, name: str) -> Any:
  """cfg.name for a ConfigDict, dict or plain object; the default when the field is absent."""
  if isinstance(cfg, (dict, ml_collections.ConfigDict)):
    return cfg.get(name, _DEFAULTS[name])
  return getattr(cfg, name, _DEFAULTS[name])


def check_tokenizer(tokenizer: Any) -> None:
  """ValueError naming data.tokenizer unless it is 'byte' or an existing file."""
  if not (isinstance(tokenizer, str) and tokenizer):
    raise ValueError(f"data.tokenizer={tokenizer!r} must be 'byte' or the path of a SentencePiece .model file")
  if tokenizer != "byte" and not os.path.isfile(os.path.expanduser(tokenizer)):
    raise ValueError(
        f"data.tokenizer={tokenizer!r} is neither 'byte' nor an existing SentencePiece .model file "
        "(train one with experiments/train_tokenizer.py)")


def validate_data_config(cfg: Any) -> None:
  """Raises ValueError naming the first bad field, with its value and what was expected.

  Cheap checks only (no corpus is read): a missing text_dir or tokenizer file fails here rather
  than minutes into a run.
  """
  dataset = get_field(cfg, "dataset")
  if dataset not in DATASETS:
    raise ValueError(f"data.dataset={dataset!r} must be one of {DATASETS}")

  data_dir = get_field(cfg, "data_dir")
  if data_dir is not None and not (isinstance(data_dir, str) and data_dir):
    raise ValueError(f"data.data_dir={data_dir!r} must be None or a non-empty path")

  check_tokenizer(get_field(cfg, "tokenizer"))

  download = get_field(cfg, "download")
  if not isinstance(download, bool):
    raise ValueError(f"data.download={download!r} must be True or False")

  fraction = get_field(cfg, "validation_fraction")
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
    raise ValueError(f"data.validation_fraction={fraction!r} must be a number in (0, 0.5]")

  text_glob = get_field(cfg, "text_glob")
  if not (isinstance(text_glob, str) and text_glob):
    raise ValueError(f"data.text_glob={text_glob!r} must be a non-empty glob pattern such as '**/*.txt'")

  if dataset == "text_dir":
    text_dir = get_field(cfg, "text_dir")
    if not (isinstance(text_dir, str) and text_dir):
      raise ValueError(f"data.text_dir={text_dir!r} must be set to a directory when data.dataset='text_dir'")
    if not os.path.isdir(os.path.expanduser(text_dir)):
      raise ValueError(f"data.text_dir={text_dir!r} is not an existing directory")
