"""Hugging Face checkpoint files: `config.json` plus safetensors shards, read and written one tensor at a time.

Layout (what `transformers`' `save_pretrained` writes and `from_pretrained` reads): either one `model.safetensors`,
or shards `model-00001-of-0000N.safetensors` with `model.safetensors.index.json` = {"metadata": {"total_size":
bytes}, "weight_map": {tensor name: shard file}}. Shards are written with `safetensors.numpy.save_file`; they are
read here with plain file reads from the offsets in each file's header, straight into their destination
(`CheckpointReader.read_into`). Not with `safetensors.safe_open`, which maps the file and copies the tensor out of
the mapping: measured on a 494 MB float32 checkpoint (benchmarks/interop_import.py), reading a 65.5 MB tensor that
way raised the peak resident set by 131 MB: the mapped pages (counted in the process's RSS while the file is open)
beside the copy.
bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays, as safetensors' numpy reader returns them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from moe_jax import fileio

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' loader checks the format recorded in each file's metadata.
FILE_METADATA = {"format": "pt"}
DEFAULT_SHARD_BYTES = 5 * 2**30  # save_pretrained's default max_shard_size ("5GB")
# safetensors dtype -> numpy (bfloat16: ml_dtypes', as safetensors' numpy reader returns it).
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "U64": np.uint64, "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8,
          "U8": np.uint8, "BOOL": np.bool_}
READ_BYTES = 16 * 2**20  # one read's buffer: what a transposing or casting read holds beside the parameter


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
    reader.read_into(name, view)                         # straight into an array of the tensor's size

  Opening reads and checks the headers only (names, shapes, dtypes, where each tensor's bytes lie); a header that is
  not safetensors, a tensor whose bytes do not fit its shape or lie past the end of its file, or a shard that holds
  a tensor the index places elsewhere is a ValueError naming the file.
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
    self._entries: dict[str, _Entry] = {}
    for shard in sorted(set(weight_map.values())) if weight_map else [SINGLE]:
      path = os.path.join(directory, shard)
      if not os.path.isfile(path):
        raise ValueError(f"{path} is missing (named in {INDEX})")
      for name, entry in _read_header(path).items():
        if weight_map is not None and weight_map.get(name) != shard:
          raise ValueError(f"{path} holds {name!r}, which {INDEX} places in {weight_map.get(name)!r}")
        self._entries[name] = entry
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self._entries))
      if absent:
        raise ValueError(f"{INDEX} names tensors that no shard holds: {absent[:5]}")

  @property
  def names(self) -> frozenset[str]:
    return frozenset(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name].dtype

  def nbytes(self, name: str | None = None) -> int:
    """Bytes of the tensor `name`, or of all tensors (the checkpoint's size without headers)."""
    if name is not None:
      return self._entries[name].nbytes
    return sum(entry.nbytes for entry in self._entries.values())

  def read(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    out = np.empty(entry.shape, entry.dtype)
    self.read_into(name, out)
    return out

  def read_into(self, name: str, out: np.ndarray) -> None:
    """Write the tensor `name` into `out`: an array of as many elements (the tensor's shape or one it reshapes to,
    any strides, any dtype the file's casts to), filled in the tensor's C order. `out` is typically a view of a
    parameter (its transpose, a split, an expert of a stack): the tensor is read with plain file reads straight
    into `out` where `out` is contiguous in the file's dtype, else through one buffer of at most READ_BYTES
    (the transpose, the cast), so the whole tensor never exists in memory beside its place in the parameter."""
    entry = self._entries[name]
    if out.size != int(np.prod(entry.shape, dtype=np.int64)):
      raise ValueError(f"{name} {list(entry.shape)} does not fill an array of shape {list(out.shape)}")
    # np.empty: its pages take no memory until a read goes through it (never, when every block is direct).
    buffer = np.empty(max(1, min(out.size, READ_BYTES // entry.dtype.itemsize)), entry.dtype)
    with open(entry.path, "rb", buffering=0) as f:
      f.seek(entry.offset)
      _read_blocks(f, out.reshape(1) if out.ndim == 0 else out, buffer, f"{entry.path}: {name}")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor of a shard: where its bytes start in the file (after the header), its shape and dtype."""

  path: str
  offset: int
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _read_header(path: str) -> dict[str, _Entry]:
  """The tensors of a safetensors file, from its header: 8 bytes (little-endian u64 n), n bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, offsets relative
  to its start (https://github.com/huggingface/safetensors, "Format")."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
    if not 0 < length <= size - 8:
      raise ValueError(f"{path} is not a safetensors file (no header of a size that fits the file)")
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {error})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: tensor {name!r} has no dtype of {sorted(DTYPES)}, shape and data_offsets: "
                       f"{info!r}") from None
    entry = _Entry(path, 8 + length + begin, shape, np.dtype(dtype))
    if end - begin != entry.nbytes or begin < 0 or 8 + length + end > size:
      raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}, {entry.nbytes} bytes) has the "
                       f"bytes {begin}..{end} of a data section of {size - 8 - length}")
    entries[name] = entry
  return entries


def _read_blocks(f, out: np.ndarray, buffer: np.ndarray, what: str) -> None:
  """Fill `out` (ndim >= 1) in C order from the file's position on, at most `buffer.size` elements per read:
  whole rows of `out` at a time, or each row in turn when one row is larger than that."""
  per_row = out.size // out.shape[0] if out.shape[0] else 0
  if per_row > buffer.size:
    for row in out:
      _read_blocks(f, row, buffer, what)
    return
  step = max(1, buffer.size // max(per_row, 1))
  for start in range(0, out.shape[0], step):
    block = out[start:start + step]
    direct = block.flags.c_contiguous and block.dtype == buffer.dtype
    target = block.reshape(-1) if direct else buffer[:block.size]
    view = memoryview(target.view(np.uint8))
    done = 0
    while done < len(view):
      count = f.readinto(view[done:])
      if not count:
        raise ValueError(f"{what}: the file ends inside the tensor")
      done += count
    if not direct:
      block[...] = target.reshape(block.shape)


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
