"""Where training metrics go: a JSONL file per run, TensorBoard event files, and a progress line."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np


def _scalar(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):
    return value.item() if value.size == 1 else value.tolist()
  return value


class MetricWriter:
  """Appends one JSON object per record to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

  Only process 0 writes (pass `enabled=False` elsewhere). A resumed run appends, so the file tells the whole
  history; records of steps after the checkpoint that a resumed run repeats appear twice, the later wins.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    from tensorboardX import SummaryWriter  # heavy import, only where used

    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    """`kind` is 'train' or 'eval'; arrays are written to JSONL, scalars also to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": step, "kind": kind, "time": time.time()}
    record.update({k: _scalar(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("step", "kind", "time") and isinstance(value, (int, float)) and math.isfinite(value):
        self._tensorboard.add_scalar(f"{kind}/{key}", value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


class Progress:
  """A one-line progress report: step, loss, steps/s (over the last interval) and ETA."""

  def __init__(self, total_steps: int, first_step: int):
    self.total = total_steps
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def line(self, step: int, values: Mapping[str, float]) -> str:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
    return f"step {step:>6}/{self.total}  {shown}  {rate:.2f} steps/s  ETA {_duration(eta)}"


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
