"""Flax NNX feed-forward layers: the dense FFN and the Mixture-of-Experts FFN that replaces it.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length.

`MoeFeedForward` = router (a router family of `moe_jax.routers`, chosen by `moe.router`) -> dispatch backend
(`moe_jax.dispatch`) -> experts (`moe_jax.experts`), the Switch Transformer FFN layer (Fedus et al. 2021)
generalised to top-k, expert choice, Soft MoE, BASE layers and Hash layers. The layer asks the family for its
parameters, its routing call and its facts, and tests no router name. Hash layers read token ids, which the
caller passes as `token_ids` (the model does so only where `moe.needs_token_ids`); Soft MoE and expert choice
are non-causal and need causal=False (an encoder). It returns its output and a `MoeAux` with the auxiliary losses; adding them to the
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

Router state (`RouterParam.update`), e.g. DeepSeek-V3's auxiliary-loss-free balancing (`moe.top_k.balancing_bias_rate`
> 0): the layer holds a per-expert selection bias, a `RouterBias` (model state, not a parameter: no gradient, no
optimizer state; the training loop checkpoints it with the parameters). Every training call (deterministic=False)
routes with the bias as it is, then moves it from that call's load over the whole batch
(`routing.balancing_bias_update`), the paper's update at the end of each step; evaluation leaves it alone.

Randomness (router jitter, the random second-expert policy, expert dropout) is drawn only when
deterministic=False, from an nnx RNG stream kept in the module state (a fork of the 'dropout' stream, which
the training loop reseeds from (seed, step) before every step, so a resumed run draws the same noise). Under a mesh each device folds its index into the key: noisy outputs depend on
the mesh layout, deterministic ones do not.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, parallel, routers, routing
from moe_jax import experts as experts_lib
from moe_jax.config_lib import MoeConfig
from moe_jax.init import switch_init

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtypes: the names of registry "dtype"


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


def moe_block(
    groups: jax.Array,  # [G, S, M] compute dtype
    # The router family's arrays by name (`RouterFamily.params`: kernel, Soft MoE's scale, DeepSeek-V3's bias...)
    # and the PRNG key of this call (None when it draws no noise): replicated on every device.
    replicated: tuple[dict[str, jax.Array], jax.Array | None],
    weights: experts_lib.ExpertWeights,  # [E, M, F] / [E, F, M], or the local E/n under a mesh
    token_ids: jax.Array | None,  # [G, S] int32 for routers that read them (moe.router='hash'), else None
    *,
    config: MoeConfig,
    activation: str,
    deterministic: bool,
    distributed: bool,
    sequence_length: int,
    forced: dict[str, jax.Array] | None = None,
    sparse_decode: bool = False,
) -> tuple[jax.Array, MoeAux]:  # [G, S, M]
  """Route, dispatch, run experts, combine: the whole MoE layer on arrays.

  With `distributed`, this is the per-device body of `parallel.shard_moe_block`: experts are reached by
  all-to-all, keys are folded with the device index and the auxiliary outputs are averaged over devices
  (every device holds the same number of groups, so that is the mean over all groups).
  `forced` (router replay, `ForcedRouting`): expert_index, slot, combine_weight, kept [G, S, K] that replace the
  router's decisions; its losses and metrics stay those of the router's own routing.
  `sparse_decode` (set by `moe_jax.decode`): a call with few assignments reads only the chosen experts' weights
  (`dispatch.expert_gather_dispatch`, where `dispatch.use_expert_gather` says so).
  """
  router_params, key = replicated
  jitter_key = policy_key = dropout_key = None
  if key is not None:
    if distributed:
      key = jax.random.fold_in(key, parallel.device_index())
    jitter_key, policy_key, dropout_key = jax.random.split(key, 3)
    if distributed and parallel.tensor_axis_size() > 1:  # each 'tensor' device drops its own slice of F
      dropout_key = jax.random.fold_in(dropout_key, parallel.tensor_index())

  family, options = config.family, config.router_options
  inputs = routers.RouterInputs(groups, router_params, token_ids, jitter_key, policy_key)
  route = family.route(inputs, config, options, deterministic)
  if forced is not None:
    route = dataclasses.replace(route, **forced)

  experts: experts_lib.Experts = experts_lib.StackedExperts(weights, activation, config.expert_dropout, dropout_key)
  experts_across_devices = distributed and parallel.expert_axis_size() > 1
  if experts_across_devices:
    experts = parallel.AllToAllExperts(experts)
  if isinstance(route, routing.SoftRoutingResult):  # dense slot weights: one backend fits (config: dispatch)
    out = dispatch.soft_dispatch(groups, route, experts)
  elif sparse_decode and dispatch.use_expert_gather(route.expert_index.size, route.num_experts, experts_across_devices):
    out = dispatch.expert_gather_dispatch(groups, route, experts)
  else:
    backend = dispatch.resolve_backend(config.dispatch, jax.default_backend(), experts_across_devices)
    out = dispatch.get_backend(backend)(groups, route, experts)
  if distributed:
    out = parallel.sum_tensor_partials(out)  # combining is linear: summing after it moves the fewest bytes
  sequence_aux_loss = (family.aux_loss(route, options, sequence_length) if family.aux_loss is not None
                       else jnp.zeros((), jnp.float32))
  aux = MoeAux(route.load_balancing_loss, route.router_z_loss, route.metrics, sequence_aux_loss)
  if distributed:
    aux = jax.lax.pmean(aux, parallel.TOKEN_AXES)
  return out, aux


class ForcedRouting(nnx.Variable):
  """Router replay (moe_jax.tracing.replay): the decisions a layer's calls use instead of its router's, a dict of
  `routing.RoutingResult` fields expert_index, slot, combine_weight, kept [G, S, K] for the groups of its input."""


class RouterBias(nnx.Variable):
  """Router state that is not a parameter (`RouterParam.update` is set), e.g. DeepSeek-V3's per-expert selection
  bias b [E] (arXiv:2412.19437, eq. 16): the optimizer (wrt=nnx.Param) never sees it, the training loop checkpoints
  it with the parameters, and every training call moves it by its family's `update`."""


