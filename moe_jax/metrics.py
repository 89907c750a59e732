"""Where training metrics go and how they are read back: one JSONL file per run, TensorBoard, a progress line.

A record of `<workdir>/metrics.jsonl` is one JSON object per step and kind:
  {"step": 12, "kind": "train", "time": ..., "loss": ..., "cross_entropy": ..., ...,
   "moe": [{"block": 1, "load_balancing_loss": ..., "dropped_token_fraction": ..., "expert_load": [...],
            "max_expert_load": ..., ...}, ...]}
`moe` holds one entry per MoE block (`model.LmAux.blocks`), with the block index as a number: readers never
parse metric names. Names are made in one place, here: `block_stats` (the per-block statistics), `eval_set_stats`
(a score on the fixed evaluation set, with its intervals) and `tensorboard_name` (the TensorBoard tags).
`read_metrics` is the one reader, used by the sweep, the notebooks and the tests.

Damage. A process stopped mid-write (kill -9, a full disk) can leave a last line without its newline. The reader
skips every line that is not a whole JSON record and reports it (`RunMetrics.damaged_lines`, and a warning on
stderr); the writer, opening the file to append, first ends such a line, so the next record starts on its own
line. A file deleted, replaced or turned into a directory while the run writes is noticed at the next record:
recreated with a warning, or a one-line `EnvironmentFailure`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping

import numpy as np

from moe_jax import fileio
from moe_jax.workdir import FileIdentity

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):
    return value.item() if value.size == 1 else value.tolist()
  return value


def block_stats(aux: Any) -> dict[str, Any]:
  """One MoE block's record from its `MoeAux` (fetched to host): every loss and routing metric by its field
  name, plus the max and mean of the per-expert load."""
  stats = {"load_balancing_loss": _scalar(aux.load_balancing_loss), "router_z_loss": _scalar(aux.router_z_loss)}
  stats["sequence_aux_loss"] = _scalar(aux.sequence_aux_loss)
  for f in dataclasses.fields(aux.metrics):
    stats[f.name] = _scalar(np.asarray(getattr(aux.metrics, f.name)))
  load = np.asarray(aux.metrics.expert_load)
  stats["max_expert_load"] = float(load.max())
  stats["mean_expert_load"] = float(load.mean())
  return stats


def eval_set_stats(name: str, result: Any) -> dict[str, Any]:
  """An eval record's fields for a score on a fixed evaluation set (`moe_jax.evalset.EvalResult`) under `name`
  ('subset' or 'full'): the mean cross-entropy (nats per token) and bits per byte, each with its bootstrap
  interval over documents [low, high], and the targets scored. E.g. 'full/cross_entropy'."""
  return {f"{name}/cross_entropy": result.mean, f"{name}/cross_entropy_interval": list(result.interval.interval),
          f"{name}/bits_per_byte": result.bits_per_byte,
          f"{name}/bits_per_byte_interval": list(result.bits_per_byte_interval.interval),
          f"{name}/tokens": int(result.tokens.sum())}


def tensorboard_name(kind: str, key: str, block: int | None = None) -> str:
  return f"{kind}/{key}" if block is None else f"{kind}/moe/block{block}/{key}"


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
    self.path = os.path.join(workdir, METRICS_FILE)
    self._jsonl = self._open()
    try:
      self._tensorboard = _EventFile(os.path.join(workdir, "tensorboard"))
    except OSError as error:
      self._jsonl.close()
      raise fileio.EnvironmentFailure(f"metrics: cannot write {workdir}/tensorboard: {fileio.describe(error)}",
                                      error.errno) from None

  def _open(self):
    """The file in append mode, after ending a torn last line; remembers which file it is (device, inode)."""
    if os.path.isdir(self.path):
      raise fileio.EnvironmentFailure(f"metrics: {self.path} is a directory, not a file; move it away and rerun")
    try:
      handle = open(self.path, "a", buffering=1)
      if fileio.start_fresh_line(handle, self.path):
        print(f"WARNING: the last line of {self.path} was cut short (a stopped writer); it is kept on its own line "
              "and skipped by readers", flush=True)
    except OSError as error:
      raise fileio.EnvironmentFailure(f"metrics: cannot write {self.path}: {fileio.describe(error)}",
                                      error.errno) from None
    self._identity = FileIdentity(self.path, handle)
    return handle

  def _check_file(self) -> None:
    """The path still names the file this writer appends to. Deleted or replaced (by a user, a clean-up script,
    a sync tool): every later record would go to an unlinked inode and be lost with exit 0; so reopen the path
    with a warning (the records before are whatever the path holds now). A directory there: stop in one line."""
    if self._identity.changed():
      self._jsonl.close()
      print(f"WARNING: {self.path} was deleted or replaced while the run wrote it; later records go to the file "
            "now at that path (records written before are not in it)", flush=True)
      self._jsonl = self._open()

  def write(self, step: int, kind: str, values: Mapping[str, Any], moe: Mapping[int, Any] | None = None) -> None:
    """`kind` is 'train' or 'eval'; `values` are scalars or arrays, `moe` maps block index -> MoeAux (host
    arrays). Arrays are written to JSONL, finite scalars also to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": step, "kind": kind, "time": time.time()}
    record.update({k: _scalar(v) for k, v in values.items()})
    blocks = {block: block_stats(aux) for block, aux in sorted((moe or {}).items())}
    if blocks:
      record["moe"] = [{"block": block, **stats} for block, stats in blocks.items()]
    self._check_file()
    try:
      self._jsonl.write(json.dumps(record) + "\n")
    except OSError as error:  # ENOSPC, EIO: one line naming the file, not a traceback per record
      raise fileio.EnvironmentFailure(f"metrics: cannot write {self.path}: {fileio.describe(error)}",
                                      error.errno) from None
    tags = [(tensorboard_name(kind, k), v) for k, v in record.items() if k not in ("step", "kind", "time", "moe")]
    tags += [(tensorboard_name(kind, k, block), v) for block, stats in blocks.items() for k, v in stats.items()]
    try:
      for tag, value in tags:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
          self._tensorboard.add_scalar(tag, value, step)
    except OSError as error:
      raise fileio.EnvironmentFailure(f"metrics: cannot write {self._tensorboard.directory}: "
                                      f"{fileio.describe(error)}", error.errno) from None

  def close(self) -> None:
    """Closes both files. A failure to write their last buffered records is one `EnvironmentFailure`, unless the
    run is already stopping on an error (a full disk reported at a write): that error is the one to report."""
    if not self.enabled:
      return
    failed = None
    for handle, path in ((self._jsonl, self.path), (self._tensorboard, self._tensorboard.directory)):
      try:
        handle.close()
      except OSError as error:
        failed = failed or fileio.EnvironmentFailure(f"metrics: cannot write {path}: {fileio.describe(error)}",
                                                     error.errno)
    if failed is not None and sys.exc_info()[0] is None:  # called from an ExitStack unwinding an error: keep it
      raise failed


