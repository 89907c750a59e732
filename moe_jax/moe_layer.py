"""Flax NNX feed-forward layers: the dense FFN and the Mixture-of-Experts FFN that replaces it.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length.

`MoeFeedForward` = router (`moe_jax.routing`) -> dispatch backend (`moe_jax.dispatch`) -> experts
(`moe_jax.experts`), the Switch Transformer FFN layer (Fedus et al. 2021) generalised to top-k, expert choice,
Soft MoE, BASE layers and Hash layers (`ROUTERS`). Hash layers read token ids, which the caller passes as
`token_ids` (the decoder LM does so only for them); Soft MoE and expert choice are non-causal and need
causal=False (an encoder). It returns its output and a `MoeAux` with the auxiliary losses; adding them to the
training loss (scaled, Switch alpha = 1e-2, ST-MoE z-loss 1e-3) is the caller's job, as is the residual
connection that carries dropped tokens.

Routing groups (`MoeConfig.group_size`). Routers rank tokens and fill capacity within a group, so the group
is part of the layer's definition:
  * group_size = 0 (default): one group per sequence, G = B, S = L;
  * group_size = N > 0: the flattened batch [B*L] cut into consecutive groups of N tokens (N must divide B*L),
    e.g. N = tokens per device to route "per device shard" as Mesh-TensorFlow Switch did.
Groups are defined on the global batch and never straddle devices (the expert-parallel path splits whole
groups over devices and refuses a group count that does not divide evenly), so the same config gives the
same outputs on one device and on any mesh: the single-device layer is the reference of the sharded one.

Expert parallelism. Called under a mesh of more than one device (`parallel.mesh_context`, a
('data', 'fsdp', 'expert', 'tensor') mesh with Auto axes), the layer runs the whole MoE block in one shard_map
(`parallel.shard_moe_block`): experts split over 'expert' and their hidden units over 'tensor', groups over
the token axes ('data', 'fsdp', 'expert'), all-to-all in between;
without a mesh (or a one-device mesh) it runs the same block directly. num_experts must be a multiple of
the 'expert' axis size. The dropless backends cannot run ragged across devices (no `ragged_all_to_all` in
XLA:CPU): when the 'expert' axis is larger than 1 they resolve to the gather backend on the dropless routing's
capacity C = S (`dispatch.resolve_backend`, which `moe_jax.resolve` also records for a run), still dropping
nothing, with buffers sized for the worst case (E*S rows per group).

DeepSeek-V3's auxiliary-loss-free balancing (`moe.balancing_bias_rate` > 0): the layer holds a per-expert selection
bias, a `RouterBias` (model state, not a parameter: no gradient, no optimizer state; the training loop checkpoints
it with the parameters). Every training call (deterministic=False) routes with the bias as it is, then moves it
from that call's load over the whole batch (`routing.balancing_bias_update`), the paper's update at the end of
each step; evaluation leaves it alone.

Randomness (router jitter, the random second-expert policy, expert dropout) is drawn only when
deterministic=False, from an nnx RNG stream kept in the module state (a fork of the 'dropout' stream, which
the training loop reseeds from (seed, step) before every step, so a resumed run draws the same noise). Under a mesh each device folds its index into the key: noisy outputs depend on
the mesh layout, deterministic ones do not.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, parallel, routing
from moe_jax import experts as experts_lib
from moe_jax.config_lib import MoeConfig
from moe_jax.init import switch_init

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # registry of compute dtypes (config "dtype")


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
  # [] DeepSeek-V3's L_Bal, eq. 17 with its alpha = moe.sequence_aux_loss_weight included (0 when off), so the
  # training loss adds it as it is.
  sequence_aux_loss: jax.Array


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


def _weights(module: nnx.Module, *, expert_axis: bool) -> experts_lib.ExpertWeights:
  """The module's wi_0 / wi_1 / wo as stacked expert weights; a dense FFN gets a leading E = 1 axis."""
  def value(param):
    if param is None:
      return None
    return param[...] if expert_axis else param[...][None]

  return experts_lib.ExpertWeights(wi_0=value(module.wi_0), wo=value(module.wo), wi_1=value(module.wi_1))


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
    self.activation = activation
    self.dropout = dropout
    self.dtype = dtype
    self.wi_0, self.wi_1, self.wo = _ffn_params(
        (d_model, d_ff), (d_ff, d_model), ("embed", "mlp"), ("mlp", "embed"), gated, init_scale, (), rngs
    )
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    batch, length, d_model = x.shape
    key = None if deterministic or self.dropout == 0 else self.rngs()
    y = experts_lib.expert_ffn(
        _weights(self, expert_axis=False),
        x.astype(self.dtype).reshape(1, batch * length, d_model),
        activation=self.activation,
        dropout_rate=self.dropout,
        dropout_key=key,
    )
    return y.reshape(batch, length, d_model)