def _router_state(spec: routers.RouterParam, init_scale: float) -> RouterBias:
  """Router state placed like a router parameter (on the context mesh as `_param` does); it draws no key."""
  with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
    init = nnx.with_partitioning(spec.init(init_scale), spec.axes)
    return RouterBias(init(None, spec.shape, jnp.float32))


class MoeFeedForward(nnx.Module):
  """Mixture-of-Experts FFN layer (Switch Transformer, Fedus et al. 2021): x [B, L, M] -> [B, L, M], MoeAux.

  Parameters (float32, Switch init with scale `init_scale`; `dtype` is the compute dtype of the experts,
  the router always computes in `moe.router_dtype`):
    router [M, E] ('embed', 'unmodeled'); wi_0, wi_1 (gated activations only) [E, M, F]
    ('expert', 'embed', 'mlp'); wo [E, F, M] ('expert', 'mlp', 'embed').
  `shared_d_ff` > 0 adds DeepSeekMoE's shared experts (Dai et al. 2024, arXiv:2401.06066, eq. 9), which every
  token passes through beside its routed ones: N_s shared experts of width f are one dense FFN of width N_s * f
  (their outputs are summed, so their hidden units concatenate), held in `shared` and counted as active. With
  `moe.shared_expert_gate` (Qwen1.5-MoE / Qwen2-MoE, `Qwen2MoeSparseMoeBlock` in `transformers`) their output is
  scaled per token by sigmoid(x . w_gate), w_gate the parameter `shared_gate` [M, 1] ('embed', 'unmodeled'),
  x the layer's input, the same the routed experts see: y = routed(x) + sigmoid(x . w_gate) * shared(x).
  Create it inside `parallel.mesh_context(mesh)` to shard the experts over the 'expert' axis, and for large
  layers inside `nnx.jit` too (`nnx.jit(lambda: MoeFeedForward(...))()`): eagerly, every initialiser op under
  a mesh runs replicated on all devices, so each device would briefly hold every expert's weights. See the
  module docstring for routing groups, expert parallelism and randomness.

  The router's arrays are those its family declares (`moe.family.params`, moe_jax.routers), attributes under
  their declared names: the logit routers' kernel `router` [M, E] ('embed', 'unmodeled'); Soft MoE's phi
  [M, E, P] as `router` and its logit scale `router_scale` []; none for hash layers, which need the token ids at
  every call; with `moe.top_k.balancing_bias_rate` > 0 also `router_bias` [E], DeepSeek-V3's selection bias (a
  `RouterBias`, see the module docstring).

  `causal`: whether the layer sits in a causal (autoregressive) stack. True, the default, is the decoder LM:
  a router family that is not causal (its routing reads later tokens of the group: expert choice, Soft MoE) is
  refused with a ValueError at construction. An encoder (e.g. of an encoder-decoder model) builds its MoE layers
  with causal=False, which admits them.
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
    if causal and not moe.family.causal:
      raise ValueError(f"moe.router={moe.router!r} is non-causal (a token's routing reads the later tokens of its "
                       "group) and is refused in a causal layer; build an encoder's MoeFeedForward with "
                       "causal=False, or use one of "
                       + ", ".join(repr(n) for n in routers.names() if routers.get(n).causal))
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
    specs = self._router_specs()
    for name, spec in specs.items():  # parameters first, in declared order: each draws the next 'params' key
      if spec.update is None:
        setattr(self, name, _param(spec.init(init_scale), spec.axes, spec.shape, rngs))
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
    if moe.shared_expert_gate and not shared_d_ff:
      raise ValueError("moe.shared_expert_gate=True needs shared experts (shared_d_ff > 0: moe.num_shared_experts "
                       f">= 1); got shared_d_ff={shared_d_ff}")
    self.shared = (FeedForward(d_model, shared_d_ff, activation=activation, init_scale=init_scale, dtype=dtype,
                               rngs=rngs) if shared_d_ff else None)
    # Created after `shared`, and only when asked for: the other parameters draw the keys they drew without it.
    self.shared_gate = (_param(switch_init(init_scale), ("embed", "unmodeled"), (d_model, 1), rngs)
                        if moe.shared_expert_gate else None)
    for name, spec in specs.items():
      if spec.update is not None:
        setattr(self, name, _router_state(spec, init_scale))
    # Router traces (moe_jax.tracing): when True, every call sows its routing (`route`) as nnx.Intermediate
    # 'routing', which `nnx.capture(..., nnx.Intermediate)` collects; a plain static flag, so training is untouched.
    self.capture_routing = False
    self.forced_routing: ForcedRouting | None = nnx.data(None)  # router replay: set by moe_jax.tracing for a call
    # Decoding (moe_jax.decode): a static flag; when True, calls with few assignments read only the chosen experts.
    self.sparse_decode = False

  def _router_specs(self) -> dict[str, routers.RouterParam]:
    return self.config.family.params(self.d_model, self.config.num_experts, self.config.router_options)

  def route(
      self,
      groups: jax.Array,  # [G, S, M] the layer's input in routing groups (`group_tokens`), compute dtype
      token_ids: jax.Array | None = None,  # [G, S] int32, only for routers that read them (hash layers)
  ) -> routing.RoutingResult | routing.SoftRoutingResult:
    """The routing this layer gives `groups` at evaluation (deterministic: no jitter, no random policy, the
    evaluation capacity factor): the same family call on the same router arrays as the forward pass, so its choices
    are the ones the layer's experts receive. For router traces and their analyses (moe_jax.tracing)."""
    router_params = {name: getattr(self, name)[...] for name in self._router_specs()}
    inputs = routers.RouterInputs(groups, router_params, token_ids, None, None)
    return self.config.family.route(inputs, self.config, self.config.router_options, True)

  def __call__(
      self,
      x: jax.Array,  # [B, L, M]
      *,
      deterministic: bool = True,
      token_ids: jax.Array | None = None,  # [B, L] integer, only for routers that read them (hash layers)
  ) -> tuple[jax.Array, MoeAux]:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be [batch, length, d_model={self.d_model}]; got shape {x.shape}")
    if x.shape[0] * x.shape[1] == 0:  # no routing group: every mean over groups would be NaN
      raise ValueError(f"x must hold at least one token to route; got shape {x.shape}")
    if self.config.needs_token_ids != (token_ids is not None):
      raise ValueError(f"token_ids must be given exactly when the router reads them (hash layers); "
                       f"moe.router={self.config.router!r}, token_ids {'missing' if token_ids is None else 'given'}")
    if token_ids is not None and token_ids.shape != x.shape[:2]:
      raise ValueError(f"token_ids must be [batch, length] = {x.shape[:2]}; got shape {token_ids.shape}")
    groups = group_tokens(x.astype(self.dtype), self.config.group_size)  # [G, S, M]
    if token_ids is not None:  # the same consecutive groups as the tokens
      token_ids = token_ids.astype(jnp.int32).reshape(groups.shape[:2])
    if self.capture_routing:
      if not deterministic:
        raise ValueError("capture_routing records the evaluation routing: call the layer with deterministic=True")
      self.sow(nnx.Intermediate, "routing", self.route(groups, token_ids))
    key = None if deterministic or not self.config.needs_rng else self.rngs()
    weights = _weights(self, expert_axis=True)
    mesh = parallel.moe_mesh()
    forced = None if self.forced_routing is None else self.forced_routing.get_value()
    layer_block = functools.partial(
        moe_block,
        config=self.config,
        activation=self.activation,
        deterministic=deterministic,
        distributed=mesh is not None,
        sequence_length=x.shape[1],
        sparse_decode=self.sparse_decode,
    )

    # The forced routing [G, S, K] travels with the token ids [G, S]: under a mesh both are split along G as the
    # groups are, so each device replays the routing of its own groups (slots are positions within a group).
    def block(groups, replicated, weights, per_group):
      token_ids, forced = per_group
      return layer_block(groups, replicated, weights, token_ids, forced=forced)

    if mesh is not None:
      parallel.validate_expert_parallelism(self.config.num_experts, mesh)
      parallel.validate_group_sharding(groups.shape[0], mesh)
      block = parallel.shard_moe_block(block, weights)
    specs = self._router_specs()
    router_params = {name: getattr(self, name)[...] for name in specs}
    out, aux = block(groups, (router_params, key), weights, (token_ids, forced))
    if not deterministic:
      for name, spec in specs.items():
        if spec.update is not None:
          getattr(self, name)[...] = spec.update(router_params[name], aux.metrics, self.config.router_options)
    out = out.reshape(x.shape)
    if self.shared is not None:
      shared = self.shared(x, deterministic=deterministic)
      if self.shared_gate is not None:
        # The gate in float32, as the router: one logit per token, sigmoid(x . w_gate) [B, L, 1].
        gate = jax.nn.sigmoid(jnp.einsum("blm,mo->blo", x.astype(jnp.float32), self.shared_gate[...]))
        shared = (gate * shared).astype(shared.dtype)
      out = out + shared
    return out, aux
