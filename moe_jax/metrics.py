"""Where training metrics go and how they are read back: one JSONL file per run, TensorBoard, a progress line.

A record of `<workdir>/metrics.jsonl` is one JSON object per step and kind:
  {"step": 12, "kind": "train", "time": ..., "loss": ..., "cross_entropy": ..., ...,
   "moe": [{"block": 1, "load_balancing_loss": ..., "dropped_token_fraction": ..., "expert_load": [...],
            "max_expert_load": ..., ...}, ...]}
`moe` holds one entry per MoE block (`model.LmAux.blocks`), with the block index as a number: readers never
parse metric names. Names are made in one place, here: `block_stats` (the per-block statistics) and
`tensorboard_name` (the TensorBoard tags). `read_metrics` is the one reader, used by the sweep, the notebooks
and the tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Mapping

import numpy as np

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
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
    from tensorboardX import SummaryWriter  # heavy import, only where used

    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
    self._jsonl.write(json.dumps(record) + "\n")
    tags = [(tensorboard_name(kind, k), v) for k, v in record.items() if k not in ("step", "kind", "time", "moe")]
    tags += [(tensorboard_name(kind, k, block), v) for block, stats in blocks.items() for k, v in stats.items()]
    for tag, value in tags:
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._tensorboard.add_scalar(tag, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


@dataclasses.dataclass
class RunMetrics:
  """A run's metrics.jsonl, by kind and step; a step repeated after a resume keeps its later record."""

  train: dict[int, dict]
  eval: dict[int, dict]

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


def read_metrics(workdir: str) -> RunMetrics:
  """The one reader of `<workdir>/metrics.jsonl` (either record format, see `_per_block`)."""
  by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      record = _per_block(json.loads(line))
      by_kind[record["kind"]][record["step"]] = record
  return RunMetrics(train=by_kind["train"], eval=by_kind["eval"])


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
