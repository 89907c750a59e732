"""Experts: stacked position-wise feed-forward networks, as pure functions over arrays.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length. Here T is any number of rows (token slots) per expert,
  N a number of rows sorted by expert, and R the rows of a tiled buffer (N plus each expert's padding).

Every expert is the Transformer FFN of T5 and Switch, y = act(x W_i) W_o, or with a gated activation
(GLU variants, Shazeer 2020, arXiv:2002.05202, as in T5.1.1 and Switch) y = (act(x W_i0) * (x W_i1)) W_o.
Weights are stacked over experts, [E, M, F] and [E, F, M], so that E experts run as one batched matmul;
the dense FFN is the same math with E = 1 (`moe_jax.moe_layer.FeedForward`).

Expert dropout: Switch (Fedus et al. 2021, Sec. 3, Table 4) fine-tunes best with a higher dropout rate
inside the experts (0.4) than elsewhere (0.1); it drops hidden activations [.., F], as T5's FFN dropout.

Three layouts, one math:
  * `expert_ffn`         padded buffers [E, T, M] (capacity backends; T = G*C slots per expert): one batched
                         matmul per projection;
  * `blocked_expert_ffn` rows sorted by expert [R, M], each expert's rows padded to a multiple of the smallest
                         tile (`BlockLayout`): a grouped matmul written as loops over experts and row tiles
                         (`grouped_matmul`), so it does only the useful work, about (N + E * tile) rows for N
                         assignments, on every platform (MegaBlocks' block-sparse grouping, Gale et al. 2022,
                         arXiv:2211.15841, without the custom kernel);
  * `ragged_expert_ffn`  rows sorted by expert [N, M] with group sizes [E], through `jax.lax.ragged_dot`: a
                         native grouped matmul where the platform has one (GPU, TPU); elsewhere XLA may lower it
                         to a dense masked dot over all E groups (E times the work; see benchmarks/README.md).
  * `gathered_expert_ffn` one row per (token, choice) [N, M] with its expert [N]: each row reads its expert's
                         weights (row tiles sliced on the expert axis in a loop), so the weights of experts no row
                         chose are never read (decoding: N = B * K rows, `dispatch.expert_gather_dispatch`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp

# name -> (nonlinearity, gated). Gated variants (GeGLU, SwiGLU) multiply by a second linear projection.
# gelu is the tanh approximation, as in T5.1.1 ("gelu_new") and Flaxformer.
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], bool]] = {
    "relu": (jax.nn.relu, False),
    "gelu": (functools.partial(jax.nn.gelu, approximate=True), False),
    "geglu": (functools.partial(jax.nn.gelu, approximate=True), True),
    "swiglu": (jax.nn.silu, True),
}

# A grouped matmul with jax.lax.ragged_dot's signature: (lhs [N, M], rhs [E, M, F], group_sizes [E]) -> [N, F].
RaggedDot = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def validate_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")


def validate_dropout(name: str, rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{name}={rate} must be in [0, 1)")


def is_gated(activation: str) -> bool:
  """True for GLU variants, which need the second input projection wi_1."""
  validate_activation(activation)
  return ACTIVATIONS[activation][1]


@flax.struct.dataclass
class ExpertWeights:
  """Stacked FFN weights of E experts (T5.1.1 names). E = 1 is a dense FFN."""

  wi_0: jax.Array  # [E, M, F] input projection, through the nonlinearity
  wo: jax.Array  # [E, F, M] output projection
  wi_1: jax.Array | None = None  # [E, M, F] linear branch of a gated activation; None otherwise

  @property
  def num_experts(self) -> int:
    return self.wi_0.shape[0]


class Experts(Protocol):
  """What a dispatch backend calls to run the experts (`moe_jax.dispatch`).

  `__call__` takes padded capacity buffers, expert-major; `blocked` and `ragged` take rows sorted by expert
  and are called only by the dropless backends ('dropless' and 'ragged_dot'). `moe_jax.parallel.AllToAllExperts`
  implements `__call__` across devices. `StackedExperts` (all experts on one device) also has `gathered`, which
  only the decode-time `dispatch.expert_gather_dispatch` calls.
  """

  def __call__(self, x: jax.Array) -> jax.Array:  # [E, T, M] -> [E, T, M]
    ...

  def blocked(self, x: jax.Array, layout: BlockLayout) -> jax.Array:  # [R, M] -> [R, M]
    ...

  def ragged(self, x: jax.Array, group_sizes: jax.Array, ragged_dot: RaggedDot = jax.lax.ragged_dot) -> jax.Array:
    ...  # [N, M], [E] -> [N, M]


def _hidden(
    pre: jax.Array,  # [.., F] x W_i0
    linear: jax.Array | None,  # [.., F] x W_i1 when gated
    activation: str,
    dropout_rate: float,
    dropout_key: jax.Array | None,
) -> jax.Array:  # [.., F]
  nonlinearity, gated = ACTIVATIONS[activation]
  h = nonlinearity(pre)
  if gated:
    h = h * linear
  if dropout_rate > 0.0 and dropout_key is not None:
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, h.shape)
    h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0).astype(h.dtype)
  return h


def _check(weights: ExpertWeights, activation: str, dropout_rate: float) -> None:
  validate_activation(activation)
  validate_dropout("expert_dropout", dropout_rate)
  if is_gated(activation) != (weights.wi_1 is not None):
    raise ValueError(
        f"activation={activation!r} {'needs' if is_gated(activation) else 'takes no'} second input "
        "projection wi_1"
    )


def expert_ffn(
    weights: ExpertWeights,
    x: jax.Array,  # [E, T, M]
    *,
    activation: str,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:  # [E, T, M]
  """Expert e applied to its rows x[e]: one batched matmul per projection.

  Computes in x.dtype (weights are cast, so float32 params serve a bfloat16 compute dtype). Dropout acts on
  the hidden activations only when `dropout_key` is given and `dropout_rate` > 0 (pass None to evaluate).
  """
  _check(weights, activation, dropout_rate)
  if x.ndim != 3 or x.shape[0] != weights.num_experts:
    raise ValueError(f"expert inputs must be [E={weights.num_experts}, T, M]; got shape {x.shape}")
  cast = lambda w: None if w is None else w.astype(x.dtype)
  pre = jnp.einsum("etm,emf->etf", x, cast(weights.wi_0))
  linear = None if weights.wi_1 is None else jnp.einsum("etm,emf->etf", x, cast(weights.wi_1))
  h = _hidden(pre, linear, activation, dropout_rate, dropout_key)
  return jnp.einsum("etf,efm->etm", h, cast(weights.wo))


# ----------------------------------------------------------------------------------------------------------
# Grouped matmul over row tiles.


@flax.struct.dataclass
class BlockLayout:
  """Where each expert's rows sit in a buffer of rows sorted by expert, and how they are cut into tiles.

  Expert e owns rows expert_start[e] .. expert_start[e] + expert_rows[e] - 1, followed by padding up to a
  multiple of the smallest tile; segments follow each other in expert order. A segment is covered greedily
  by tiles of the static heights `tiles` (largest first, the smallest one rounding up; every height is a
  multiple of the smallest, so the tiles cover the padded segment exactly), and a grouped matmul runs one
  dense [tile, M] x [M, F] product per tile, never touching another expert's rows.
  """

  expert_start: jax.Array  # [E] int32 first row of expert e, a multiple of tiles[-1]
  expert_rows: jax.Array  # [E] int32 rows of expert e before padding
  num_rows: int = flax.struct.field(pytree_node=False)  # R, rows of the buffer: an upper bound, static
  tiles: tuple[int, ...] = flax.struct.field(pytree_node=False)  # decreasing tile heights

  @property
  def num_experts(self) -> int:
    return self.expert_rows.shape[0]


def default_tiles(num_assignments: int, num_experts: int) -> tuple[int, ...]:
  """Tile heights for N assignments over E experts: large tiles keep the matmuls efficient, the smallest
  one bounds the padding (at most E * (tiles[-1] - 1) rows). Heights above the mean rows per expert buy
  nothing, so they are dropped."""
  mean_rows = max(1, num_assignments // num_experts)
  return tuple(t for t in (256, 64, 16) if t <= mean_rows) + (8,)


def block_layout(
    expert_rows: jax.Array,  # [E] int32 rows per expert, summing to at most num_assignments
    num_assignments: int,  # N, static upper bound of sum(expert_rows)
    tiles: tuple[int, ...] | None = None,  # default: default_tiles(N, E)
) -> BlockLayout:
  """The layout of N sorted rows: segments padded to the smallest tile, R = N + E * (tiles[-1] - 1) rows
  (rounded up to a tile, and at least one largest tile) bounding every outcome of the routing."""
  num_experts = expert_rows.shape[0]
  tiles = default_tiles(num_assignments, num_experts) if tiles is None else tuple(tiles)
  if (
      not tiles
      or any(t < 1 for t in tiles)
      or any(t % tiles[-1] for t in tiles)
      or list(tiles) != sorted(set(tiles), reverse=True)
  ):
    raise ValueError(
        f"tiles={tiles} must be distinct positive tile heights in decreasing order, each a multiple of the last"
    )
  unit = tiles[-1]
  padded = (expert_rows + unit - 1) // unit * unit
  bound = num_assignments + num_experts * (unit - 1)
  num_rows = max(-(-bound // unit) * unit, tiles[0])
  return BlockLayout(
      expert_start=(jnp.cumsum(padded) - padded).astype(jnp.int32),
      expert_rows=expert_rows.astype(jnp.int32),
      num_rows=num_rows,
      tiles=tiles,
  )


def _over_tiles(layout: BlockLayout, expert: jax.Array, fn: Callable, carry):
  """carry = fn(first_row, tile_height, carry) for each tile of `expert`'s segment, in row order: static tile
  heights, a dynamic number of tiles of each (a while loop), so empty experts cost nothing."""
  row = layout.expert_start[expert]
  remaining = layout.expert_rows[expert]
  for i, height in enumerate(layout.tiles):
    last = i == len(layout.tiles) - 1
    count = (remaining + height - 1) // height if last else remaining // height
    carry = jax.lax.fori_loop(
        0, count, lambda j, c, row=row, height=height: fn(row + j * height, height, c), carry
    )
    row, remaining = row + count * height, remaining - count * height
  return carry


def _grouped_matmul(
    x: jax.Array,  # [R, M]
    w: jax.Array,  # [E, M, F], or [E, F, M] with transpose_w
    layout: BlockLayout,
    transpose_w: bool,
) -> jax.Array:  # [R, F]: x[rows of e] @ w[e] (or w[e]^T), zero outside every segment
  out_dim = w.shape[1] if transpose_w else w.shape[2]

  def per_expert(e, out):
    # Read once per expert and reused by all its tiles; transposed here, once, because a matmul against a
    # transposed operand runs slower on CPU than a plain one, and the tile loop would pay it per tile.
    w_e = jnp.transpose(w[e]) if transpose_w else w[e]

    def tile(row, height, out):
      product = jax.lax.dynamic_slice_in_dim(x, row, height) @ w_e
      return jax.lax.dynamic_update_slice_in_dim(out, product.astype(out.dtype), row, 0)

    return _over_tiles(layout, e, tile, out)

  # zeros_like: under shard_map the carry must vary over the same mesh axes as x.
  return jax.lax.fori_loop(0, layout.num_experts, per_expert, jnp.zeros_like(x, shape=(x.shape[0], out_dim)))


def _weight_gradient(
    x: jax.Array,  # [R, M]
    cotangent: jax.Array,  # [R, F]
    layout: BlockLayout,
    dtype,
) -> jax.Array:  # [E, M, F]: sum over the tiles of e of x_tile^T cotangent_tile
  def per_expert(e, grad):
    def tile(row, height, acc):
      rows = lambda a: jax.lax.dynamic_slice_in_dim(a, row, height)
      return acc + jax.lax.dot_general(
          rows(x), rows(cotangent), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )

    acc = _over_tiles(layout, e, tile, jnp.zeros_like(x, jnp.float32, shape=(x.shape[1], cotangent.shape[1])))
    return jax.lax.dynamic_update_index_in_dim(grad, acc.astype(dtype), e, 0)

  shape = (layout.num_experts, x.shape[1], cotangent.shape[1])
  return jax.lax.fori_loop(0, layout.num_experts, per_expert, jnp.zeros_like(x, dtype, shape=shape))


def grouped_matmul(
    x: jax.Array,  # [R, M] rows sorted by expert as `layout` says
    w: jax.Array,  # [E, M, F]
    layout: BlockLayout,
) -> jax.Array:  # [R, F], zero outside the experts' segments
  """Row r of expert e's segment times w[e], tile by tile: E x (rows of e) x M x F multiply-adds in all,
  not E x R. Its VJP is two more grouped matmuls of the same layout (dx with w[e]^T, dw[e] accumulated
  over e's tiles in float32), so no gradient of a gather or scatter is ever formed over the weights, and
  each expert's weights are read once per product. Deterministic: every output tile is written once.

  Under shard_map the weights are first made to vary over x's mesh axes and x over the weights' (adding a zero
  of the other's type, which XLA folds away): the VJP then returns dx and dw of that common type, and the
  transposes of the additions sum each over the axes its primal does not vary over (dw over the token axes;
  dx over 'tensor' when the weights hold a slice of the hidden units).
  """
  return _grouped_matmul_vjp(x + jnp.zeros_like(w, x.dtype, shape=()), w + jnp.zeros_like(x, w.dtype, shape=()),
                             layout)


@jax.custom_vjp
def _grouped_matmul_vjp(x: jax.Array, w: jax.Array, layout: BlockLayout) -> jax.Array:
  return _grouped_matmul(x, w, layout, transpose_w=False)


def _grouped_matmul_fwd(x, w, layout):
  return _grouped_matmul(x, w, layout, transpose_w=False), (x, w, layout)


def _grouped_matmul_bwd(residuals, cotangent):
  x, w, layout = residuals
  dx = _grouped_matmul(cotangent, w, layout, transpose_w=True)
  return dx, _weight_gradient(x, cotangent, layout, w.dtype), None


_grouped_matmul_vjp.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def blocked_expert_ffn(
    weights: ExpertWeights,
    x: jax.Array,  # [R, M] rows sorted by expert
    layout: BlockLayout,
    *,
    activation: str,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:  # [R, M], zero outside the experts' segments
  """The FFN on rows grouped by expert, each projection a `grouped_matmul` (no capacity, no E-fold work)."""
  _check(weights, activation, dropout_rate)
  if x.ndim != 2 or x.shape[0] != layout.num_rows:
    raise ValueError(f"blocked expert inputs must be [R={layout.num_rows}, M]; got shape {x.shape}")
  cast = lambda w: None if w is None else w.astype(x.dtype)
  pre = grouped_matmul(x, cast(weights.wi_0), layout)
  linear = None if weights.wi_1 is None else grouped_matmul(x, cast(weights.wi_1), layout)
  h = _hidden(pre, linear, activation, dropout_rate, dropout_key)
  return grouped_matmul(h, cast(weights.wo), layout)


def ragged_expert_ffn(
    weights: ExpertWeights,
    x: jax.Array,  # [N, M] rows sorted by expert
    group_sizes: jax.Array,  # [E] int32: rows of expert 0, then expert 1, ...
    *,
    activation: str,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    ragged_dot: RaggedDot = jax.lax.ragged_dot,
) -> jax.Array:  # [N, M], zero beyond sum(group_sizes)
  """The same FFN on rows grouped by expert, through a grouped matmul with `jax.lax.ragged_dot`'s signature (no
  capacity): jax's own by default, or another implementation of it (`moe_jax.dispatch`'s 'tokamax' backend).

  Rows after the last group (sum(group_sizes) <= N) give zeros: the 'ragged_dot' backend parks dropped
  assignments there. See the module docstring for its cost where ragged_dot is not native.
  """
  _check(weights, activation, dropout_rate)
  cast = lambda w: None if w is None else w.astype(x.dtype)
  pre = ragged_dot(x, cast(weights.wi_0), group_sizes)
  linear = None if weights.wi_1 is None else ragged_dot(x, cast(weights.wi_1), group_sizes)
  h = _hidden(pre, linear, activation, dropout_rate, dropout_key)
  return ragged_dot(h, cast(weights.wo), group_sizes)


# Rows of an expert's weight matrix that `gathered_expert_ffn` reads per matmul (see `_expert_matvec`).
GATHER_TILE_ROWS = 256


def _expert_matvec(
    v: jax.Array,  # [R] one row's input to the projection
    w: jax.Array,  # [E, R, C] stacked weights
    expert: jax.Array,  # [] int32
    tile_rows: int,
) -> jax.Array:  # [C] float32, v @ w[expert]
  """v @ w[expert], reading w[expert] tile_rows rows at a time inside a loop.

  Why tiles: XLA:CPU hands a matmul contiguous operands only, so it copies a slice of the stacked weights (static or
  dynamic) into a temporary before the matmul. One copy of the whole [R, C] slice is a large temporary in fresh
  pages every call (written, then read again: the step ran 3.5x its dense twin of equal active parameters); a loop
  copies each tile into the same small, cache-resident buffer, so the expert's weights are read from memory once,
  as a dense layer reads its own. Accumulated in float32 (tiles of a bfloat16 matmul would otherwise round each
  partial sum)."""
  rows, cols = w.shape[1:]
  height = min(tile_rows, rows)
  full, rest = divmod(rows, height)

  def tile(start, size):  # v[start:start+size] @ w[expert, start:start+size]
    block = jax.lax.dynamic_slice(w, (expert, start, 0), (1, size, cols))[0].astype(v.dtype)
    part = jax.lax.dynamic_slice_in_dim(v, start, size)
    return jnp.matmul(part, block, preferred_element_type=jnp.float32)

  if full == 1:  # one tile: no loop
    out = tile(0, height)
  else:
    out = jax.lax.fori_loop(0, full, lambda i, acc: acc + tile(i * height, height), jnp.zeros((cols,), jnp.float32))
  if rest:
    out = out + tile(full * height, rest)
  return out


def gathered_expert_ffn(
    weights: ExpertWeights,
    x: jax.Array,  # [N, M] one row per (token, choice); N static and small (a decode step)
    expert: jax.Array,  # [N] int32 the expert of each row
    *,
    activation: str,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    tile_rows: int = GATHER_TILE_ROWS,
) -> jax.Array:  # [N, M]
  """Row n through the FFN of expert[n], reading only that expert's weights: each projection a matrix-vector
  product over row tiles of w[expert[n]] (`_expert_matvec`), unrolled over the N rows, so N x (2 or 3) x M x F
  weights are read whatever E is. Per-row slices rather than one `jnp.take` of [N, M, F]: XLA counts (and on CPU
  reads) a gather's whole operand. Worth it when N is small against E (`dispatch.use_expert_gather`); with many
  rows it reads an expert once per row, where a grouped matmul reads it once.

  Side by side in one process (CPU, 2 cores loaded by other jobs, float32 GeLU experts M=1024, F=3584, E=8, two
  rows; medians of 30 interleaved calls, against a dense FFN of width 2F): one slice copied per projection 5.6x
  the dense FFN's time, a `lax.switch` over experts with static slices 2.3x (XLA copies those too), a fused
  multiply-and-reduce 12x, tiles of 128 / 256 / 512 rows in a loop 0.8-1.7x (256: 0.8-1.5x over four runs;
  unrolled tiles 1.1-5.4x, as each gets its own temporary). M=1024, F=512, E=64, eight rows: 256-row tiles
  1.1-1.5x."""
  _check(weights, activation, dropout_rate)
  if x.ndim != 2 or expert.shape != x.shape[:1]:
    raise ValueError(f"gathered expert inputs must be x [N, M] and expert [N]; got {x.shape} and {expert.shape}")
  if tile_rows < 1:
    raise ValueError(f"tile_rows={tile_rows} must be >= 1")

  def row(n):  # [M] -> [M] through expert[n]
    project = lambda v, w: _expert_matvec(v, w, expert[n], tile_rows).astype(x.dtype)
    pre = project(x[n], weights.wi_0)
    linear = None if weights.wi_1 is None else project(x[n], weights.wi_1)
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, n)
    return project(_hidden(pre, linear, activation, dropout_rate, key), weights.wo)

  return jnp.stack([row(n) for n in range(x.shape[0])])


@dataclasses.dataclass(frozen=True)
class StackedExperts:
  """All E experts on this device: the `Experts` a backend calls when nothing is sharded."""

  weights: ExpertWeights
  activation: str
  dropout_rate: float = 0.0
  dropout_key: jax.Array | None = None  # None: no dropout (deterministic)

  def __call__(self, x: jax.Array) -> jax.Array:  # [E, T, M] -> [E, T, M]
    return expert_ffn(
        self.weights, x, activation=self.activation, dropout_rate=self.dropout_rate, dropout_key=self.dropout_key
    )

  def _options(self) -> dict:
    return dict(activation=self.activation, dropout_rate=self.dropout_rate, dropout_key=self.dropout_key)

  def blocked(self, x: jax.Array, layout: BlockLayout) -> jax.Array:  # [R, M] -> [R, M]
    return blocked_expert_ffn(self.weights, x, layout, **self._options())

  def ragged(self, x: jax.Array, group_sizes: jax.Array, ragged_dot: RaggedDot = jax.lax.ragged_dot) -> jax.Array:
    return ragged_expert_ffn(self.weights, x, group_sizes, ragged_dot=ragged_dot, **self._options())  # [N, M]

  def gathered(self, x: jax.Array, expert: jax.Array) -> jax.Array:  # [N, M], [N] -> [N, M]
    return gathered_expert_ffn(self.weights, x, expert, **self._options())