@dataclasses.dataclass(frozen=True)
class RouterInputs:
  """What a router may read inside the MoE block; each router takes what it needs."""

  groups: jax.Array  # [G, S, M] compute dtype
  kernel: jax.Array | None  # router kernel [M, E] float32; Soft MoE's slot parameters phi [M, E, P]; None for hash
  scale: jax.Array | None  # [] Soft MoE's learned logit scale; None otherwise
  bias: jax.Array | None  # [E] DeepSeek-V3 balancing bias; None when off
  token_ids: jax.Array | None  # [G, S] int32 for routers that read token ids (hash); None otherwise
  jitter_key: jax.Array | None
  policy_key: jax.Array | None


def _logits(inputs: RouterInputs, config: MoeConfig, deterministic: bool) -> jax.Array:  # [G, S, E]
  # moe.router_dtype='bfloat16': the ablation of Switch Table 2, the whole router (logits and softmax) in bf16.
  logits = routing.router_logits(
      inputs.groups, inputs.kernel, jitter_eps=0.0 if deterministic else config.jitter_eps, key=inputs.jitter_key,
      dtype=DTYPES[config.router_dtype],
  )
  if config.check_router_inputs:  # debug only: a host callback per call
    jax.debug.callback(report_nonfinite_router_inputs, jnp.sum(~jnp.isfinite(inputs.groups)),
                       jnp.sum(~jnp.isfinite(logits)))
  return logits


def _capacity_factor(config: MoeConfig, deterministic: bool) -> float:
  return config.eval_capacity_factor if deterministic else config.capacity_factor


def _expert_choice(inputs: RouterInputs, config: MoeConfig, deterministic: bool) -> routing.RoutingResult:
  return routing.expert_choice_route(_logits(inputs, config, deterministic),
                                     capacity_factor=_capacity_factor(config, deterministic))


def _token_choice(inputs: RouterInputs, config: MoeConfig, deterministic: bool) -> routing.RoutingResult:
  random_policy = config.second_expert_policy == "random" and not deterministic
  return routing.top_k_route(
      _logits(inputs, config, deterministic),
      k=config.top_k,
      capacity_factor=_capacity_factor(config, deterministic),
      dropless=config.dropless,
      renormalize=config.renormalize,
      batch_prioritized=config.batch_prioritized,
      second_expert_policy="random" if random_policy else "all",
      second_expert_threshold=config.second_expert_threshold,
      key=inputs.policy_key,
      score_function=config.score_function,
      routed_scaling=config.routed_scaling,
      selection_bias=inputs.bias,
      num_expert_groups=config.num_expert_groups,
      topk_expert_groups=config.topk_expert_groups,
      group_score=config.group_score,
      dtype=DTYPES[config.router_dtype],
  )


def _soft_moe(inputs: RouterInputs, config: MoeConfig, deterministic: bool) -> routing.SoftRoutingResult:
  return routing.soft_moe_route(inputs.groups, inputs.kernel, inputs.scale)


