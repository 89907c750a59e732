"""Where documents come from: TFDS builders and random-access sources, without TensorFlow.

Every corpus ends up as TFDS array_record files read through `as_data_source` (random access by
record index, which grain shuffles and shards without reading anything twice):

  * `stdlib`    the running Python's standard library source (`sysconfig.get_paths()['stdlib']`):
                a corpus present on every machine that has Python, so tests, CI and laptops train
                on real text with no download. Kept: every `*.py` under it, test suites included
                (`test/` is ~60% of the ~31 MB; it is real, varied code). Dropped: `site-packages`
                and `dist-packages` (whatever the user installed: not reproducible) and
                `__pycache__`. Some distributions (Debian/Ubuntu system Pythons) ship `test/`
                separately, so the corpus is smaller there; the split of every file that does
                exist is the same everywhere (below).
  * `text_dir`  the user's own directory of text files matched by a glob.
  * registered TFDS datasets (`REGISTERED`: c4/en, lm1b, wiki40b/en) prepared beforehand, e.g.
                on a pod's shared disk; loading never downloads unless asked to.

Split: a file is in `validation` iff sha256(relative path) / 2**64 < validation_fraction, a pure
function of the path, so every machine and every run agrees. Raising the fraction only moves
files from train to validation, never back.

Cache: prepared builders live under `data_dir/<builder>/<config>/<version>/`, `data_dir` being
`data.data_dir`, else $MOE_JAX_DATA_DIR, else $XDG_CACHE_HOME/moe_jax/tfds (~/.cache/moe_jax/tfds).
The config name carries the validation fraction and a fingerprint of the file list (paths and
sizes, plus mtimes for `text_dir`), so a changed corpus is prepared afresh instead of served
stale. Preparation takes a file lock, so processes sharing a disk prepare once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob as glob_lib
import hashlib
import importlib
import os
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

SPLITS = ("train", "validation")
DEFAULT_VALIDATION_FRACTION = 0.02
# Directory names never descended into when listing the standard library.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DatasetNotPreparedError(FileNotFoundError):
  """A registered TFDS dataset is not on disk (in a random-access format) and may not be downloaded."""


# ---------------------------------------------------------------------------------------------
# Cache directory and split.


def default_data_dir() -> str:
  """$MOE_JAX_DATA_DIR, else $XDG_CACHE_HOME/moe_jax/tfds, else ~/.cache/moe_jax/tfds."""
  if env := os.environ.get("MOE_JAX_DATA_DIR"):
    return os.path.expanduser(env)
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "moe_jax", "tfds")


def validation_bucket(relative_path: str) -> float:
  """A number in [0, 1) fixed by the path alone (not by PYTHONHASHSEED, the OS or the run)."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(relative_paths: Sequence[str], validation_fraction: float) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]}: the hash split, with at least one file in each.

  A small corpus can leave validation empty; then the file with the smallest bucket moves there
  (still a function of the paths alone). Fewer than two files cannot be split: ValueError.
  """
  if len(relative_paths) < 2:
    raise ValueError(f"need at least 2 files for a train/validation split, found {len(relative_paths)}")
  paths = sorted(relative_paths)
  validation = [p for p in paths if validation_bucket(p) < validation_fraction]
  if not validation:
    validation = [min(paths, key=validation_bucket)]
  held_out = set(validation)
  return {"train": [p for p in paths if p not in held_out], "validation": validation}


def _fingerprint(items: Sequence[Any]) -> str:
  return hashlib.sha256(repr(list(items)).encode("utf-8")).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Builders over a list of files: one example {'text', 'path'} per file.


@dataclasses.dataclass(kw_only=True, eq=False)
class FilesConfig(tfds.core.BuilderConfig):
  """Which files a files builder reads. Built by `stdlib_config` / `text_dir_config`, not by hand."""

  root: str = ""
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION
  # Hidden from repr: TFDS logs the config, and the list has thousands of entries.
  relative_paths: tuple[str, ...] = dataclasses.field(default=(), repr=False)


class _FilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads `config.root / path` for every path of the config into a train and a validation split.

  Not registered with TFDS (configs are made at run time); files are read back with
  `as_data_source`, which needs no registry.
  """

  builder_config: FilesConfig

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),  # relative to config.root; decides the split
        }),
        metadata=tfds.core.MetadataDict(
            root=self.builder_config.root,
            validation_fraction=self.builder_config.validation_fraction,
            python=sys.version.split()[0],
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        split: self._generate_examples(paths)
        for split, paths in split_files(cfg.relative_paths, cfg.validation_fraction).items()
    }

  def _generate_examples(self, relative_paths):
    root = self.builder_config.root
    for path in relative_paths:
      with open(os.path.join(root, path), "rb") as f:
        # Replace undecodable bytes: a few stdlib test files are deliberately not UTF-8.
        text = f.read().decode("utf-8", errors="replace")
      yield path, {"text": text, "path": path}


