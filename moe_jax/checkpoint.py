"""Checkpoints that never lose a run: orbax CheckpointManager with verified restore and fallback.

Layout: `<workdir>/checkpoints/<step>/{state, meta}`; `state` is the array tree (model params + optimizer),
`meta` a JSON dict (data-iterator position, config, ...). Saves are asynchronous; orbax writes into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous steps untouched.

Restore tries the newest step first. A step that fails to restore (truncated or corrupted files) is reported,
moved aside to `<workdir>/checkpoints/corrupt/<step>` (kept for inspection, never deleted), and the previous
step is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moe_jax import parallel

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"


class CheckpointError(RuntimeError):
  """A save failed; the checkpoints written before it are intact."""


class Checkpointer:
  """Saves and restores (state tree, JSON metadata) pairs by step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
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
      raise CheckpointError(f"saving checkpoint at step {step} to {self.directory} failed: {error}") from error

  def wait(self) -> None:
    """Block until pending saves are on disk; surfaces an asynchronous save's error."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      raise CheckpointError(f"an asynchronous checkpoint save to {self.directory} failed: {error}") from error

  def restore_latest(
      self, abstract_state: Any, check_meta: Callable[[dict], None] = lambda meta: None
  ) -> tuple[int, Any, dict] | None:
    """The newest restorable (step, state, meta), or None when there is no checkpoint at all.

    `abstract_state` gives shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves). `check_meta` sees each
    step's metadata before its arrays are read: a ValueError it raises (say, the checkpoint belongs to another
    config) propagates, since that is a user error, not a corrupt file.
    """
    for step in reversed(self.all_steps()):
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
      moved = self._quarantine(step)
      reason = f"{type(error).__name__}: {error}" if error else "another process could not read it"
      log.error("checkpoint at step %d cannot be restored (%s); moved it to %s", step, reason, moved)
      print(f"WARNING: checkpoint step {step} is corrupt ({reason[:200]}); kept at {moved}; "
            "falling back to the previous checkpoint", flush=True)
    return None

  def _quarantine(self, step: int) -> str:
    """Move a bad step out of orbax's view so that a new save of that step can succeed; never delete it."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine-{step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()
