"""Layout tables: which Hugging Face tensors become which moe_jax parameter, and how.

Axis legend: M d_model · H query heads · K key/value heads · D head dim · F FFN width · E experts · V vocabulary.

A family's table is a list of `Rule`s, one per moe_jax parameter: its path in the model's state (as
`nnx.to_flat_state` spells it, e.g. ('blocks', 0, 'attention', 'qkv')), the Hugging Face tensor names it is made
of, and a `Transform` that maps those tensors to the parameter and back. Every transform here is a transpose,
reshape, split or stack, written as views of the parameter: exact in both directions, so an export followed by an
import gives back the same bits. `nn.Linear` stores weights [out, in]; moe_jax multiplies `x @ W` with W [in, out],
hence the transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Path = tuple  # a parameter's path in the model state: strings and block indices


@dataclasses.dataclass(frozen=True)
class Transform:
  """A parameter <-> its tensors (in the order of `Rule.tensors`), both ways by one map of views.

  `to_tensors(p)`: the tensors out of the parameter array `p`, views of it (a transpose, reshape, split or index)
  wherever a view has the tensor's shape. `views(p)`: writable views of `p`, one per tensor, each holding that tensor's
  elements in C order, so import reads each tensor from its file straight into its place in an empty parameter
  (`shards.CheckpointReader.read_into`; no whole tensor in memory beside the parameter). They are `to_tensors`'
  views unless the tensor is not one (`in_place`: DBRX's fused experts [E * F, M] are no strided view of the
  transposed parameter [E, M, F], but their C order is that of the view [E, F, M])."""

  to_tensors: Callable[[np.ndarray], list[np.ndarray]]
  in_place: Callable[[np.ndarray], list[np.ndarray]] | None = None

  def views(self, p: np.ndarray) -> list[np.ndarray]:
    return (self.in_place or self.to_tensors)(p)


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


SAME = Transform(lambda p: [p])  # norm scales and biases, embeddings [V, M], T5's bias [buckets, H]
TRANSPOSED = Transform(lambda p: [p.T])  # a Linear [out, in] -> [in, out]


def heads_in(heads: Sequence[int], head_dim: int) -> Transform:
  """Projections into heads, one Linear [n_i * D, M] per entry of `heads` (q, k, v: [H, K, K]) -> [M, sum n_i, D],
  the heads of each in order (moe_jax's `qkv`, cross-attention's `q` and `kv`). A fused projection (DBRX's Wqkv
  [(H + 2K) * D, M]) is one entry of H + 2K heads."""
  splits = np.cumsum([n * head_dim for n in heads])[:-1]

  def to_tensors(p):
    flat = p.reshape(p.shape[0], -1)  # [M, sum n_i * D]
    return [part.T for part in np.split(flat, splits, axis=1)]

  return Transform(to_tensors)


def heads_bias(heads: Sequence[int], head_dim: int) -> Transform:
  """Biases of the projections of `heads_in`, [n_i * D] each -> [sum n_i, D]."""
  splits = np.cumsum([n * head_dim for n in heads])[:-1]
  return Transform(lambda p: list(np.split(p.reshape(-1), splits)))


def heads_out(num_heads: int, head_dim: int) -> Transform:
  """The output projection [M, H * D] -> moe_jax's `out` [H, D, M]."""
  return Transform(lambda p: [p.reshape(num_heads * head_dim, -1).T])


def experts(count: int) -> Transform:
  """E Linears [out, in], one per expert -> stacked [E, in, out]: expert e is the view p[e].T."""
  return Transform(lambda p: [p[e].T for e in range(count)])


def fused_experts(transpose: bool) -> Transform:
  """One tensor [E * F, M] holding every expert (DBRX's w1, v1, w2) -> [E, M, F] (`transpose`) or [E, F, M]."""
  def stacked(p):  # [E, F, M]
    return p.transpose(0, 2, 1) if transpose else p

  return Transform(lambda p: [stacked(p).reshape(-1, stacked(p).shape[2])], lambda p: [stacked(p)])
