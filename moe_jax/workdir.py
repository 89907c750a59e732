"""A run's directory: what it holds, checked before anything is written, and the lock that makes it one run's.

A workdir holds the entries of `ENTRIES`, each a file or a directory. `check_workdir` refuses, in one line naming
the path, everything that would otherwise fail later with a traceback (or, for an empty --workdir, train into
the current directory): an empty path, a workdir or entry of the wrong type, a symlink loop, a dangling symlink,
an entry that cannot be written. It writes nothing, so a run that refuses leaves the workdir as it was.

`DirectoryLock` is the kernel lock that keeps two processes out of one directory (a run's workdir, a sweep's
runs); it is released however its holder ends, so a killed process never leaves a stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time

FILE, DIRECTORY = "file", "directory"

# Every entry a run's workdir may hold, and its type. moe_jax.train writes the first six; `result.json` is the
# sweep's (moe_jax.sweep).
ENTRIES: dict[str, str] = {
    "config.json": FILE,
    "lock": FILE,
    "metrics.jsonl": FILE,
    "resume_log.jsonl": FILE,
    "checkpoints": DIRECTORY,
    "tensorboard": DIRECTORY,
    "result.json": FILE,
}


def check_path_given(workdir: str | None, flag: str = "--workdir") -> str:
  """`workdir` as an absolute path; ValueError for None or an empty or blank value (an unset shell variable,
  `--workdir=$RUN` with RUN unset, would otherwise mean the current directory)."""
  if workdir is None or not str(workdir).strip():
    raise ValueError(f"{flag}={workdir!r} is empty: name the run's directory (an unset shell variable?)")
  return os.path.abspath(os.path.expanduser(str(workdir)))


def _kind(path: str) -> str | None:
  """FILE, DIRECTORY, None (absent), or the reason the path cannot be used, following symlinks."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    if os.path.islink(path):
      return f"a dangling symlink (to {os.readlink(path)!r})"
    return None
  except OSError as error:
    if error.errno == errno.ELOOP:
      return "a symlink loop"
    return f"unreadable ({error.strerror})"
  if stat.S_ISDIR(mode):
    return DIRECTORY
  if stat.S_ISREG(mode):
    return FILE
  return "neither a file nor a directory"


def check_workdir(workdir: str, entries: dict[str, str] | None = None) -> str:
  """The absolute workdir, after checking it and each of `entries` (default `ENTRIES`) present in it: the right
  type and writable. Raises ValueError naming the first bad path; writes nothing (a missing workdir is fine: the
  run creates it, and an unwritable parent is named here)."""
  workdir = check_path_given(workdir)
  kind = _kind(workdir)
  if kind is None:
    parent = os.path.dirname(workdir)
    while _kind(parent) is None and parent != os.path.dirname(parent):
      parent = os.path.dirname(parent)
    if _kind(parent) != DIRECTORY:
      raise ValueError(f"workdir: {workdir} cannot be created: {parent} is {_describe(_kind(parent))}")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f"workdir: {workdir} cannot be created: {parent} is not writable")
    return workdir
  if kind != DIRECTORY:
    raise ValueError(f"workdir: {workdir} is {_describe(kind)}, not a directory")
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"workdir: {workdir} is not writable")
  for name, wanted in (ENTRIES if entries is None else entries).items():
    path = os.path.join(workdir, name)
    kind = _kind(path)
    if kind is None:
      continue
    if kind != wanted:
      raise ValueError(f"workdir: {path} is {_describe(kind)}, not a {wanted}; move it away or use another "
                       "--workdir")
    if not os.access(path, os.W_OK | (os.X_OK if wanted == DIRECTORY else 0)):
      raise ValueError(f"workdir: {path} is not writable")
  return workdir


def _describe(kind: str | None) -> str:
  return {FILE: "a file", DIRECTORY: "a directory", None: "missing"}.get(kind, kind)


class FileIdentity:
  """Which file a path named when a writer opened it, to notice it deleted or replaced under the writer.

  `changed()` is True once the path no longer names that same file (device and inode): deleted, renamed over,
  or replaced by a directory. A writer appending to an unlinked file would lose every later record silently.
  """

  def __init__(self, path: str, handle):
    self.path = path
    status = os.fstat(handle.fileno())
    self._identity = (status.st_dev, status.st_ino)

  def changed(self) -> bool:
    try:
      status = os.stat(self.path)
    except FileNotFoundError:
      return True
    return (status.st_dev, status.st_ino) != self._identity


class DirectoryLock:
  """An exclusive lock on the file `path` naming its holder (pid, host, since when). It is a kernel file lock
  (flock), released when the process ends however it ends, so a killed holder never leaves it stuck.

  `what` names the locked thing in the refusal and `hint` says what to do, e.g. ("workdir /x", "wait for it to
  end or pass another --workdir"). The refusal is a ValueError: a second process on the same directory is a
  mistake in the command, not a failure of the machine.
  """

  def __init__(self, path: str, *, what: str, hint: str):
    self.path, self.what, self.hint = path, what, hint
    self._file = None

  def __enter__(self):
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise ValueError(f"{self.what} is in use by {holder}; {self.hint}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class WorkdirLock(DirectoryLock):
  """`<workdir>/lock`: one training run per workdir (the lock of `moe_jax.train`)."""

  def __init__(self, workdir: str):
    super().__init__(os.path.join(workdir, "lock"), what=f"workdir {workdir}",
                     hint="wait for it to end or pass another --workdir")
