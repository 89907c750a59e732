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

Disjoint splits. A document must not be in both splits under two names. The walk of `text_dir`
follows symlinks but never enters a directory it has already walked (a symlink loop once turned
20 files into 820), reads a file reached through several links once, and keeps one file of each
content (sha256; empty files, which hold no text, all stay): so the splits are disjoint by content, by
construction, and preparation checks it.
The stdlib corpus is pinned by committed results and kept as it is: its walk follows no symlinks,
so each file is in one split, but a few files are byte-identical (empty `__init__.py` files).

Cache: prepared builders live under `data_dir/<builder>/<config>/<version>/`, `data_dir` being
`data.data_dir`, else $MOE_JAX_DATA_DIR, else $XDG_CACHE_HOME/moe_jax/tfds (~/.cache/moe_jax/tfds).
The config name carries the validation fraction and a fingerprint of the file list (paths and
sizes, plus each file's sha256 for `text_dir`), so a changed corpus is prepared afresh instead of
served stale. Preparation takes a file lock, so processes sharing a disk prepare once. The
prepared files' sha256 are recorded next to them (`INTEGRITY_FILE`) and checked at every use: a
prepared copy that was damaged since is prepared again, with a warning.

Limits. One file is one example, read whole into memory and stored as one record; files over
`MAX_FILE_BYTES` are refused with their size (split them). A data_dir that cannot be written is
refused naming data.data_dir; one that fills up while preparing is `fileio.EnvironmentFailure`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import importlib
import os
import re
import shutil
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from moe_jax import fileio

SPLITS = ("train", "validation")
DEFAULT_VALIDATION_FRACTION = 0.02
# Directory names never descended into when listing the standard library.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# A file is one example, held in memory whole (several times over while TFDS encodes it) and stored as one
# protobuf record (2 GiB at most): larger files are refused with their size instead of exhausting memory.
MAX_FILE_BYTES = 256 * 2**20
# Next to a prepared builder's files: their sha256, checked at every use (`_verify_prepared`).
INTEGRITY_FILE = "moe_jax_integrity.json"
# Empty files share this content but hold no text, so they can be in both splits without leaking any.
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


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
  # sha256 of each file's bytes, aligned with relative_paths (text_dir); empty when not hashed (stdlib).
  content_hashes: tuple[str, ...] = dataclasses.field(default=(), repr=False)


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
    splits = split_files(cfg.relative_paths, cfg.validation_fraction)
    check_disjoint(cfg, splits)
    return {split: self._generate_examples(paths) for split, paths in splits.items()}

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


def check_disjoint(config: FilesConfig, splits: Mapping[str, Sequence[str]]) -> None:
  """ValueError unless no content (sha256, `config.content_hashes`) and no file (real path) is in both splits.
  A config without hashes (the pinned stdlib corpus, see the module docstring) is not checked."""
  if not config.content_hashes:
    return
  digest = dict(zip(config.relative_paths, config.content_hashes))

  def identities(paths):
    found = {os.path.realpath(os.path.join(config.root, p)): p for p in paths}
    found.update({digest[p]: p for p in paths if digest[p] != _EMPTY_SHA256})
    return found

  train, validation = identities(splits["train"]), identities(splits["validation"])
  shared = sorted(set(train) & set(validation))
  if shared:
    raise ValueError(f"the train and validation splits of {config.root} share {len(shared)} document(s), e.g. "
                     f"{train[shared[0]]!r} and {validation[shared[0]]!r}")


def _glob_regex(pattern: str) -> re.Pattern:
  """The relative paths `glob.glob(pattern, recursive=True)` matches, as a regex over '/'-joined paths: '**' is
  any number of directories, '*', '?' and '[...]' stay within one name, and no wildcard matches a leading dot.
  (`glob` itself follows symlink loops: `walk_files` lists the files, this decides which match.)"""
  parts = []
  segments = pattern.split("/")
  for number, segment in enumerate(segments, 1):
    last = number == len(segments)
    if segment == "**":  # zero or more directories; last, also the file below them
      parts.append(r"(?:(?!\.)[^/]*/)*" + (r"(?!\.)[^/]+" if last else ""))
      continue
    out = "" if segment.startswith(".") else r"(?!\.)"
    i = 0
    while i < len(segment):
      char = segment[i]
      close = segment.find("]", i + 2 if segment[i + 1:i + 2] == "!" else i + 1) if char == "[" else -1
      if char == "*":
        out += "[^/]*"
      elif char == "?":
        out += "[^/]"
      elif close > i + 1:  # a class such as [a-z] or [!0-9]; without its ']' a '[' is literal
        body = segment[i + 1:close]
        out += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
        i = close
      else:
        out += re.escape(char)
      i += 1
    parts.append(out + ("" if last else "/"))
  return re.compile("".join(parts))


def walk_files(root: str) -> list[str]:
  """Every regular file under `root` ('/'-joined relative paths, sorted), following symlinks to directories but
  never into a directory already walked (a symlink loop, or two links to one folder), and naming a file reached
  by several paths once (its first path in walk order)."""
  seen_dirs, seen_files, paths = set(), set(), []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    status = os.stat(dirpath)
    seen_dirs.add((status.st_dev, status.st_ino))
    kept = []
    for name in sorted(dirnames):
      try:
        child = os.stat(os.path.join(dirpath, name))
      except OSError:  # a dangling link or a loop of links: not a directory to walk
        continue
      if (child.st_dev, child.st_ino) not in seen_dirs:
        seen_dirs.add((child.st_dev, child.st_ino))
        kept.append(name)
    dirnames[:] = kept
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      try:
        status = os.stat(path)
      except OSError:
        continue
      if os.path.isfile(path) and (status.st_dev, status.st_ino) not in seen_files:
        seen_files.add((status.st_dev, status.st_ino))
        paths.append(os.path.relpath(path, root).replace(os.sep, "/"))
  return sorted(paths)


def _sha256(path: str) -> str | None:
  """The file's sha256, read in blocks (never whole); None if it cannot be read."""
  try:
    with open(path, "rb") as f:
      digest = hashlib.sha256()
      while block := f.read(2**20):
        digest.update(block)
      return digest.hexdigest()
  except OSError:
    return None


def text_dir_config(
    text_dir: str, text_glob: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> FilesConfig:
  """The config of the files under `text_dir` (an existing directory: `config_lib.DataConfig` checks it)
  matching `text_glob` ('**' recurses), one per content (see the module docstring)."""
  root = os.path.realpath(os.path.expanduser(text_dir))
  matcher = _glob_regex(text_glob)
  paths = [p for p in walk_files(root) if matcher.fullmatch(p)]
  if not paths:
    raise ValueError(f"data.text_dir={text_dir!r} has no files matching data.text_glob={text_glob!r}")
  sizes = {p: os.path.getsize(os.path.join(root, p)) for p in paths}
  too_big = sorted((p for p in paths if sizes[p] > MAX_FILE_BYTES), key=lambda p: -sizes[p])
  if too_big:
    raise ValueError(
        f"data.text_dir={text_dir!r}: {len(too_big)} file(s) over {MAX_FILE_BYTES / 2**20:.0f} MiB, e.g. "
        f"{too_big[0]!r} ({sizes[too_big[0]] / 2**20:.1f} MiB): a file is one document, read into memory whole; "
        "split it into smaller files")
  hashes = {p: _sha256(os.path.join(root, p)) for p in paths}
  unreadable = [p for p in paths if hashes[p] is None]
  if unreadable:
    raise ValueError(f"data.text_dir={text_dir!r}: {len(unreadable)} of the {len(paths)} files matching "
                     f"data.text_glob={text_glob!r} cannot be read, e.g. {unreadable[:3]}")
  first_of = {}
  for p in paths:  # sorted: the first path of each content is kept, on every machine
    first_of.setdefault(p if hashes[p] == _EMPTY_SHA256 else hashes[p], p)
  if len(first_of) < len(paths):
    logging.warning("data.text_dir=%r: %d of the %d files repeat the content of another and are read once",
                    text_dir, len(paths) - len(first_of), len(paths))
  paths = sorted(first_of.values())
  if len(paths) < 2:
    raise ValueError(
        f"data.text_dir={text_dir!r} has 1 distinct file matching data.text_glob={text_glob!r}; the "
        "train/validation split is by file, so split the text into several files")
  fingerprint = _fingerprint([root, text_glob] + [(p, sizes[p], hashes[p]) for p in paths])
  return FilesConfig(
      name=f"val{float(validation_fraction)!r}-{fingerprint}",
      description=f"{len(paths)} files matching {text_glob!r} under {root}.",
      root=root, validation_fraction=validation_fraction, relative_paths=tuple(paths),
      content_hashes=tuple(hashes[p] for p in paths))


@contextlib.contextmanager
def _file_lock(path: str):
  """Exclusive advisory lock: concurrent processes prepare a builder once, the others wait."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepared_files(directory: str) -> dict[str, str]:
  """{name: sha256} of the files of a prepared builder version directory (`INTEGRITY_FILE` aside)."""
  return {name: _sha256(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
          if name != INTEGRITY_FILE and os.path.isfile(os.path.join(directory, name))}


def _verify_prepared(builder: _FilesBuilder) -> str | None:
  """None if the prepared files are those recorded when they were made, else what differs. A copy prepared
  before checksums were recorded gets its record now (nothing to compare it with)."""
  directory = builder.data_dir
  record = os.path.join(directory, INTEGRITY_FILE)
  files = _prepared_files(directory)
  try:
    recorded = fileio.read_json(record)["files"]
  except FileNotFoundError:
    with contextlib.suppress(OSError):  # a read-only data_dir: nothing recorded, nothing checked
      fileio.write_json(record, {"files": files}, indent=1)
    return None
  except (ValueError, KeyError, TypeError):
    return f"its checksum record {record} is damaged"
  differing = sorted(name for name in set(recorded) | set(files) if recorded.get(name) != files.get(name))
  if differing:
    return f"{len(differing)} of its files are missing or changed since it was prepared, e.g. {differing[0]}"
  return None


def _refuse_data_dir(data_dir: str, error: OSError, doing: str):
  """The one-line error for a data_dir that failed while `doing`: the machine (full, I/O) or the input."""
  if error.errno in fileio.ENVIRONMENT_ERRNOS:
    raise fileio.EnvironmentFailure(
        f"data.data_dir={data_dir!r}: {fileio.describe(error)} while {doing}; free space there or set "
        "data.data_dir (or $MOE_JAX_DATA_DIR) to another disk", error.errno) from None
  raise ValueError(f"data.data_dir={data_dir!r} cannot be used for {doing} ({fileio.describe(error)}); set "
                   "data.data_dir (or $MOE_JAX_DATA_DIR) to a writable directory") from None


def _open_prepared(builder_cls: type[_FilesBuilder], config: FilesConfig, data_dir: str) -> _FilesBuilder:
  """The builder, after moving away a prepared copy that is damaged (its files changed since they were
  recorded, or its dataset_info unreadable): such a copy is prepared again, with a warning."""
  version_dir = os.path.join(data_dir, builder_cls.name, config.name, str(builder_cls.VERSION))
  try:
    builder = builder_cls(config=config, data_dir=data_dir)
    damage = _verify_prepared(builder) if builder.is_prepared() else None
  except OSError:
    raise
  except Exception as error:  # pylint: disable=broad-except  # TFDS parsing a damaged dataset_info.json
    damage = f"its dataset info cannot be read: {type(error).__name__}"
  if damage:
    print(f"WARNING: the prepared data set at {version_dir} is damaged ({damage}); preparing it again",
          file=sys.stderr, flush=True)
    shutil.rmtree(version_dir)
    builder = builder_cls(config=config, data_dir=data_dir)
  return builder


def prepare(builder_cls: type[_FilesBuilder], config: FilesConfig, data_dir: str | None = None) -> _FilesBuilder:
  """The builder for `config`, prepared under `data_dir` (once; later calls reuse the files after checking
  them, and prepare again if they were damaged). A read-only data_dir serves a copy already prepared there."""
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  doing = f"preparing {builder_cls.name}/{config.name}"
  check_disjoint(config, split_files(config.relative_paths, config.validation_fraction))  # at every use
  with contextlib.ExitStack() as stack:
    try:
      os.makedirs(data_dir, exist_ok=True)
      stack.enter_context(_file_lock(os.path.join(data_dir, f".{builder_cls.name}-{config.name}.lock")))
    except OSError as error:
      if os.path.isdir(data_dir) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        builder = builder_cls(config=config, data_dir=data_dir)
        if builder.is_prepared():  # a shared read-only copy: used unlocked (nobody can write there either)
          return builder
      _refuse_data_dir(data_dir, error, doing)
    # Opened inside the lock, so it sees whatever another process finished meanwhile.
    builder = _open_prepared(builder_cls, config, data_dir)
    if not builder.is_prepared():
      start = time.perf_counter()
      try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        fileio.write_json(os.path.join(builder.data_dir, INTEGRITY_FILE),
                          {"files": _prepared_files(builder.data_dir)}, indent=1)
      except OSError as error:
        _refuse_data_dir(data_dir, error, doing)
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