class _EventFile:
  """Scalars appended to one TensorBoard event file (tensorboardX's format), written in the caller's thread.

  tensorboardX's SummaryWriter writes from a background thread: a write that fails there (a full disk) ends that
  thread with a traceback, the run goes on without a word, and once its queue of 10 events is full the next
  `add_scalar` blocks for ever. Written here, a failed write raises in the trainer, which reports it in one line.
  """

  def __init__(self, directory: str):
    from tensorboardX import summary  # heavy imports, only where used
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2

    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    self._scalar, self._event = summary.scalar, event_pb2.Event
    self._file = EventsWriter(os.path.join(directory, "events"))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write_event(self._event(wall_time=time.time(), step=step, summary=self._scalar(tag, value)))

  def close(self) -> None:
    self._file.close()


@dataclasses.dataclass
class RunMetrics:
  """A run's metrics.jsonl, by kind and step; a step repeated after a resume keeps its later record."""

  train: dict[int, dict]
  eval: dict[int, dict]
  # 1-based numbers of the lines that are not whole records (cut short by a stopped writer), skipped.
  damaged_lines: tuple[int, ...] = ()

  def series(self, key: str, kind: str = "train") -> dict[int, Any]:
    """step -> value of `key` for every record of `kind` that has it."""
    records = self.train if kind == "train" else self.eval
    return {step: r[key] for step, r in sorted(records.items()) if key in r}

  def moe_blocks(self) -> list[int]:
    """Indices of the MoE blocks that logged routing statistics."""
    first = next(iter(self.train.values()), {})
    return [entry["block"] for entry in first.get("moe", [])]

  def block_series(self, block: int, stat: str) -> dict[int, Any]:
    """step -> one MoE block's statistic over training (empty if the run never logged it)."""
    out = {}
    for step, record in sorted(self.train.items()):
      for entry in record.get("moe", []):
        if entry["block"] == block and stat in entry:
          out[step] = entry[stat]
    return out


def read_metrics(workdir: str, *, warn: bool = True) -> RunMetrics:
  """The one reader of `<workdir>/metrics.jsonl` (either record format, see `_per_block`).

  A line that is not a whole JSON record (the torn last record of a process stopped mid-write, or one that an
  older writer appended a record to) is skipped, listed in `damaged_lines` and, with `warn`, reported on stderr
  in one line. FileNotFoundError if the file is missing.
  """
  by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
  damaged = []
  path = os.path.join(workdir, METRICS_FILE)
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = _per_block(json.loads(line))
        by_kind[record["kind"]][record["step"]] = record
      except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        damaged.append(number)
  if damaged and warn:
    print(f"WARNING: {path}: skipped {len(damaged)} damaged line(s) {damaged[:5]} (records cut short by a stopped "
          "writer)", file=sys.stderr, flush=True)
  return RunMetrics(train=by_kind["train"], eval=by_kind["eval"], damaged_lines=tuple(damaged))


_LEGACY_BLOCK_KEY = re.compile(r"layer(\d+)/(.+)")


def _per_block(record: dict) -> dict:
  """A record in today's form. Code before the per-block form (up to commit febd857, the model code pinned by
  the Switch-vs-dense study, which keeps writing it) logged block b's statistics as flat "layer{b}/{stat}" keys;
  they become `moe` entries here, so a pinned run reads like any other."""
  blocks: dict[int, dict] = {}
  plain = {}
  for key, value in record.items():
    match = _LEGACY_BLOCK_KEY.fullmatch(key)
    if match:
      blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
    else:
      plain[key] = value
  if blocks:
    plain["moe"] = [{"block": block, **stats} for block, stats in sorted(blocks.items())]
  return plain


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