class StdlibBuilder(_FilesBuilder):
  """The Python standard library's own *.py source, one example per file (see module docstring)."""

  name = "moe_jax_stdlib"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per stdlib *.py file; sha256(path) train/validation split."}


class TextDirBuilder(_FilesBuilder):
  """A user's directory of text files matched by a glob, one example per file."""

  name = "moe_jax_text_dir"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per matched file; sha256(path) train/validation split."}


def _list_stdlib(root: str) -> list[str]:
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
    for name in filenames:
      if name.endswith(".py"):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(paths)


def stdlib_config(validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> FilesConfig:
  """The config of the running interpreter's standard library, e.g. 'py3.11-val0.02-7a6b479aca'."""
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  paths = _list_stdlib(root)
  sizes = [os.path.getsize(os.path.join(root, p)) for p in paths]
  version = f"py{sys.version_info.major}.{sys.version_info.minor}"
  return FilesConfig(
      name=f"{version}-val{float(validation_fraction)!r}-{_fingerprint(zip(paths, sizes))}",
      description=f"Python {sys.version.split()[0]} standard library at {root}: {len(paths)} files.",
      root=root, validation_fraction=validation_fraction, relative_paths=tuple(paths))


def text_dir_config(
    text_dir: str, text_glob: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> FilesConfig:
  """The config of the files under `text_dir` (an existing directory: `config_lib.DataConfig` checks it)
  matching `text_glob` ('**' recurses)."""
  root = os.path.realpath(os.path.expanduser(text_dir))
  matches = glob_lib.glob(text_glob, root_dir=root, recursive=True)
  paths = sorted(p.replace(os.sep, "/") for p in matches if os.path.isfile(os.path.join(root, p)))
  if not paths:
    raise ValueError(f"data.text_dir={text_dir!r} has no files matching data.text_glob={text_glob!r}")
  if len(paths) < 2:
    raise ValueError(
        f"data.text_dir={text_dir!r} has 1 file matching data.text_glob={text_glob!r}; the train/validation "
        "split is by file, so split the text into several files")
  unreadable = [p for p in paths if not _readable(os.path.join(root, p))]
  if unreadable:
    raise ValueError(f"data.text_dir={text_dir!r}: {len(unreadable)} of the {len(paths)} files matching "
                     f"data.text_glob={text_glob!r} cannot be read, e.g. {unreadable[:3]}")
  stats = [os.stat(os.path.join(root, p)) for p in paths]
  fingerprint = _fingerprint([root, text_glob] + [(p, s.st_size, s.st_mtime_ns) for p, s in zip(paths, stats)])
  return FilesConfig(
      name=f"val{float(validation_fraction)!r}-{fingerprint}",
      description=f"{len(paths)} files matching {text_glob!r} under {root}.",
      root=root, validation_fraction=validation_fraction, relative_paths=tuple(paths))


def _readable(path: str) -> bool:
  """Can the file be opened and read (checked before preparation, which would fail minutes later)?"""
  try:
    with open(path, "rb") as f:
      f.read(1)
    return True
  except OSError:
    return False


@contextlib.contextmanager
def _file_lock(path: str):
  """Exclusive advisory lock: concurrent processes prepare a builder once, the others wait."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder_cls: type[_FilesBuilder], config: FilesConfig, data_dir: str | None = None) -> _FilesBuilder:
  """The builder for `config`, prepared under `data_dir` (once; later calls reuse the files)."""
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(os.path.join(data_dir, f".{builder_cls.name}-{config.name}.lock")):
    # Built inside the lock, so it sees whatever another process finished meanwhile.
    builder = builder_cls(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      start = time.perf_counter()
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      logging.info("Prepared %s/%s in %.1f s at %s", builder.name, config.name,
                   time.perf_counter() - start, builder.data_dir)
  return builder


# ---------------------------------------------------------------------------------------------
# Registered TFDS datasets.


@dataclasses.dataclass(frozen=True)
class RegisteredDataset:
  """A TFDS dataset: its name, which feature holds the text, and our split -> its split."""

  tfds_name: str
  text_feature: str
  splits: Mapping[str, str]


REGISTERED: Mapping[str, RegisteredDataset] = {
    # Raffel et al. 2020: train 365M documents, validation 365k.
    "c4/en": RegisteredDataset("c4/en", "text", {"train": "train", "validation": "validation"}),
    # Chelba et al. 2013: one sentence per example; the held-out set is TFDS's 'test'.
    "lm1b": RegisteredDataset("lm1b", "text", {"train": "train", "validation": "test"}),
    # Guo et al. 2020: text keeps its _START_ARTICLE_/_START_PARAGRAPH_/_NEWLINE_ markers.
    "wiki40b/en": RegisteredDataset("wiki40b/en", "text", {"train": "train", "validation": "validation"}),
}

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _prepare_hint(name: str, data_dir: str | None) -> str:
  root = data_dir or tfds.core.constants.DATA_DIR
  return (
      "Prepare it once where there is internet (with what its TFDS builder needs: Apache Beam for c4 and "
      "wiki40b), in a random-access format:\n"
      f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{root}')"
      ".download_and_prepare(file_format='array_record')\"\n"
      f"and set data.data_dir to that directory (None means the TFDS default, {tfds.core.constants.DATA_DIR}), "
      "or set data.download=True to download and prepare it from this run.")


def registered_source(name: str, *, split: str, data_dir: str | None, download: bool):
  """A random-access source of the registered dataset `name`, failing fast if it is not on disk.

  Offline, `tfds.load` retries downloads for minutes; so we look for the prepared files ourselves
  and raise `DatasetNotPreparedError` (a FileNotFoundError) at once when they are missing.
  """
  entry = REGISTERED[name]
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(entry.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    # No files on disk, and no builder class: tfds imports tensorflow_datasets.text lazily, so c4 and
    # wiki40b register only once their module is imported. A prepared copy is read from its files
    # alone (dataset_info.json); only downloading needs the code.
    if not download:
      raise DatasetNotPreparedError(
          f"data.dataset={name!r} is not prepared under data.data_dir={data_dir!r} and data.download=False. "
          + _prepare_hint(name, data_dir)) from e
    try:
      importlib.import_module(f"tensorflow_datasets.text.{entry.tfds_name.split('/')[0]}")
      builder = tfds.builder(entry.tfds_name, data_dir=data_dir)
    except Exception as import_error:  # pylint: disable=broad-except
      raise DatasetNotPreparedError(
          f"data.dataset={name!r}: data.download=True, but its TFDS builder cannot be loaded here "
          f"({import_error!r}). " + _prepare_hint(name, data_dir)) from import_error
  if not builder.is_prepared():
    if not download:
      raise DatasetNotPreparedError(
          f"data.dataset={name!r} is not prepared at {builder.data_path} and data.download=False. "
          + _prepare_hint(name, data_dir))
    builder.download_and_prepare(file_format="array_record")
  file_format = builder.info.file_format
  if file_format is not None and file_format.value not in _RANDOM_ACCESS_FORMATS:
    raise DatasetNotPreparedError(
        f"data.dataset={name!r} at {builder.data_path} is stored as {file_format.value}, which has no random "
        f"access (needed for shuffling, sharding and checkpointable iteration without TensorFlow). Convert it "
        f"once: tfds convert_format --dataset_version_dir={builder.data_path} --out_file_format=array_record")
  return builder.as_data_source(split=entry.splits[split])
