"""Hugging Face checkpoint files: `config.json` plus safetensors shards, read and written one tensor at a time.

Layout (what `transformers`' `save_pretrained` writes and `from_pretrained` reads): either one `model.safetensors`,
or shards `model-00001-of-0000N.safetensors` with `model.safetensors.index.json` = {"metadata": {"total_size":
bytes}, "weight_map": {tensor name: shard file}}. Tensors are read with `safetensors.safe_open(path,
framework="numpy")`, which maps the file and copies out only the tensor asked for. The shard is opened for that
one read and closed after it: a mapping kept open would keep every page read so far resident in the process
(file-backed, but counted in its RSS), a second copy of the checkpoint beside the model. bfloat16 tensors come
back as `ml_dtypes.bfloat16` arrays.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax import fileio

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' loader checks the format recorded in each file's metadata.
FILE_METADATA = {"format": "pt"}
DEFAULT_SHARD_BYTES = 5 * 2**30  # save_pretrained's default max_shard_size ("5GB")


def read_config(directory: str) -> dict:
  """The model's config.json; ValueError naming the path when there is none or it is not JSON."""
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist: {directory} is not a Hugging Face model directory")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not JSON: {error}") from None


class CheckpointReader:
  """The tensors of a Hugging Face model directory by name, each read on demand.

    reader = CheckpointReader(path)
    for name in reader.names: array = reader.read(name)   # numpy, the file's dtype

  Opening reads the headers only (names, shapes, dtypes); every `read` opens its shard, copies the tensor out and
  closes the shard again (see the module docstring).
  """

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' {{tensor: shard file}}")
    elif os.path.isfile(os.path.join(directory, SINGLE)):
      weight_map = None
    else:
      raise ValueError(f"{directory} holds neither {SINGLE} nor {INDEX}")
    self._where: dict[str, str] = {}  # tensor -> shard path
    self._info: dict[str, tuple[tuple[int, ...], str]] = {}  # tensor -> (shape, safetensors dtype)
    for shard in sorted(set(weight_map.values())) if weight_map else [SINGLE]:
      path = os.path.join(directory, shard)
      if not os.path.isfile(path):
        raise ValueError(f"{path} is missing (named in {INDEX})")
      with safe_open(path, framework="numpy") as handle:
        for name in handle.keys():
          if weight_map is not None and weight_map.get(name) != shard:
            raise ValueError(f"{path} holds {name!r}, which {INDEX} places in {weight_map.get(name)!r}")
          piece = handle.get_slice(name)
          self._where[name], self._info[name] = path, (tuple(piece.get_shape()), piece.get_dtype())
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self._where))
      if absent:
        raise ValueError(f"{INDEX} names tensors that no shard holds: {absent[:5]}")

  @property
  def names(self) -> frozenset[str]:
    return frozenset(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._info[name][0]

  def nbytes(self) -> int:
    """Bytes of all tensors (the checkpoint's size without headers)."""
    return sum(int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE.get(dtype, 4) for shape, dtype in self._info.values())

  def read(self, name: str) -> np.ndarray:
    with safe_open(self._where[name], framework="numpy") as handle:
      return handle.get_tensor(name)


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def shard_name(index: int, count: int) -> str:
  return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_checkpoint(directory: str, tensors: Iterable[tuple[str, np.ndarray]], *,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Write `tensors` (name, array), in order, as save_pretrained does: one `model.safetensors` when they fit in
  `max_shard_bytes`, else shards of at most that size (a larger tensor gets a shard of its own) and the index.
  Holds at most one shard's tensors at a time. Returns the files written."""
  os.makedirs(directory, exist_ok=True)
  pending: dict[str, np.ndarray] = {}
  size, written, weight_map, total = 0, [], {}, 0

  def flush():
    nonlocal pending, size
    if pending:
      path = os.path.join(directory, f".shard-{len(written)}.tmp")
      save_file(pending, path, metadata=FILE_METADATA)
      written.append(path)
      for name in pending:
        weight_map[name] = len(written) - 1
      pending, size = {}, 0

  for name, array in tensors:
    if name in weight_map or name in pending:
      raise ValueError(f"tensor {name!r} written twice")
    array = np.ascontiguousarray(array)
    if pending and size + array.nbytes > max_shard_bytes:
      flush()
    pending[name], size, total = array, size + array.nbytes, total + array.nbytes
  flush()
  for stale in (SINGLE, INDEX):
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  if len(written) == 1:
    os.replace(written[0], os.path.join(directory, SINGLE))
    return [SINGLE]
  names = [shard_name(i, len(written)) for i in range(len(written))]
  for path, name in zip(written, names):
    os.replace(path, os.path.join(directory, name))
  index = {"metadata": {"total_size": total}, "weight_map": {t: names[i] for t, i in sorted(weight_map.items())}}
  fileio.write_json(os.path.join(directory, INDEX), index, indent=2)
  return names + [INDEX]
