"""A run's directory: what it holds, checked before anything is written, and the lock that makes it one run's.

A workdir holds the entries of `ENTRIES`, each a file or a directory. `check_workdir` refuses, in one line naming
the path, everything that would otherwise fail later with a traceback (or, for an empty --workdir, train into
the current directory): an empty path, a workdir or entry of the wrong type, a symlink loop, a dangling symlink,
an entry that cannot be written. It writes nothing, so a run that refuses leaves the workdir as it was.

`DirectoryLock` is the kernel lock that keeps two processes out of one directory (a run's workdir, a sweep's
runs); it is released however its holder ends, so a killed process never leaves a stale lock. `WorkdirLock` is
the trainer's: held while the run checks whether it may start, and undone if it may not (a run that refuses
leaves its workdir as it was), then kept; `check()` notices it deleted or replaced mid-run.

`KeptFile` is a file the run writes whole once and relies on until it ends (config.json): deleted, replaced or
edited mid-run it is written again with a warning; turned into a directory it stops the run in one line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time

from moe_jax import fileio

FILE, DIRECTORY = "file", "directory"

# Every entry a run's workdir may hold, and its type. moe_jax.train writes all but `result.json`, which is the
# sweep's (moe_jax.sweep), and `tokenizer`, an imported run's (moe_jax.interop.transfer.TOKENIZER_DIR), which it
# only reads. The checkpointer (moe_jax.checkpoint) moves steps into `checkpoints/corrupt` and `superseded`, and
# each saved step is a directory `checkpoints/<step>` (`CHECKPOINT_STEPS`).
ENTRIES: dict[str, str] = {
    "config.json": FILE,
    "lock": FILE,
    "metrics.jsonl": FILE,
    "resume_log.jsonl": FILE,
    "checkpoints": DIRECTORY,
    "checkpoints/corrupt": DIRECTORY,
    "checkpoints/superseded": DIRECTORY,
    "tensorboard": DIRECTORY,
    "result.json": FILE,
    "eval_set.json": FILE,
    "tokenizer": DIRECTORY,
}
READ_ONLY_ENTRIES = ("tokenizer",)  # read by the run, never written: it may be read-only
CHECKPOINT_STEPS = "checkpoints"  # its entries named by a number are saved steps: directories


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
  entries = dict(ENTRIES if entries is None else entries)
  if CHECKPOINT_STEPS in entries and _kind(os.path.join(workdir, CHECKPOINT_STEPS)) == DIRECTORY:
    steps = os.path.join(workdir, CHECKPOINT_STEPS)
    entries.update({os.path.join(CHECKPOINT_STEPS, name): DIRECTORY for name in sorted(os.listdir(steps))
                    if name.isdigit()})
  for name, wanted in entries.items():
    path = os.path.join(workdir, name)
    kind = _kind(path)
    if kind is None:
      continue
    if kind != wanted:
      raise ValueError(f"workdir: {path} is {_describe(kind)}, not a {wanted}; move it away or use another "
                       "--workdir")
    if name not in READ_ONLY_ENTRIES and not os.access(path, os.W_OK | (os.X_OK if wanted == DIRECTORY else 0)):
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

  A holder may remove the file (`WorkdirLock` does when its run refuses): a process that opened the old file just
  before and then got its lock holds a lock on a file no longer at `path`, so the lock is taken again until the
  file locked is the file at `path`.
  """

  def __init__(self, path: str, *, what: str, hint: str):
    self.path, self.what, self.hint = path, what, hint
    self._file = None
    self._identity: FileIdentity | None = None

  def __enter__(self):
    self._acquire()
    return self

  def _acquire(self) -> None:
    while True:
      handle = open(self.path, "a+")
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{self.what} is in use by {holder}; {self.hint}") from None
      identity = FileIdentity(self.path, handle)
      if not identity.changed():
        break
      handle.close()  # removed (or replaced) between our open and our lock: lock the file at the path now
    self._file, self._identity = handle, identity
    self._write_holder()

  def _write_holder(self) -> None:
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    self._file.flush()

  def __exit__(self, *exc):
    self._release()

  def _release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class WorkdirLock(DirectoryLock):
  """`<workdir>/lock`: one training run per workdir (the lock of `moe_jax.train`).

  The lock is taken before the run checks whether it may start (two starts at once must not both pass), which
  creates the workdir if needed and writes the holder into `lock`. Until `commit()` (every check passed, the run
  starts writing), leaving undoes both: `lock` gets back its previous bytes (or is removed if it was not there)
  and a workdir the lock created is removed, so a run that refuses leaves the workdir byte for byte as it was.
  """

  def __init__(self, workdir: str):
    super().__init__(os.path.join(workdir, "lock"), what=f"workdir {workdir}",
                     hint="wait for it to end or pass another --workdir")
    self.workdir = workdir
    self._committed = False
    self._created_workdir = False
    self._previous: bytes | None = None  # the bytes `lock` held before this run (None: it was not there)

  def __enter__(self):
    if not os.path.exists(self.workdir):
      os.makedirs(self.workdir)
      self._created_workdir = True
    try:
      with open(self.path, "rb") as f:
        self._previous = f.read()
    except FileNotFoundError:
      self._previous = None
    try:
      self._acquire()
    except BaseException:
      self._remove_created_workdir()
      raise
    return self

  def commit(self) -> None:
    """Every check passed and the run starts writing: from now on `lock` keeps naming this run."""
    self._committed = True

  def check(self) -> None:
    """Mid-run: `lock` is still the file this run locked. Deleted or replaced (a clean-up script, a user), a second
    run in this workdir would no longer be refused: lock the file now at the path again, with a warning.
    `fileio.EnvironmentFailure` (one line, exit 1) when that cannot be done: something other than a file there, or
    another process took the new file first."""
    if self._file is None or not self._identity.changed():
      return
    kind = _kind(self.path)
    if kind not in (None, FILE):
      raise fileio.EnvironmentFailure(f"workdir: {self.path} became {_describe(kind)} while the run held the lock; "
                                      "stopping, since a second run in this workdir could no longer be refused")
    self._release()
    try:
      self._acquire()
    except ValueError as error:
      raise fileio.EnvironmentFailure(f"workdir: {self.path} was deleted or replaced while the run held it, and "
                                      f"then taken by another process ({error}); stopping so that two runs do not "
                                      "write one workdir") from None
    print(f"WARNING: {self.path} was deleted or replaced while the run held it; locked again (without it a second "
          "run in this workdir would not be refused)", flush=True)

  def __exit__(self, *exc):
    if self._file is not None and not self._committed:
      if self._previous is None:
        os.remove(self.path)  # under the lock: a process that opened it meanwhile locks again (`_acquire`)
      else:
        os.ftruncate(self._file.fileno(), 0)  # opened to append: the bytes go to the start of the empty file
        os.write(self._file.fileno(), self._previous)
    self._release()
    if not self._committed:
      self._remove_created_workdir()

  def _remove_created_workdir(self) -> None:
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)
      except OSError:  # something else was put there meanwhile: not ours to remove
        pass


class KeptFile:
  """A file a run writes whole (atomically) and relies on until it ends, e.g. config.json, which every tool reads
  to open the run. `check()` compares the path with what was written (device, inode, size, modification time):
  deleted, replaced or edited, it is written again with a warning; anything but a file there stops the run in one
  line (`fileio.EnvironmentFailure`, exit 1)."""

  def __init__(self, path: str, text: str):
    self.path, self.text = path, text
    self._stamp = None
    self._write()

  def _status(self) -> tuple[int, int, int, int] | None:
    try:
      status = os.stat(self.path)
    except OSError:
      return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns

  def _write(self) -> None:
    fileio.write_text(self.path, self.text)
    self._stamp = self._status()

  def check(self) -> None:
    kind = _kind(self.path)
    if kind == FILE and self._status() == self._stamp:
      return
    if kind not in (None, FILE):
      raise fileio.EnvironmentFailure(f"workdir: {self.path} became {_describe(kind)} during the run; move it away "
                                      "and rerun (the run resumes from its last checkpoint)")
    print(f"WARNING: {self.path} was {'deleted' if kind is None else 'replaced or edited'} during the run; written "
          "again as the run recorded it", flush=True)
    self._write()