def _base(inputs: RouterInputs, config: MoeConfig, deterministic: bool) -> routing.RoutingResult:
  # Balanced assignment in training only: the paper routes greedily (top-1) at test time.
  return routing.base_route(_logits(inputs, config, deterministic), balanced=not deterministic,
                            sinkhorn_iterations=config.sinkhorn_iterations)


def _hash(inputs: RouterInputs, config: MoeConfig, deterministic: bool) -> routing.RoutingResult:
  return routing.hash_route(inputs.token_ids, num_experts=config.num_experts,
                            capacity_factor=_capacity_factor(config, deterministic), dropless=config.dropless)


# The routers a config can name (moe.router), looked up by moe_jax.registry. Switch is top-k with k = 1.
ROUTERS = {"switch": _token_choice, "top_k": _token_choice, "expert_choice": _expert_choice,
           "soft_moe": _soft_moe, "base": _base, "hash": _hash}
# Routers whose routing of a token reads later tokens of its group: refused in causal layers (`MoeFeedForward`
# with causal=True, the decoder LM), fine in an encoder. Looked up by moe_jax.registry (config field moe.router).
NON_CAUSAL_ROUTERS = ("expert_choice", "soft_moe")
# moe.decoder_router: the encoder-decoder's decoder stack routes causally; '' keeps moe.router.
DECODER_ROUTERS = ("",) + tuple(r for r in ROUTERS if r not in NON_CAUSAL_ROUTERS)


def report_nonfinite_router_inputs(bad_inputs, bad_logits) -> None:
  """Host side of `moe.check_router_inputs`: the pure routers do no host checks, so a NaN or inf reaching the
  router would otherwise only surface later as a NaN loss."""
  if bad_inputs or bad_logits:
    print(f"moe: non-finite router input: {int(bad_inputs)} token features, {int(bad_logits)} router logits",
          file=sys.stderr, flush=True)


def moe_block(
    groups: jax.Array,  # [G, S, M] compute dtype
    # router kernel [M, E] float32 ([M, E, P] Soft MoE phi, None for hash), PRNG key or None, balancing bias [E]
    # or None, Soft MoE logit scale [] or None
    replicated: tuple[jax.Array | None, jax.Array | None, jax.Array | None, jax.Array | None],
    weights: experts_lib.ExpertWeights,  # [E, M, F] / [E, F, M], or the local E/n under a mesh
    token_ids: jax.Array | None,  # [G, S] int32 for routers that read them (moe.router='hash'), else None
    *,
    config: MoeConfig,
    activation: str,
    deterministic: bool,
    distributed: bool,
    sequence_length: int,
) -> tuple[jax.Array, MoeAux]:  # [G, S, M]
  """Route, dispatch, run experts, combine: the whole MoE layer on arrays.

  With `distributed`, this is the per-device body of `parallel.shard_moe_block`: experts are reached by
  all-to-all, keys are folded with the device index and the auxiliary outputs are averaged over devices
  (every device holds the same number of groups, so that is the mean over all groups).
  """
  kernel, key, bias, scale = replicated
  jitter_key = policy_key = dropout_key = None
  if key is not None:
    if distributed:
      key = jax.random.fold_in(key, parallel.device_index())
    jitter_key, policy_key, dropout_key = jax.random.split(key, 3)
    if distributed and parallel.tensor_axis_size() > 1:  # each 'tensor' device drops its own slice of F
      dropout_key = jax.random.fold_in(dropout_key, parallel.tensor_index())

  inputs = RouterInputs(groups, kernel, scale, bias, token_ids, jitter_key, policy_key)
  route = ROUTERS[config.router](inputs, config, deterministic)

  experts: experts_lib.Experts = experts_lib.StackedExperts(weights, activation, config.expert_dropout, dropout_key)
  experts_across_devices = distributed and parallel.expert_axis_size() > 1
  if experts_across_devices:
    experts = parallel.AllToAllExperts(experts)
  if isinstance(route, routing.SoftRoutingResult):  # dense slot weights: one backend fits (config: dispatch)
    out = dispatch.soft_dispatch(groups, route, experts)
  else:
    backend = dispatch.resolve_backend(config.dispatch, jax.default_backend(), experts_across_devices)
    out = dispatch.get_backend(backend)(groups, route, experts)
  if distributed:
    out = parallel.sum_tensor_partials(out)  # combining is linear: summing after it moves the fewest bytes
  weight = config.sequence_aux_loss_weight
  sequence_aux_loss = (weight * routing.sequence_balance_loss(route.router_probs, route.expert_index, sequence_length)
                       if weight else jnp.zeros((), jnp.float32))
  aux = MoeAux(route.load_balancing_loss, route.router_z_loss, route.metrics, sequence_aux_loss)
  if distributed:
    aux = jax.lax.pmean(aux, parallel.TOKEN_AXES)
  return out, aux


