"""Layout tables: which Hugging Face tensors become which moe_jax parameter, and how.

Axis legend: M d_model · H query heads · K key/value heads · D head dim · F FFN width · E experts · V vocabulary.

A family's table is a list of `Rule`s, one per moe_jax parameter: its path in the model's state (as
`nnx.to_flat_state` spells it, e.g. ('blocks', 0, 'attention', 'qkv')), the Hugging Face tensor names it is made
of, and a `Transform` that maps those tensors to the parameter and back. Every transform here is a transpose,
reshape, concatenation or stack: exact in both directions, so an export followed by an import gives back the same
bits. `nn.Linear` stores weights [out, in]; moe_jax multiplies `x @ W` with W [in, out], hence the transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Path = tuple  # a parameter's path in the model state: strings and block indices


@dataclasses.dataclass(frozen=True)
class Transform:
  """tensors (in the order of `Rule.tensors`) -> parameter, and its exact inverse. `streams`: `to_param` reads each
  tensor of its sequence once, in order, so the importer may hand it a sequence that reads each on access (the
  experts of a layer: one expert's tensor in memory beside the parameter, not all of them)."""

  to_param: Callable[[Sequence[np.ndarray]], np.ndarray]
  to_tensors: Callable[[np.ndarray], list[np.ndarray]]
  streams: bool = False


def tensor_shapes(transform: Transform, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  """The shapes of the tensors that make a parameter of `shape`: `to_tensors` of a zero-strided stand-in (no
  memory), so a checkpoint's shapes are checked against them before anything is read."""
  return [t.shape for t in transform.to_tensors(np.broadcast_to(np.zeros((), np.float32), shape))]


@dataclasses.dataclass(frozen=True)
class Rule:
  param: Path
  tensors: tuple[str, ...]
  transform: Transform

  @property
  def name(self) -> str:
    return ".".join(map(str, self.param))


def rule(param: Path, tensors: str | Sequence[str], transform: Transform | None = None) -> Rule:
  tensors = (tensors,) if isinstance(tensors, str) else tuple(tensors)
  return Rule(tuple(param), tensors, transform or SAME)


SAME = Transform(lambda ts: ts[0], lambda p: [p])  # norm scales and biases, embeddings [V, M], T5's bias [buckets, H]
TRANSPOSED = Transform(lambda ts: ts[0].T, lambda p: [p.T])  # a Linear [out, in] -> [in, out]


def heads_in(heads: Sequence[int], head_dim: int) -> Transform:
  """Projections into heads, one Linear [n_i * D, M] per entry of `heads` (q, k, v: [H, K, K]) -> [M, sum n_i, D],
  the heads of each in order (moe_jax's `qkv`, cross-attention's `q` and `kv`). A fused projection (DBRX's Wqkv
  [(H + 2K) * D, M]) is one entry of H + 2K heads."""
  splits = np.cumsum([n * head_dim for n in heads])[:-1]

  def to_param(ts):
    return np.concatenate([t.T for t in ts], axis=1).reshape(ts[0].shape[1], sum(heads), head_dim)

  def to_tensors(p):
    flat = p.reshape(p.shape[0], -1)  # [M, sum n_i * D]
    return [part.T for part in np.split(flat, splits, axis=1)]

  return Transform(to_param, to_tensors)


def heads_bias(heads: Sequence[int], head_dim: int) -> Transform:
  """Biases of the projections of `heads_in`, [n_i * D] each -> [sum n_i, D]."""
  splits = np.cumsum([n * head_dim for n in heads])[:-1]
  return Transform(lambda ts: np.concatenate(ts).reshape(sum(heads), head_dim),
                   lambda p: list(np.split(p.reshape(-1), splits)))


def heads_out(num_heads: int, head_dim: int) -> Transform:
  """The output projection [M, H * D] -> moe_jax's `out` [H, D, M]."""
  return Transform(lambda ts: ts[0].T.reshape(num_heads, head_dim, -1),
                   lambda p: [p.reshape(num_heads * head_dim, -1).T])


def experts(count: int) -> Transform:
  """E Linears [out, in], one per expert -> stacked [E, in, out], filled expert by expert (streams)."""
  def to_param(ts):
    out = None
    for e, t in enumerate(ts):
      if out is None:
        out = np.empty((count, *t.T.shape), t.dtype)
      out[e] = t.T
    return out

  return Transform(to_param, lambda p: [e.T for e in p], streams=True)


def fused_experts(count: int, transpose: bool) -> Transform:
  """One tensor [E * F, M] holding every expert (DBRX's w1, v1, w2) -> [E, M, F] (`transpose`) or [E, F, M]."""
  def to_param(ts):
    stacked = ts[0].reshape(count, -1, ts[0].shape[1])  # [E, F, M]
    return stacked.transpose(0, 2, 1) if transpose else stacked

  def to_tensors(p):
    stacked = p.transpose(0, 2, 1) if transpose else p
    return [stacked.reshape(-1, stacked.shape[2])]

  return Transform(to_param, to_tensors)
