"""Flax NNX feed-forward layers: the dense FFN and the Mixture-of-Experts FFN that replaces it.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length.

`MoeFeedForward` = router (`moe_jax.routing`) -> dispatch backend (`moe_jax.dispatch`) -> experts
(`moe_jax.experts`), the Switch Transformer FFN layer (Fedus et al. 2021) generalised to top-k and expert
choice. It returns its output and a `MoeAux` with the auxiliary losses; adding them to the training loss
(scaled, Switch alpha = 1e-2, ST-MoE z-loss 1e-3) is the caller's job, as is the residual connection that
carries dropped tokens.

Routing groups (`MoeConfig.group_size`). Routers rank tokens and fill capacity within a group, so the group
is part of the layer's definition:
  * group_size = 0 (default): one group per sequence, G = B, S = L;
  * group_size = N > 0: the flattened batch [B*L] cut into consecutive groups of N tokens (N must divide B*L),
    e.g. N = tokens per device to route "per device shard" as Mesh-TensorFlow Switch did.
Groups are defined on the global batch and never straddle devices (the expert-parallel path splits whole
groups over devices and refuses a group count that does not divide evenly), so the same config gives the
same outputs on one device and on any mesh: the single-device layer is the reference of the sharded one.

Expert parallelism. Called under a mesh of more than one device (`parallel.mesh_context`, a
('data', 'expert') mesh with Auto axes), the layer runs the whole MoE block in one shard_map
(`parallel.shard_moe_block`): experts split over 'expert', groups over both axes, all-to-all in between;
without a mesh (or a one-device mesh) it runs the same block directly. num_experts must be a multiple of
the 'expert' axis size. The dropless backend cannot run ragged across devices on CPU (no
`ragged_all_to_all` in XLA:CPU): under a mesh, dispatch='dropless' falls back to the gather backend on the
dropless routing's capacity C = S, which still drops nothing and gives the same outputs, at the cost of
buffers sized for the worst case (E*S rows per group).

Randomness (router jitter, the random second-expert policy, expert dropout) is drawn only when
deterministic=False, from an nnx RNG stream kept in the module state (a fork of the 'dropout' stream, which
the training loop reseeds from (seed, step) before every step, so a resumed run draws the same noise). Under a mesh each device folds its index into the key: noisy outputs depend on
the mesh layout, deterministic ones do not.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, parallel, routing
from moe_jax import experts as experts_lib
from moe_jax.init import switch_init

ROUTERS = ("switch", "top_k", "expert_choice")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """An MoE feed-forward layer. Every field is checked on construction (ValueError naming the field).

  Combinations that would be silently ignored are refused instead: `top_k` > 1 outside router='top_k',
  `renormalize` and the random second-expert policy outside 'top_k', `batch_prioritized` or `dropless` with
  expert choice (whose capacity is its definition), dispatch='dropless' without dropless=True.
  """

  num_experts: int = 8
  router: str = "switch"  # 'switch' | 'top_k' | 'expert_choice'
  top_k: int = 1  # must be 1 for 'switch' and 'expert_choice'; 1 <= top_k <= num_experts
  capacity_factor: float = 1.25  # > 0 unless dropless; expert choice: average experts per token
  eval_capacity_factor: float = 2.0  # when deterministic=True (Mesh-TensorFlow MoE: 1.25 train, 2.0 eval)
  dropless: bool = False  # capacity = S: nothing is ever dropped
  renormalize: bool = False  # combine weights renormalised over the k choices (Mixtral)
  batch_prioritized: bool = False  # V-MoE batch prioritised routing
  second_expert_policy: str = "all"  # 'all' | 'random' (GShard Sec. 2.2; 'all' when deterministic)
  second_expert_threshold: float = 0.2  # (0, 1]
  jitter_eps: float = 0.0  # [0, 1) Switch multiplicative router jitter, training only
  dispatch: str = "gather"  # 'einsum' | 'gather' | 'dropless' (under a mesh: gather with C = S, still dropless)
  expert_dropout: float = 0.0  # [0, 1) on the experts' hidden activations (Switch Table 4), training only
  group_size: int = 0  # tokens per routing group; 0 = one group per sequence (module docstring)
  # 'float32' | 'bfloat16': ablation of Switch "selective precision" (Sec. 2.4). bfloat16 rounds the router
  # inputs, kernel and logits to bf16 (a TPU bf16 matmul); the softmax stays float32 (routing.py casts).
  router_dtype: str = "float32"

  def __post_init__(self):
    if not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise ValueError(f"num_experts={self.num_experts!r} must be an integer >= 1")
    if self.router not in ROUTERS:
      raise ValueError(f"router={self.router!r} must be one of {ROUTERS}")
    routing.validate_top_k(self.top_k, self.num_experts)
    if self.router != "top_k" and self.top_k != 1:
      raise ValueError(f"top_k={self.top_k} must be 1 for router={self.router!r} (use router='top_k')")
    if self.dropless and self.router == "expert_choice":
      raise ValueError("dropless=True is not available for router='expert_choice' (its capacity is its definition)")
    for name in ("capacity_factor", "eval_capacity_factor"):
      value = getattr(self, name)
      if not self.dropless and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={value} must be finite and > 0 (or set dropless=True)")
    if self.dispatch not in dispatch.BACKENDS:
      raise ValueError(f"dispatch={self.dispatch!r} must be one of {sorted(dispatch.BACKENDS)}")
    if self.dispatch == "dropless" and not self.dropless:
      raise ValueError("dispatch='dropless' needs dropless=True (capacity routing drops; use 'gather' or 'einsum')")
    if self.renormalize and self.router != "top_k":
      raise ValueError(f"renormalize=True needs router='top_k'; got router={self.router!r}")
    if self.batch_prioritized and self.router == "expert_choice":
      raise ValueError("batch_prioritized=True is a token-choice option; router='expert_choice' has no use for it")
    if self.second_expert_policy not in ("all", "random"):
      raise ValueError(f"second_expert_policy={self.second_expert_policy!r} must be one of ('all', 'random')")
    if self.second_expert_policy == "random" and self.router != "top_k":
      raise ValueError(f"second_expert_policy='random' needs router='top_k'; got router={self.router!r}")
    if not 0.0 < self.second_expert_threshold <= 1.0:
      raise ValueError(f"second_expert_threshold={self.second_expert_threshold} must be in (0, 1]")
    routing.validate_jitter_eps(self.jitter_eps)
    experts_lib.validate_dropout("expert_dropout", self.expert_dropout)
    if not isinstance(self.group_size, int) or self.group_size < 0:
      raise ValueError(f"group_size={self.group_size!r} must be an integer >= 0 (0 = one group per sequence)")
    if self.router_dtype not in DTYPES:
      raise ValueError(f"router_dtype={self.router_dtype!r} must be one of {tuple(DTYPES)}")

  @property
  def needs_rng(self) -> bool:
    """Whether a training call draws noise."""
    return self.jitter_eps > 0 or self.expert_dropout > 0 or self.second_expert_policy == "random"


@flax.struct.dataclass
class MoeAux:
  """Auxiliary outputs of one MoE layer call, averaged over routing groups.

  Under a mesh: the mean of the per-device values, which is the mean over all groups (each device holds as
  many groups), except that the dropped fractions are ratios whose denominators may differ per device under
  the random second-expert policy; there the mean of ratios approximates the global ratio.
  """

  load_balancing_loss: jax.Array  # [] Switch eq. 4, 1.0 when balanced
  router_z_loss: jax.Array  # [] ST-MoE eq. 5
  metrics: routing.RoutingMetrics


def group_tokens(x: jax.Array, group_size: int) -> jax.Array:  # [B, L, M] -> [G, S, M]
  """Routing groups of the module docstring: one per sequence (group_size 0) or consecutive tokens."""
  if group_size == 0:
    return x
  batch, length, d_model = x.shape
  if (batch * length) % group_size:
    raise ValueError(f"group_size={group_size} must divide batch * length = {batch} * {length} = {batch * length}")
  return x.reshape(batch * length // group_size, group_size, d_model)


def _param(init, logical_axes: tuple[str | None, ...], shape: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Param:
  """A float32 param annotated with logical axes; placed on the context mesh if there is one (eager
  sharding), else created unplaced, so that a layer can be built with or without a mesh."""
  with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
    return nnx.Param(nnx.with_partitioning(init, logical_axes)(rngs.params(), shape, jnp.float32))


def _ffn_params(
    shape_in: tuple[int, ...],
    shape_out: tuple[int, ...],
    axes_in: tuple[str, ...],
    axes_out: tuple[str, ...],
    gated: bool,
    init_scale: float,
    batch_axis: tuple[int, ...],
    rngs: nnx.Rngs,
):
  """wi_0, wi_1 (gated only, else None), wo with Switch init; fan-in excludes the expert axis."""
  init = switch_init(init_scale, batch_axis=batch_axis)
  wi_0 = _param(init, axes_in, shape_in, rngs)
  wi_1 = _param(init, axes_in, shape_in, rngs) if gated else None
  wo = _param(init, axes_out, shape_out, rngs)
  return wi_0, wi_1, wo


class FeedForward(nnx.Module):
  """The dense Transformer FFN (T5/Switch baseline): the experts' math with E = 1. x [B, L, M] -> [B, L, M]."""

  def __init__(
      self,
      d_model: int,
      d_ff: int,
      *,
      activation: str = "gelu",
      dropout: float = 0.0,
      init_scale: float = 0.1,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    gated = experts_lib.is_gated(activation)
    experts_lib.validate_dropout("dropout", dropout)
    self.activation = activation
    self.dropout = dropout
    self.dtype = dtype
    self.wi_0, self.wi_1, self.wo = _ffn_params(
        (d_model, d_ff), (d_ff, d_model), ("embed", "mlp"), ("mlp", "embed"), gated, init_scale, (), rngs
    )
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    batch, length, d_model = x.shape
    weights = experts_lib.ExpertWeights(
        wi_0=self.wi_0[...][None],
        wo=self.wo[...][None],
        wi_1=None if self.wi_1 is None else self.wi_1[...][None],
    )
    key = None if deterministic or self.dropout == 0 else self.rngs()
    y = experts_lib.expert_ffn(
        weights,
        x.astype(self.dtype).reshape(1, batch * length, d_model),
        activation=self.activation,
        dropout_rate=self.dropout,
        dropout_key=key,
    )
    return y.reshape(batch, length, d_model)


def _route(logits: jax.Array, config: MoeConfig, deterministic: bool, key: jax.Array | None):
  capacity_factor = config.eval_capacity_factor if deterministic else config.capacity_factor
  if config.router == "expert_choice":
    return routing.expert_choice_route(logits, capacity_factor=capacity_factor)
  random_policy = config.second_expert_policy == "random" and not deterministic
  return routing.top_k_route(
      logits,
      k=config.top_k,
      capacity_factor=capacity_factor,
      dropless=config.dropless,
      renormalize=config.renormalize,
      batch_prioritized=config.batch_prioritized,
      second_expert_policy="random" if random_policy else "all",
      second_expert_threshold=config.second_expert_threshold,
      key=key,
  )


def moe_block(
    groups: jax.Array,  # [G, S, M] compute dtype
    replicated: tuple[jax.Array, jax.Array | None],  # router kernel [M, E] float32, PRNG key or None
    weights: experts_lib.ExpertWeights,  # [E, M, F] / [E, F, M], or the local E/n under a mesh
    *,
    config: MoeConfig,
    activation: str,
    deterministic: bool,
    distributed: bool,
) -> tuple[jax.Array, MoeAux]:  # [G, S, M]
  """Route, dispatch, run experts, combine: the whole MoE layer on arrays.

  With `distributed`, this is the per-device body of `parallel.shard_moe_block`: experts are reached by
  all-to-all, keys are folded with the device index and the auxiliary outputs are averaged over devices
  (every device holds the same number of groups, so that is the mean over all groups).
  """
  kernel, key = replicated
  jitter_key = policy_key = dropout_key = None
  if key is not None:
    if distributed:
      key = jax.random.fold_in(key, parallel.device_index())
    jitter_key, policy_key, dropout_key = jax.random.split(key, 3)

  router_dtype = DTYPES[config.router_dtype]
  # bfloat16 ablation: bf16 inputs and kernel with f32 accumulation, logits rounded to bf16 (a TPU bf16 matmul).
  logits = routing.router_logits(
      groups.astype(router_dtype),
      kernel.astype(router_dtype),
      jitter_eps=0.0 if deterministic else config.jitter_eps,
      key=jitter_key,
  ).astype(router_dtype)
  route = _route(logits, config, deterministic, policy_key)

  experts: experts_lib.Experts = experts_lib.StackedExperts(weights, activation, config.expert_dropout, dropout_key)
  experts_across_devices = distributed and parallel.expert_axis_size() > 1
  if experts_across_devices:
    experts = parallel.AllToAllExperts(experts)
  backend = dispatch.resolve_backend(config.dispatch, jax.default_backend(), experts_across_devices)
  out = dispatch.get_backend(backend)(groups, route, experts)
  aux = MoeAux(route.load_balancing_loss, route.router_z_loss, route.metrics)
  if distributed:
    aux = jax.lax.pmean(aux, parallel.MESH_AXES)
  return out, aux


class MoeFeedForward(nnx.Module):
  """Mixture-of-Experts FFN layer (Switch Transformer, Fedus et al. 2021): x [B, L, M] -> [B, L, M], MoeAux.

  Parameters (float32, Switch init with scale `init_scale`; `dtype` is the compute dtype of the experts,
  the router always computes in `moe.router_dtype`):
    router [M, E] ('embed', 'unmodeled'); wi_0, wi_1 (gated activations only) [E, M, F]
    ('expert', 'embed', 'mlp'); wo [E, F, M] ('expert', 'mlp', 'embed').
  Create it inside `parallel.mesh_context(mesh)` to shard the experts over the 'expert' axis, and for large
  layers inside `nnx.jit` too (`nnx.jit(lambda: MoeFeedForward(...))()`): eagerly, every initialiser op under
  a mesh runs replicated on all devices (measured with 8 emulated devices, 1.07 GB of expert weights: 17.6 GB
  peak memory eagerly, 0.37 GB under nnx.jit). See the module docstring for routing groups, expert parallelism and
  randomness.
  """

  def __init__(
      self,
      d_model: int,
      d_ff: int,
      moe: MoeConfig,
      *,
      activation: str = "gelu",
      init_scale: float = 0.1,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    gated = experts_lib.is_gated(activation)
    mesh = parallel.moe_mesh()
    if mesh is not None:  # before creating sharded params, whose error would be less clear
      parallel.validate_expert_parallelism(moe.num_experts, mesh)
    self.config = moe
    self.activation = activation
    self.dtype = dtype
    num_experts = moe.num_experts
    self.router = _param(switch_init(init_scale), ("embed", "unmodeled"), (d_model, num_experts), rngs)
    self.wi_0, self.wi_1, self.wo = _ffn_params(
        (num_experts, d_model, d_ff),
        (num_experts, d_ff, d_model),
        ("expert", "embed", "mlp"),
        ("expert", "mlp", "embed"),
        gated,
        init_scale,
        (0,),
        rngs,
    )
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, MoeAux]:
    if x.ndim != 3 or x.shape[-1] != self.router.shape[0]:
      raise ValueError(f"x must be [batch, length, d_model={self.router.shape[0]}]; got shape {x.shape}")
    groups = group_tokens(x.astype(self.dtype), self.config.group_size)  # [G, S, M]
    key = None if deterministic or not self.config.needs_rng else self.rngs()
    weights = experts_lib.ExpertWeights(
        wi_0=self.wi_0[...], wo=self.wo[...], wi_1=None if self.wi_1 is None else self.wi_1[...]
    )
    mesh = parallel.moe_mesh()
    block = functools.partial(
        moe_block,
        config=self.config,
        activation=self.activation,
        deterministic=deterministic,
        distributed=mesh is not None,
    )
    if mesh is not None:
      parallel.validate_expert_parallelism(self.config.num_experts, mesh)
      parallel.validate_group_sharding(groups.shape[0], mesh)
      block = parallel.shard_moe_block(block)
    out, aux = block(groups, (self.router[...], key), weights)
    return out.reshape(x.shape), aux