class RouterBias(nnx.Variable):
  """DeepSeek-V3's per-expert selection bias b [E] (arXiv:2412.19437, eq. 16): model state that is not a
  parameter, so the optimizer (wrt=nnx.Param) never sees it; moved by `routing.balancing_bias_update`."""


def _router_bias(num_experts: int) -> RouterBias:
  """A zero bias [E], replicated like the router kernel (placed on the context mesh as `_param` does)."""
  with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
    zeros = nnx.with_partitioning(nnx.initializers.zeros_init(), ("unmodeled",))
    return RouterBias(zeros(None, (num_experts,), jnp.float32))


class MoeFeedForward(nnx.Module):
  """Mixture-of-Experts FFN layer (Switch Transformer, Fedus et al. 2021): x [B, L, M] -> [B, L, M], MoeAux.

  Parameters (float32, Switch init with scale `init_scale`; `dtype` is the compute dtype of the experts,
  the router always computes in `moe.router_dtype`):
    router [M, E] ('embed', 'unmodeled'); wi_0, wi_1 (gated activations only) [E, M, F]
    ('expert', 'embed', 'mlp'); wo [E, F, M] ('expert', 'mlp', 'embed').
  `shared_d_ff` > 0 adds DeepSeekMoE's shared experts (Dai et al. 2024, arXiv:2401.06066, eq. 9), which every
  token passes through beside its routed ones: N_s shared experts of width f are one dense FFN of width N_s * f
  (their outputs are summed, so their hidden units concatenate), held in `shared` and counted as active.
  Create it inside `parallel.mesh_context(mesh)` to shard the experts over the 'expert' axis, and for large
  layers inside `nnx.jit` too (`nnx.jit(lambda: MoeFeedForward(...))()`): eagerly, every initialiser op under
  a mesh runs replicated on all devices, so each device would briefly hold every expert's weights. See the
  module docstring for routing groups, expert parallelism and randomness. With `moe.balancing_bias_rate` > 0 it
  also holds `router_bias` [E], DeepSeek-V3's selection bias (a `RouterBias`, see the module docstring).

  Router parameters by `moe.router`: 'soft_moe' holds phi [M, E, P] as `router` ('embed', 'unmodeled',
  'unmodeled'; P = moe.slots_per_expert) and its learned logit scale `router_scale` [] (initialised to 1,
  Puigcerver et al. Sec. 2.3); 'hash' learns no router (`router` is None) and needs the token ids at every call.

  `causal`: whether the layer sits in a causal (autoregressive) stack. True, the default, is the decoder LM:
  routers that read later tokens of the group (`NON_CAUSAL_ROUTERS`: expert choice, Soft MoE) are refused with a
  ValueError at construction. An encoder (e.g. of an encoder-decoder model) builds its MoE layers with
  causal=False, which admits them.
  """

  def __init__(
      self,
      d_model: int,
      d_ff: int,
      moe: MoeConfig,
      *,
      shared_d_ff: int = 0,
      activation: str = "gelu",
      init_scale: float = 0.1,
      dtype=jnp.float32,
      causal: bool = True,
      rngs: nnx.Rngs,
  ):
    if causal and moe.router in NON_CAUSAL_ROUTERS:
      raise ValueError(f"moe.router={moe.router!r} is non-causal (a token's routing reads the later tokens of its "
                       "group) and is refused in a causal layer; build an encoder's MoeFeedForward with "
                       "causal=False, or use one of " + ", ".join(repr(r) for r in ROUTERS if r not in
                                                                   NON_CAUSAL_ROUTERS))
    gated = experts_lib.is_gated(activation)
    mesh = parallel.moe_mesh()
    if mesh is not None:  # before creating sharded params, whose error would be less clear
      parallel.validate_expert_parallelism(moe.num_experts, mesh)
    self.config = moe
    self.causal = causal
    self.d_model = d_model
    self.activation = activation
    self.dtype = dtype
    num_experts = moe.num_experts
    if moe.router == "hash":
      self.router = None
    elif moe.router == "soft_moe":
      self.router = _param(switch_init(init_scale), ("embed", "unmodeled", "unmodeled"),
                           (d_model, num_experts, moe.slots_per_expert), rngs)
    else:
      self.router = _param(switch_init(init_scale), ("embed", "unmodeled"), (d_model, num_experts), rngs)
    self.router_scale = (_param(nnx.initializers.ones_init(), (), (), rngs) if moe.router == "soft_moe"
                         else None)
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
    self.shared = (FeedForward(d_model, shared_d_ff, activation=activation, init_scale=init_scale, dtype=dtype,
                               rngs=rngs) if shared_d_ff else None)
    self.router_bias = _router_bias(num_experts) if moe.balancing_bias_rate > 0 else None

  def __call__(
      self,
      x: jax.Array,  # [B, L, M]
      *,
      deterministic: bool = True,
      token_ids: jax.Array | None = None,  # [B, L] integer, only for routers that read them (moe.router='hash')
  ) -> tuple[jax.Array, MoeAux]:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be [batch, length, d_model={self.d_model}]; got shape {x.shape}")
    if x.shape[0] * x.shape[1] == 0:  # no routing group: every mean over groups would be NaN
      raise ValueError(f"x must hold at least one token to route; got shape {x.shape}")
    if self.config.needs_token_ids != (token_ids is not None):
      raise ValueError(f"token_ids must be given exactly when the router reads them (moe.router='hash'); "
                       f"moe.router={self.config.router!r}, token_ids {'missing' if token_ids is None else 'given'}")
    if token_ids is not None and token_ids.shape != x.shape[:2]:
      raise ValueError(f"token_ids must be [batch, length] = {x.shape[:2]}; got shape {token_ids.shape}")
    groups = group_tokens(x.astype(self.dtype), self.config.group_size)  # [G, S, M]
    if token_ids is not None:  # the same consecutive groups as the tokens
      token_ids = token_ids.astype(jnp.int32).reshape(groups.shape[:2])
    key = None if deterministic or not self.config.needs_rng else self.rngs()
    weights = _weights(self, expert_axis=True)
    mesh = parallel.moe_mesh()
    block = functools.partial(
        moe_block,
        config=self.config,
        activation=self.activation,
        deterministic=deterministic,
        distributed=mesh is not None,
        sequence_length=x.shape[1],
    )
    if mesh is not None:
      parallel.validate_expert_parallelism(self.config.num_experts, mesh)
      parallel.validate_group_sharding(groups.shape[0], mesh)
      block = parallel.shard_moe_block(block, weights)
    bias = None if self.router_bias is None else self.router_bias[...]
    value = lambda param: None if param is None else param[...]
    out, aux = block(groups, (value(self.router), key, bias, value(self.router_scale)), weights, token_ids)
    if bias is not None and not deterministic:
      self.router_bias[...] = routing.balancing_bias_update(bias, aux.metrics.expert_selection,
                                                            self.config.balancing_bias_rate)
    out = out.reshape(x.shape)
    if self.shared is not None:
      out = out + self.shared(x, deterministic=deterministic)
    return out, aux
