"""Writing result files so that a crash, a kill or a full disk never leaves one half-written.

Every JSON, CSV or markdown result (a sweep's summaries and curves, a run's result.json, a numerics check,
figures) is written by `atomic_write`: into a temporary file in the destination's directory, flushed and fsynced,
then renamed over the destination with `os.replace`. A rename within one file system is atomic, so a reader sees
the old file or the new one, never a prefix; a write that fails (ENOSPC, EIO, a kill) leaves the old file as it
was and removes its temporary file.

Append-only logs (metrics.jsonl) cannot be renamed into place; `start_fresh_line` makes appending to one whose
last line was cut short safe instead (see `moe_jax.metrics`).

A failure of the machine is one line (`EnvironmentFailure`, exit status 1). `quiet_library_tracebacks` keeps it
one: the background threads of orbax log the same failure with a traceback each, which would bury the line.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Mapping

# errnos that mean the machine, not the input, failed: the run or sweep stops with exit status 1. (A read-only or
# unwritable path is the input: ValueError naming it, exit status 2.)
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


class EnvironmentFailure(OSError):
  """The machine failed under a run or a sweep (disk full, I/O error, a file it relies on gone): reported as one
  line with exit status 1. `str()` is that line."""

  def __init__(self, message: str, errno_: int | None = None):
    super().__init__(errno_, message)
    self.message = message

  def __str__(self) -> str:
    return self.message


def describe(error: OSError) -> str:
  """'No space left on device' rather than '[Errno 28] No space left on device: <path>'."""
  return error.strerror or str(error)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[io.IOBase]:
  """`with atomic_write(path) as f: ...` writes `path` whole or not at all.

  The temporary file is `.<name>.<random>.tmp` next to `path` (same file system, so the rename is atomic; a dot
  name, so globs of results skip a leftover from a kill -9). Raises `EnvironmentFailure` naming `path` when the
  disk is full or fails, and ValueError naming it when the path cannot be written (a directory there, a missing
  or read-only folder): one line either way.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r} must be 'w' or 'wb'")
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  temporary = None
  try:
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException as error:
    if temporary is not None:
      with contextlib.suppress(OSError):
        os.remove(temporary)
    if not isinstance(error, OSError) or isinstance(error, EnvironmentFailure):
      raise
    if error.errno in ENVIRONMENT_ERRNOS:
      raise EnvironmentFailure(f"cannot write {path}: {describe(error)}; the previous version (if any) is "
                               "unchanged", error.errno) from error
    raise ValueError(f"cannot write {path}: {describe(error)}") from error


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs) -> None:
  """`json.dump(value)` into `path`, atomically."""
  with atomic_write(path) as f:
    json.dump(value, f, **dump_kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_write(path) as f:
    f.write(text)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
  """A header and one line per row (`csv.DictWriter`), atomically."""
  with atomic_write(path, newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`. FileNotFoundError if absent; ValueError naming the path if it is not whole JSON
  (e.g. written in place by older code and cut short), so callers can tell "missing" from "damaged"."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    raise
  except OSError as error:  # a directory there, a symlink loop, no permission: one line naming the path
    raise ValueError(f"{path} cannot be read ({describe(error)})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({len(text)} bytes, {error.msg} at line {error.lineno}): "
                     "cut short by a crash or a full disk?") from None


def start_fresh_line(handle: io.TextIOBase, path: str | os.PathLike) -> bool:
  """Before appending records to `path` (open in append mode as `handle`): if its last byte is not a newline
  (the previous writer was stopped mid-record), write one, so the torn record stays alone on its line and the
  next record is whole. True if a newline was added."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return False
  handle.write("\n")
  handle.flush()
  return True


class _WithoutTraceback(logging.Filter):
  """Log records of `packages` keep their message (which names the error) but lose the attached traceback."""

  def __init__(self, packages: tuple[str, ...]):
    super().__init__()
    self._markers = tuple(f"{os.sep}{package}{os.sep}" for package in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and any(marker in record.pathname for marker in self._markers):
      record.exc_info, record.exc_text = None, None
    return True


def quiet_library_tracebacks(packages: tuple[str, ...] = ("orbax",)) -> None:
  """For a command line: errors that `packages` log from their threads (orbax's asynchronous saves, on a full
  disk) print as their one log line, without a traceback; the caller reports the failure itself. Also silences
  the "coroutine ... was never awaited" warnings of the save stages orbax abandons, printed at exit."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.get_absl_handler().addFilter(_WithoutTraceback(packages))
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
