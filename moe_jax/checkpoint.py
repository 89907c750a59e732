"""Checkpoints that never lose a run: orbax CheckpointManager with verified restore and fallback.

Layout: `<workdir>/checkpoints/<step>/{state, meta}`; `state` is the array tree (model params + optimizer),
`meta` a JSON dict (data-iterator position, config, ...). Saves are asynchronous; orbax writes into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous steps untouched.

Restore tries the newest step first. A step that fails to restore (truncated or corrupted files) is reported,
moved aside to `<workdir>/checkpoints/corrupt/<step>` (kept for inspection, never deleted), and the previous
step is used. Restoring an earlier step on purpose moves the newer ones to `<workdir>/checkpoints/superseded/`.
A read-only Checkpointer (a tool reading another run's checkpoints) skips such a step without moving it.

A failed asynchronous save (disk full, directory gone) surfaces as `CheckpointError` at the next `check`, `save`
or `wait`, and never leaves the process hanging at exit (see `_release_stalled_save_threads`). That needs one
private orbax name, since orbax has no public way to find or release its save threads; it is pinned to the
orbax-checkpoint versions it was tested with (`ORBAX_VERSIONS_TESTED`), checked when this module is imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moe_jax import parallel

# orbax-checkpoint versions whose private `_src.futures.future` (`_SignalingThread`, its `_receive_signals` and
# `_operation_id`, `set_signals`) `_release_stalled_save_threads` was tested with: tests/test_faults.py's
# failed-save tests. A new version joins the list once they pass with it (and setup.cfg's pin follows).
ORBAX_VERSIONS_TESTED = ("0.12.8",)


def check_orbax_version(version: str) -> None:
  """Refuse an orbax-checkpoint that the private API below was not tested with, before anything is saved:
  an untested version could hang a failed run at exit or fail in the middle of the error handling."""
  if version not in ORBAX_VERSIONS_TESTED:
    raise ImportError(
        f"moe_jax.checkpoint was tested with orbax-checkpoint {', '.join(ORBAX_VERSIONS_TESTED)}, not the installed "
        f"{version}: it releases orbax's stalled save threads through orbax's private `_src.futures` API. Install "
        f"the locked versions (`make setup`, i.e. pip install -c constraints.txt -e '.[test]'), or run "
        f"tests/test_faults.py with {version} and add it to checkpoint.ORBAX_VERSIONS_TESTED")


check_orbax_version(ocp.__version__)
# Imported only after the check: an untested orbax may not have it, and the check's message says why it is needed.
from orbax.checkpoint._src.futures import future as ocp_future  # noqa: E402  pylint: disable=g-import-not-at-top

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"
SUPERSEDED_DIR = "superseded"


class CheckpointError(RuntimeError):
  """A save failed; the checkpoints written before it are intact."""


class Checkpointer:
  """Saves and restores (state tree, JSON metadata) pairs by step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True, read_only: bool = False):
    """read_only: a reader of a run's checkpoints (not its trainer): nothing is created, saved or moved; a step
    that cannot be restored is skipped and left where it is."""
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
        ),
        item_names=("state", "meta"),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Start saving `state` at `step` (returns once arrays are copied to host; files are written behind).

    Raises CheckpointError when the save cannot start or an earlier asynchronous save failed (e.g. disk
    full): the previous checkpoints stay intact, and the caller decides whether to stop.
    """
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=True,
      )
    except Exception as error:  # orbax raises OSError, ValueError, ... depending on the backend
      _release_stalled_save_threads(self._manager)
      raise CheckpointError(f"saving checkpoint at step {step} to {self.directory} failed: {error}") from error

  def check(self) -> None:
    """Raise CheckpointError now if an asynchronous save has failed; never blocks (call it often)."""
    self._surface_async_error(self._manager.check_for_errors)

  def wait(self) -> None:
    """Block until pending saves are on disk; surfaces an asynchronous save's error."""
    self._surface_async_error(self._manager.wait_until_finished)

  def _surface_async_error(self, call) -> None:
    try:
      call()
    except Exception as error:  # orbax re-raises the save thread's error, whatever its type
      _release_stalled_save_threads(self._manager)
      raise CheckpointError(f"an asynchronous checkpoint save to {self.directory} failed: {error}") from error

  def read_meta(self, step: int) -> dict | None:
    """The JSON metadata of `step` (no arrays are read), or None when it cannot be read."""
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception:  # truncated files surface as OSError, ValueError, tensorstore errors, ...
      return None

  def restore_latest(
      self, abstract_state: Any, check_meta: Callable[[dict], None] = lambda meta: None,
      max_step: int | None = None,
  ) -> tuple[int, Any, dict] | None:
    """The newest restorable (step, state, meta) at or before `max_step` (None: any), or None when there is none.

    `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves). `check_meta` sees each
    step's metadata before its arrays are read: a ValueError it raises (say, the checkpoint belongs to another
    config) propagates, since that is a user error, not a corrupt file.
    """
    for step in reversed(self.all_steps()):
      if max_step is not None and step > max_step:
        continue
      state, meta, error = None, None, None
      try:
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
      except Exception as e:  # truncated files surface as OSError, ValueError, tensorstore errors, ...
        error = e
      if meta is not None:
        check_meta(meta)
        try:
          state = self._manager.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
          )["state"]
        except Exception as e:
          error = e
      # One process's unreadable shard makes the step unusable for all.
      if parallel.all_processes(error is None):
        return step, state, meta
      reason = f"{type(error).__name__}: {error}" if error else "another process could not read it"
      if self.read_only:
        print(f"WARNING: checkpoint step {step} in {self.directory} cannot be restored ({reason[:200]}); left in "
              "place; trying the previous checkpoint", flush=True)
        continue
      moved = self.set_aside(step, CORRUPT_DIR)
      log.error("checkpoint at step %d cannot be restored (%s); moved it to %s", step, reason, moved)
      print(f"WARNING: checkpoint step {step} is corrupt ({reason[:200]}); kept at {moved}; "
            "falling back to the previous checkpoint", flush=True)
    return None

  def set_aside(self, step: int, folder: str) -> str:
    """Move a step out of orbax's view (into `folder`) so that a new save of that step can succeed; never
    delete it. Returns where it went."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, folder, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set-aside-{step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()


def _release_stalled_save_threads(manager: ocp.CheckpointManager) -> None:
  """Let orbax's save threads that wait for a failed save's signals finish, so the process can exit.

  orbax 0.12 runs each stage of an async save in a non-daemon thread that first waits for the previous stage's
  signal; when a stage fails (disk full, a file where the step directory should go) its successors wait for the
  whole coordination timeout, and the interpreter, which joins non-daemon threads at exit, hangs with them.
  Cancelling them and raising the signals they wait for makes them return at once without writing anything.
  Saves still in progress are let finish first, so that a good checkpoint started before the failure is kept.
  """
  try:
    manager.wait_until_finished()
  except Exception:  # pylint: disable=broad-except  # the failure being handled, reported by the caller
    pass
  for thread in threading.enumerate():
    if isinstance(thread, ocp_future._SignalingThread) and thread.is_alive():  # pylint: disable=protected-access
      thread.cancel()
      ocp_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)  # pylint: disable=protected-access
