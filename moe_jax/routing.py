"""Who goes where: pure routers for Mixture-of-Experts layers.

Arrays in, arrays out: no Flax state, no global state, an explicit PRNG key wherever noise is drawn.
Every router returns one `RoutingResult`; dispatch backends (`moe_jax.dispatch`) only read that. The router
families a config names (`moe.router`: each one's options, parameters and facts) are `moe_jax.routers`, one module
each, which call these functions.

Axis legend (used in names and shape comments throughout the package):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length.

Routers
  * `switch_route`       Switch Transformer top-1 (Fedus et al. 2021, arXiv:2101.03961).
  * `top_k_route`        token-choice top-k: GShard top-2 (Lepikhin et al. 2020, arXiv:2006.16668) and
                         Mixtral top-k with renormalised weights (Jiang et al. 2024, arXiv:2401.04088).
                         Its DeepSeek options (`select_experts`): sigmoid scores with a routed scaling factor
                         and an auxiliary-loss-free balancing bias (DeepSeek-V3, arXiv:2412.19437, eqs. 12-16),
                         group-limited routing (DeepSeek-V2, arXiv:2405.04434, Sec. 2.2.3; V3).
  * `expert_choice_route` each expert picks its top-C tokens (Zhou et al. 2022, arXiv:2202.09368).
                         NON-CAUSAL: a token's assignment depends on every other token of its group,
                         later ones included, so it leaks the future in an autoregressive decoder.
  * `soft_moe_route`     Soft MoE (Puigcerver et al. 2023, arXiv:2308.00951): every expert slot is a softmax
                         mixture of all tokens of the group and every token a softmax mixture of all slots.
                         Returns a `SoftRoutingResult` (dense weights, no indices), dispatched by
                         `moe_jax.dispatch.soft_dispatch`. NON-CAUSAL (each slot mixes the whole group).
  * `base_route`         BASE layers (Lewis et al. 2021, arXiv:2103.16716): a balanced assignment, every expert
                         takes exactly S/E tokens of each group in training (Sinkhorn, then the greedy
                         balanced assignment by deferred acceptance: `balanced_assignment`); greedy top-1 at
                         evaluation, as in the paper.
  * `hash_route`         Hash layers (Roller et al. 2021, arXiv:2106.04426): a fixed hash of the token id picks
                         the expert; nothing is learned. Needs the token ids, not the token features.
  * `sparsemixer_route`  Phi-3.5-MoE's top-2 (SparseMixer, Liu et al. 2023, arXiv:2310.00811; GRIN, Liu et al.
                         2024, arXiv:2409.12136) as `transformers`' `sparsemixer` evaluates it: two argmax stages,
                         each weight a softmax over the experts within a relative threshold of its stage's max.

Capacity convention (the one place it is defined: `compute_capacity`)
  C = min(S, max(1, ceil(capacity_factor * K * S / E)))
  i.e. the expected number of (token, choice) assignments per expert under uniform routing, scaled by
  the capacity factor, rounded up, at least one slot, and never more than S (no expert can receive a token
  twice, so S slots already guarantee no drops). Expert choice uses K = 1, making capacity_factor its
  "average experts per token" c of Zhou et al. (k = n * c / e). Dropless routing sets C = S. The token-choice
  routers also take an absolute capacity instead of the factor (`expert_capacity`, Hugging Face Switch
  Transformers' `expert_capacity`), C = min(S, expert_capacity): `token_choice_capacity`.

Precision: router math runs in float32 whatever the input dtype ("selective precision", Switch Sec. 2.4), unless
`dtype=jnp.bfloat16` asks for the ablation of Switch Table 2 (`router_logits`, `top_k_route`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

SecondExpertPolicy = Literal["all", "random"]
# A group's score in group-limited routing (`select_experts`): its best expert's score (DeepSeek-V2) or the sum
# of its two best (DeepSeek-V3). The config field moe.top_k.group_score (moe_jax.routers.top_k).
GroupScore = Literal["max", "top2_sum"]


def _pytree(cls):
  """A frozen dataclass that is a pytree (jit and shard_map carry it); `static()` fields are not traced."""
  return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def static():
  """A pytree dataclass field held as static metadata (a Python int), not as an array."""
  return dataclasses.field(metadata={"static": True})


@_pytree
class RoutingMetrics:
  """Diagnostics of one routing call, averaged over groups. Not differentiated through."""

  dropped_token_fraction: jax.Array  # [] tokens whose every choice was dropped by capacity
  dropped_assignment_fraction: jax.Array  # [] (token, choice) pairs dropped by capacity
  expert_load: jax.Array  # [E] kept assignments per expert / capacity (1.0 = buffer full)
  router_entropy: jax.Array  # [] mean over tokens of -sum_e p_e log p_e (nats)
  mean_top_gate: jax.Array  # [] mean over tokens of max_e p_e
  # [E] share of the (token, choice) assignments choosing each expert before capacity drops (sums to 1): the load
  # that DeepSeek-V3's balancing bias reacts to (`balancing_bias_update`).
  expert_selection: jax.Array


@_pytree
class RoutingResult:
  """Where each (token, choice) goes. Shapes use the module legend; K = E for expert choice."""

  expert_index: jax.Array  # [G, S, K] int32
  slot: jax.Array  # [G, S, K] int32, position inside the expert's buffer (meaningful where kept)
  combine_weight: jax.Array  # [G, S, K] float32, 0 where dropped
  kept: jax.Array  # [G, S, K] bool
  router_probs: jax.Array  # [G, S, E] float32 softmax over experts
  load_balancing_loss: jax.Array  # [] Switch eq. 4: E * sum_i f_i * P_i, 1.0 when uniform
  router_z_loss: jax.Array  # [] ST-MoE eq. 5: mean_s logsumexp(logits_s)^2
  metrics: RoutingMetrics
  num_experts: int = static()
  capacity: int = static()


# ----------------------------------------------------------------------------------------------------------
# Validation: plain Python on static values, so bad input fails at trace time, before anything compiles.


def _check_logits(logits: jax.Array) -> None:
  if logits.ndim != 3:
    raise ValueError(
        f"router logits must have rank 3 [groups, tokens_per_group, num_experts]; got shape {logits.shape}"
    )
  validate_num_experts(logits.shape[-1])
  if logits.shape[1] < 1:
    raise ValueError(f"tokens_per_group must be >= 1; got logits shape {logits.shape}")


def validate_num_experts(num_experts: int) -> None:
  if num_experts < 1:
    raise ValueError(f"num_experts={num_experts} must be >= 1")


def validate_top_k(top_k: int, num_experts: int) -> None:
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")


def validate_capacity_factor(capacity_factor: float | None, dropless: bool) -> None:
  if dropless:
    return
  if capacity_factor is None or not (capacity_factor > 0 and math.isfinite(capacity_factor)):
    raise ValueError(f"capacity_factor={capacity_factor} must be finite and > 0 (or set dropless=True)")


def validate_jitter_eps(jitter_eps: float) -> None:
  if not 0.0 <= jitter_eps < 1.0:
    raise ValueError(f"jitter_eps={jitter_eps} must be in [0, 1)")


def compute_capacity(
    tokens_per_group: int, num_experts: int, capacity_factor: float, top_k: int = 1
) -> int:
  """Slots per expert per group: min(S, max(1, ceil(capacity_factor * K * S / E))).

  The single capacity convention of moe_jax (see the module docstring). The product is rounded to 9
  decimals before the ceiling so that e.g. 1.1 * 10 (= 11.000000000000002 in floating point) gives 11.
  """
  validate_num_experts(num_experts)
  validate_top_k(top_k, num_experts)
  validate_capacity_factor(capacity_factor, dropless=False)
  expected = round(capacity_factor * top_k * tokens_per_group / num_experts, 9)
  return int(min(tokens_per_group, max(1, math.ceil(expected))))


def token_choice_capacity(
    tokens_per_group: int,
    num_experts: int,
    *,
    top_k: int = 1,
    capacity_factor: float | None = 1.0,
    dropless: bool = False,
    expert_capacity: int | None = None,
) -> int:
  """Slots per expert per group of a token-choice router: S when `dropless`; min(S, `expert_capacity`) when that
  absolute count is given (Hugging Face `SwitchTransformersTop1Router`'s `expert_capacity`, which keeps the first
  `expert_capacity` tokens of each expert; more than S slots could never fill, as no expert takes a token twice);
  else `compute_capacity` from the factor."""
  validate_capacity_factor(capacity_factor, dropless or expert_capacity is not None)
  if expert_capacity is not None and (dropless or expert_capacity < 1):
    raise ValueError(f"expert_capacity={expert_capacity} must be >= 1, and only without dropless "
                     f"(dropless={dropless})")
  if dropless:
    return tokens_per_group
  if expert_capacity is not None:
    return min(tokens_per_group, expert_capacity)
  return compute_capacity(tokens_per_group, num_experts, capacity_factor, top_k)


# ----------------------------------------------------------------------------------------------------------
# Router inputs.


def router_logits(
    tokens: jax.Array,  # [G, S, M]
    kernel: jax.Array,  # [M, E]
    *,
    jitter_eps: float = 0.0,
    key: jax.Array | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:  # [G, S, E] in dtype
  """Router logits x W, with Switch's multiplicative jitter on the inputs.

  Jitter (Switch Sec. 2.4, "selective precision" table): during training the router input is multiplied
  by noise drawn from U[1 - eps, 1 + eps], elementwise. Pass `key=None` or `jitter_eps=0` at evaluation.
  `dtype` is the router's precision: float32 ("selective precision"), or bfloat16 for the ablation of Switch
  Table 2, where inputs, noise, kernel and the matmul's result are all bfloat16.
  """
  validate_jitter_eps(jitter_eps)
  x = tokens.astype(dtype)
  if jitter_eps > 0.0:
    if key is None:
      raise ValueError(f"jitter_eps={jitter_eps} > 0 needs a PRNG key (pass key=None only with jitter_eps=0)")
    x = x * jax.random.uniform(key, x.shape, jnp.float32, 1.0 - jitter_eps, 1.0 + jitter_eps).astype(dtype)
  return jnp.einsum("gsm,me->gse", x, kernel.astype(dtype), preferred_element_type=dtype)


# ----------------------------------------------------------------------------------------------------------
# Losses and metrics shared by all routers.


def load_balancing_loss(
    router_probs: jax.Array,  # [G, S, E] float32
    assignment_mask: jax.Array,  # [G, S, K, E] 1 where (token, choice) picks expert e, before capacity drops
) -> jax.Array:  # []
  """Switch eqs. 4-6: E * sum_i f_i * P_i, averaged over groups.

  f_i is the fraction of (token, choice) assignments routed to expert i (counted before capacity drops,
  as in Switch, and normalised over the K choices so that sum_i f_i = 1); P_i is the mean router
  probability of expert i. Gradients flow through P only. Uniform routing gives exactly 1.
  """
  num_experts = router_probs.shape[-1]
  counts = jnp.sum(assignment_mask.astype(jnp.float32), axis=(1, 2))  # [G, E]
  f = jax.lax.stop_gradient(counts / jnp.sum(counts, axis=-1, keepdims=True))  # [G, E]
  p = jnp.mean(router_probs, axis=1)  # [G, E]
  return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:  # [G, S, E] -> []
  """ST-MoE eq. 5 (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2; keeps logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def sequence_balance_loss(
    router_probs: jax.Array,  # [G, S, E] float32
    expert_index: jax.Array,  # [G, S, K] int32
    sequence_length: int,
) -> jax.Array:  # []
  """DeepSeek-V3's complementary sequence-wise balance loss (arXiv:2412.19437, eqs. 17-20) without its weight
  alpha, averaged over sequences: sum_i f_i P_i, f_i = E / (K L) * (tokens of the sequence choosing i),
  P_i = the sequence's mean of s'_i (`router_probs`: for sigmoid scores the normalised s' of eq. 19). 1.0 when
  balanced.

  E / (K L) * count_i is E times Switch's f_i, so this is `load_balancing_loss` taken over sequences instead of
  routing groups (the same number when every routing group is one sequence). Routing groups tile the flattened
  batch [B * L], so the tokens reshape into whole sequences. Choices are counted as selected (balancing bias and
  group limit included), before capacity drops, as eq. 18 counts the top-K.
  """
  num_experts, k = router_probs.shape[-1], expert_index.shape[-1]
  probs = router_probs.reshape(-1, sequence_length, num_experts)  # [B, L, E]
  chosen = jax.nn.one_hot(expert_index.reshape(-1, sequence_length, k), num_experts, dtype=jnp.float32)  # [B,L,K,E]
  return load_balancing_loss(probs, chosen)


def balancing_bias_update(
    bias: jax.Array,  # [E] float32
    expert_selection: jax.Array,  # [E] observed load: share of the assignments choosing each expert
    rate: float,
) -> jax.Array:  # [E]
  """DeepSeek-V3's auxiliary-loss-free balancing (arXiv:2412.19437, Sec. 2.1.2, after eq. 16): at the end of each
  training step every expert's selection bias moves by gamma = `rate` toward balance, b_i += gamma *
  sign(mean_j load_j - load_i): down when overloaded, up when underloaded. Outside the gradient."""
  load = jax.lax.stop_gradient(expert_selection)
  return bias + rate * jnp.sign(jnp.mean(load) - load)


# ----------------------------------------------------------------------------------------------------------
# Scores and expert selection of token-choice routing.


def _softmax_scores(logits: jax.Array) -> tuple[jax.Array, jax.Array]:  # [G, S, E] -> 2 x [G, S, E]
  """Switch eq. 1 / GShard: p = softmax(logits) over experts, both the scores and the distribution."""
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, probs


def _sigmoid_scores(logits: jax.Array) -> tuple[jax.Array, jax.Array]:  # [G, S, E] -> 2 x [G, S, E]
  """DeepSeek-V3 eq. 15: affinities s = sigmoid(u^T e_i), each in (0, 1) on its own (experts do not compete for
  one unit of probability); its distribution over experts is s normalised over all experts, s' of eq. 19."""
  scores = jax.nn.sigmoid(logits)
  return scores, scores / jnp.sum(scores, axis=-1, keepdims=True)


# moe.score_function -> f(logits [G, S, E] float32) = (scores s, which top-k ranks and combine weights are made of;
# router_probs, the distribution over experts that the losses and metrics read); moe.top_k.score_function.
SCORE_FUNCTIONS = {"softmax": _softmax_scores, "sigmoid": _sigmoid_scores}


def select_experts(
    scores: jax.Array,  # [G, S, E] float32
    *,
    k: int,
    bias: jax.Array | None = None,  # [E]
    num_expert_groups: int = 1,
    topk_expert_groups: int = 1,
    group_score: GroupScore = "max",
) -> tuple[jax.Array, jax.Array]:  # gates [G, S, K] float32, expert_index [G, S, K] int32
  """The k experts of each token and their gates, the unbiased scores s_i of the chosen experts.

  Top-k ranks s + b (DeepSeek-V3 eq. 16): the balancing bias b steers selection only, the gates stay s, so the bias
  enters neither the combine weights nor the gradient. Choices are sorted by decreasing s + b.

  Group-limited routing (DeepSeek-V2, arXiv:2405.04434, Sec. 2.2.3 device-limited routing; DeepSeek-V3 Sec.
  2.1.2 node-limited routing): the E experts form `num_expert_groups` groups of consecutive experts; each token
  keeps the `topk_expert_groups` groups of highest group score, the best s + b of the group (V2) or the sum of
  its two best (V3), and takes its k experts among theirs.
  """
  selection = scores if bias is None else scores + bias  # [G, S, E]
  if num_expert_groups > 1:
    num_experts = scores.shape[-1]
    per_group = num_experts // num_expert_groups
    # The router's own guard: the config checks moe.top_k too, but a direct caller's k beyond the kept experts
    # would silently pick masked ones.
    if k > topk_expert_groups * per_group:
      raise ValueError(f"k={k} must be <= topk_expert_groups * experts per group = {topk_expert_groups} * "
                       f"{per_group}")
    grouped = selection.reshape(*selection.shape[:-1], num_expert_groups, per_group)  # [G, S, N, E/N]
    if group_score == "max":
      group = jnp.max(grouped, axis=-1)  # [G, S, N]
    else:
      group = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, best = jax.lax.top_k(group, topk_expert_groups)  # [G, S, topk groups]
    kept = jnp.any(jax.nn.one_hot(best, num_expert_groups, dtype=bool), axis=-2)  # [G, S, N]
    selection = jnp.where(kept[..., None], grouped, -jnp.inf).reshape(selection.shape)
  _, expert_index = jax.lax.top_k(selection, k)  # [G, S, K]
  return jnp.take_along_axis(scores, expert_index, axis=-1), expert_index


def _metrics(
    router_probs: jax.Array,  # [G, S, E]
    expert_index: jax.Array,  # [G, S, K]
    kept: jax.Array,  # [G, S, K]
    wanted: jax.Array,  # [G, S, K] the router meant to dispatch this choice (policy kept it)
    capacity: int,
) -> RoutingMetrics:
  probs = jax.lax.stop_gradient(router_probs)
  num_experts = probs.shape[-1]
  dropped = wanted & ~kept
  token_wanted = jnp.any(wanted, axis=-1)
  token_dropped = token_wanted & ~jnp.any(kept, axis=-1)
  kept_per_expert = jnp.sum(
      jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * kept[..., None], axis=(1, 2)
  )  # [G, E]
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  wanted_per_expert = jnp.sum(
      jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * wanted[..., None], axis=(0, 1, 2)
  )  # [E]
  return RoutingMetrics(
      dropped_token_fraction=jnp.sum(token_dropped) / jnp.maximum(jnp.sum(token_wanted), 1),
      dropped_assignment_fraction=jnp.sum(dropped) / jnp.maximum(jnp.sum(wanted), 1),
      # One division of exact integer counts: jnp.mean multiplies by 1/G, which can round a full buffer
      # to 1.0000001.
      expert_load=jnp.sum(kept_per_expert, axis=0) / (kept_per_expert.shape[0] * capacity),
      router_entropy=jnp.mean(entropy),
      mean_top_gate=jnp.mean(jnp.max(probs, axis=-1)),
      expert_selection=wanted_per_expert / jnp.maximum(jnp.sum(wanted_per_expert), 1),
  )


# ----------------------------------------------------------------------------------------------------------
# Token-choice routers.


def _priority_order(top_gate: jax.Array) -> jax.Array:  # [G, S] -> [G, S]
  """Batch-prioritised routing (V-MoE, Riquelme et al. 2021, Sec. 3.1): tokens claim slots in order of
  decreasing top gate instead of position. Stable sort, so ties keep positional order."""
  return jnp.argsort(-top_gate, axis=1, stable=True)


def token_choice_slots(
    expert_index: jax.Array,  # [G, S, K] int32
    wanted: jax.Array,  # [G, S, K] bool: the (token, choice) claims a slot
    capacity: int,
    order: jax.Array | None = None,  # [G, S] tokens in claim order (batch prioritised); None: position order
) -> tuple[jax.Array, jax.Array]:  # slot [G, S, K] int32 (0 where dropped), kept [G, S, K] bool
  """Capacity slots of GShard Algorithm 1: each expert numbers the (token, choice) pairs that claim it in
  claim order (every first choice before any second choice; within a choice, tokens in `order`) and keeps
  the first `capacity`.

  Computed by one sort per group, O(S*K log(S*K)) work and [G, S*K] memory whatever E: the pairs are
  sorted by (expert, claim rank), so each expert's claims form one run and a pair's slot is its distance
  from the start of its run. (The textbook form, a running count over a [S*K, E] one-hot, is kept as the
  reference in `moe_jax.reference.token_choice_slots`.)
  """
  num_groups, tokens_per_group, k = expert_index.shape
  unclaimed = jnp.iinfo(jnp.int32).max  # sort key of pairs that claim nothing: after every expert
  position = jnp.arange(tokens_per_group, dtype=jnp.int32)
  if order is None:
    token_rank = jnp.broadcast_to(position, (num_groups, tokens_per_group))
  else:  # rank of each token in claim order: the inverse permutation of `order`
    token_rank = jnp.zeros_like(order).at[jnp.arange(num_groups)[:, None], order].set(position)
  claim_rank = jnp.arange(k, dtype=jnp.int32) * tokens_per_group + token_rank[:, :, None]  # [G, S, K]
  flat = lambda a: a.reshape(num_groups, tokens_per_group * k)
  expert_key = flat(jnp.where(wanted, expert_index, unclaimed))
  pair = jnp.broadcast_to(jnp.arange(tokens_per_group * k, dtype=jnp.int32), expert_key.shape)
  sorted_expert, _, sorted_pair = jax.lax.sort((expert_key, flat(claim_rank), pair), dimension=1, num_keys=2)
  index = jnp.arange(tokens_per_group * k, dtype=jnp.int32)
  run_start = jnp.concatenate(
      [jnp.ones((num_groups, 1), bool), sorted_expert[:, 1:] != sorted_expert[:, :-1]], axis=1
  )
  start = jax.lax.cummax(jnp.where(run_start, index, 0), axis=1)
  # A permutation: every pair is written exactly once, so the scatter is order-independent (deterministic).
  rank = jnp.zeros_like(pair).at[jnp.arange(num_groups)[:, None], sorted_pair].set(index - start)
  rank = rank.reshape(expert_index.shape)
  kept = wanted & (rank < capacity)
  return jnp.where(kept, rank, 0), kept


def top_k_route(
    logits: jax.Array,  # [G, S, E]
    *,
    k: int,
    capacity_factor: float | None = 1.0,
    dropless: bool = False,
    expert_capacity: int | None = None,
    renormalize: bool = False,
    batch_prioritized: bool = False,
    second_expert_policy: SecondExpertPolicy = "all",
    second_expert_threshold: float = 0.2,
    key: jax.Array | None = None,
    score_function: str = "softmax",
    routed_scaling: float = 1.0,
    selection_bias: jax.Array | None = None,  # [E]
    num_expert_groups: int = 1,
    topk_expert_groups: int = 1,
    group_score: GroupScore = "max",
    dtype: jnp.dtype = jnp.float32,
) -> RoutingResult:
  """Token-choice top-k routing with capacity (GShard Algorithm 1 generalised to k >= 1).

  Each token picks its k most probable experts. Capacity is claimed choice by choice: every token's first
  choice before any token's second choice (GShard), and within a choice in token order, or in order of
  decreasing top gate with `batch_prioritized`. An assignment beyond the expert's capacity is dropped
  (combine weight 0; the residual connection carries the token). The capacity comes from `capacity_factor`, or is
  the absolute `expert_capacity` (`token_choice_capacity`).

  Combine weights are the router probabilities p_e (GShard, Switch eq. 2) or, with `renormalize`, the
  probabilities renormalised over the k chosen experts, softmax over the top-k logits (Mixtral).

  `second_expert_policy='random'` (GShard Sec. 2.2): choices after the first are dispatched only with
  probability min(1, w / threshold), w being the choice's weight normalised over the k choices; needs `key`.
  A choice not dispatched by the policy claims no capacity and does not count as dropped.

  DeepSeek options (see `select_experts`): `score_function='sigmoid'` scores experts with DeepSeek-V3's sigmoid
  affinities s (eq. 15; `router_probs` are then s normalised over experts, eq. 19); with `renormalize` the weights
  are s_i / sum_topk s (eq. 13). `routed_scaling` multiplies every combine weight (DeepSeek-V3 model card,
  routed_scaling_factor 2.5). `selection_bias` [E] is the auxiliary-loss-free balancing bias, added to the scores
  for selection only (eq. 16); `num_expert_groups` > 1 limits each token to its best `topk_expert_groups` groups.

  `dtype` is the precision of the scores (softmax or sigmoid): float32, Switch's "selective precision"; or
  bfloat16 for the ablation of Switch Table 2, the whole probability computation rounded to bfloat16 (the
  index bookkeeping and the losses then read those rounded values in float32).
  """
  _check_logits(logits)
  num_groups, tokens_per_group, num_experts = logits.shape
  validate_top_k(k, num_experts)
  if second_expert_policy not in ("all", "random"):
    raise ValueError(f"second_expert_policy={second_expert_policy!r} must be one of 'all', 'random'")
  if second_expert_policy == "random":
    if not 0.0 < second_expert_threshold <= 1.0:
      raise ValueError(f"second_expert_threshold={second_expert_threshold} must be in (0, 1]")
    if key is None and k > 1:
      raise ValueError("second_expert_policy='random' needs a PRNG key")
  capacity = token_choice_capacity(tokens_per_group, num_experts, top_k=k, capacity_factor=capacity_factor,
                                   dropless=dropless, expert_capacity=expert_capacity)

  scores, probs = SCORE_FUNCTIONS[score_function](logits.astype(dtype))  # [G, S, E] each
  scores, probs, logits = scores.astype(jnp.float32), probs.astype(jnp.float32), logits.astype(jnp.float32)
  gates, expert_index = select_experts(
      scores, k=k, bias=selection_bias, num_expert_groups=num_expert_groups,
      topk_expert_groups=topk_expert_groups, group_score=group_score,
  )  # [G, S, K], sorted by decreasing score (+ bias)
  expert_index = expert_index.astype(jnp.int32)
  normalised = gates / jnp.sum(gates, axis=-1, keepdims=True)
  weights = routed_scaling * (normalised if renormalize else gates)

  wanted = jnp.ones(gates.shape, bool)
  if second_expert_policy == "random" and k > 1:
    draw = jax.random.uniform(key, gates.shape, jnp.float32)
    follow_up = jax.lax.stop_gradient(normalised) / second_expert_threshold > draw
    wanted = wanted.at[..., 1:].set(follow_up[..., 1:])

  order = _priority_order(gates[..., 0]) if batch_prioritized else None
  return _token_choice_result(logits, probs, expert_index, weights, wanted, capacity, order)


def _token_choice_result(
    logits: jax.Array,  # [G, S, E]
    probs: jax.Array,  # [G, S, E] float32: the probabilities the balancing loss and metrics read
    expert_index: jax.Array,  # [G, S, K] int32
    weights: jax.Array,  # [G, S, K] combine weight of each choice before capacity
    wanted: jax.Array,  # [G, S, K] bool: the choices that claim a slot
    capacity: int,
    order: jax.Array | None = None,  # [G, S] claim order (batch priority); None: position order
) -> RoutingResult:
  """The RoutingResult of token-choice routing once each token's K choices and weights are made: slots claimed
  in `order` up to `capacity`, weights of dropped choices zeroed, Switch's balancing loss (eq. 4) over the
  wanted choices and the z-loss of `logits`."""
  num_experts = logits.shape[-1]
  assignment = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * wanted[..., None]  # [G,S,K,E]
  slot, kept = token_choice_slots(expert_index, wanted, capacity, order)
  return RoutingResult(
      expert_index=expert_index,
      slot=slot,
      combine_weight=jnp.where(kept, weights, 0.0),
      kept=kept,
      router_probs=probs,
      load_balancing_loss=load_balancing_loss(probs, assignment),
      router_z_loss=router_z_loss(logits),
      metrics=_metrics(probs, expert_index, kept, wanted, capacity),
      num_experts=num_experts,
      capacity=capacity,
  )


def switch_route(
    logits: jax.Array,  # [G, S, E]
    *,
    capacity_factor: float | None = 1.0,
    dropless: bool = False,
    expert_capacity: int | None = None,
    batch_prioritized: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> RoutingResult:
  """Switch Transformer top-1 routing (Fedus et al. 2021, eqs. 1-3).

  Each token goes to its argmax expert i while the expert has room; the combine weight is p_i(x), the
  router probability of that expert (eq. 2), so the router is trained through the output scaling.
  Tokens over capacity are dropped and pass through the layer's residual connection. `expert_capacity` and
  `dtype` as in `top_k_route`: with an absolute capacity, one group per sequence and position order this is
  Hugging Face's `SwitchTransformersTop1Router` (a token is dropped when its expert already holds
  `expert_capacity` earlier tokens of the sequence).
  """
  return top_k_route(
      logits, k=1, capacity_factor=capacity_factor, dropless=dropless, expert_capacity=expert_capacity,
      batch_prioritized=batch_prioritized, dtype=dtype,
  )


def sparsemixer_route(
    logits: jax.Array,  # [G, S, E]
    *,
    jitter_eps: float,
    capacity_factor: float | None = 1.0,
    dropless: bool = False,
    expert_capacity: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> RoutingResult:
  """Phi-3.5-MoE's top-2 routing as `transformers` evaluates it (`sparsemixer` in
  `models/phimoe/modeling_phimoe.py`, the branch taken when not training; SparseMixer, Liu et al. 2023,
  arXiv:2310.00811; GRIN, Liu et al. 2024, arXiv:2409.12136). Always K = 2 choices, in a meaningful order:

    stage 1: i1 = argmax_j s_j; experts far from the max, (max s - s_j) / max(|s_j|, max s) > 2 * jitter_eps, are
             masked to -inf; w1 = softmax(masked s)[i1];
    stage 2: s' = s with s_i1 = -inf; i2 = argmax s'; mask by (max s' - s_j) / max(|s_j|, max s') > 2 * jitter_eps
             (|s_j| of the original logits); w2 = softmax(masked s')[i2].

  The weights are not renormalised: w1 + w2 lies in (0, 2], 1 + 1 when both stages keep only their own expert.
  `jitter_eps` is thus a threshold that shapes the weights at inference, not noise (Phi-3.5-MoE:
  `router_jitter_noise` 0.01).

  Training: the paper's estimator (Gumbel sampling of each stage's expert, the Heun third-order gradient
  through the choice) is not implemented. Training routes exactly as above, deterministically, and the router
  learns only through the two softmax weights by their plain gradient (the masks and choices carry none, as
  under `torch.no_grad` in `transformers`).

  Capacity as for `top_k_route` with k = 2 (every first choice claims a slot before any second choice, tokens in
  position order; `capacity_factor`, the absolute `expert_capacity`, or none with `dropless`; Phi-3.5-MoE drops
  nothing). `router_probs`, which the load-balancing loss and the metrics read, is the plain
  softmax over all E experts. `dtype`: the precision of the masks and softmaxes, as in `top_k_route`.
  """
  _check_logits(logits)
  num_groups, tokens_per_group, num_experts = logits.shape
  if num_experts < 2:
    raise ValueError(f"sparsemixer routes every token to 2 distinct experts: num_experts={num_experts} must be >= 2")
  if not 0.0 < jitter_eps < 1.0:
    raise ValueError(f"jitter_eps={jitter_eps} must be in (0, 1)")
  capacity = token_choice_capacity(tokens_per_group, num_experts, top_k=2, capacity_factor=capacity_factor,
                                   dropless=dropless, expert_capacity=expert_capacity)
  scores = logits.astype(dtype)
  magnitude = jnp.abs(scores)

  def stage(candidates: jax.Array) -> tuple[jax.Array, jax.Array]:  # [G, S, E] -> index, weight [G, S]
    top = jnp.max(candidates, axis=-1, keepdims=True)
    index = jnp.argmax(candidates, axis=-1)
    # The relative gap of every expert to this stage's max, against the original logits (as transformers does).
    far = jax.lax.stop_gradient((top - scores) / jnp.maximum(magnitude, top) > 2 * jitter_eps)
    gates = jax.nn.softmax(jnp.where(far, -jnp.inf, candidates), axis=-1)
    return index.astype(jnp.int32), jnp.take_along_axis(gates, index[..., None], axis=-1)[..., 0]

  first, first_weight = stage(scores)
  second, second_weight = stage(jnp.where(jax.nn.one_hot(first, num_experts, dtype=bool), -jnp.inf, scores))
  expert_index = jnp.stack([first, second], axis=-1)  # [G, S, 2]
  weights = jnp.stack([first_weight, second_weight], axis=-1).astype(jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1).astype(jnp.float32)
  return _token_choice_result(logits, probs, expert_index, weights, jnp.ones(expert_index.shape, bool), capacity)


# ----------------------------------------------------------------------------------------------------------
# Expert-choice router.


def expert_choice_route(
    logits: jax.Array,  # [G, S, E]
    *,
    capacity_factor: float = 1.0,
) -> RoutingResult:
  """Expert-choice routing (Zhou et al. 2022, eq. 1): each expert takes its top-C tokens by probability.

  S = softmax(X W_g) over experts; I, G = TopK(S^T, C) per expert. Perfect load balance by construction,
  a variable number of experts per token (0 to E), so the per-token "choices" axis is K = E: choice e is
  expert e, kept when expert e picked the token, with slot = its rank among the expert's picks.

  NON-CAUSAL: selection compares a token with all tokens of its group, future ones included. Fine for an
  encoder or for evaluation-free probing; an autoregressive decoder must not use it (the config validator
  of the training loop refuses it there).
  """
  _check_logits(logits)
  num_groups, tokens_per_group, num_experts = logits.shape
  capacity = compute_capacity(tokens_per_group, num_experts, capacity_factor, top_k=1)

  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
  _, picked = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C] token indices
  rank = jnp.full((num_groups, num_experts, tokens_per_group), capacity, jnp.int32)
  g = jnp.arange(num_groups)[:, None, None]
  e = jnp.arange(num_experts)[None, :, None]
  rank = rank.at[g, e, picked].set(jnp.arange(capacity, dtype=jnp.int32)[None, None, :])
  slot_full = jnp.swapaxes(rank, 1, 2)  # [G, S, E]
  kept = slot_full < capacity
  expert_index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), probs.shape)

  return RoutingResult(
      expert_index=expert_index,
      slot=jnp.where(kept, slot_full, 0),
      combine_weight=jnp.where(kept, probs, 0.0),
      kept=kept,
      router_probs=probs,
      # Balanced by construction (f_i = 1/E), so this is the constant 1 with zero gradient; kept for a
      # uniform training loop.
      load_balancing_loss=load_balancing_loss(probs, jax.nn.one_hot(expert_index, num_experts) * kept[..., None]),
      router_z_loss=router_z_loss(logits),
      metrics=_expert_choice_metrics(probs, expert_index, kept, capacity),
      num_experts=num_experts,
      capacity=capacity,
  )


def _expert_choice_metrics(
    probs: jax.Array, expert_index: jax.Array, kept: jax.Array, capacity: int
) -> RoutingMetrics:
  """Expert choice drops a token when no expert picks it; every expert fills exactly C slots."""
  base = _metrics(probs, expert_index, kept, kept, capacity)
  unpicked = jnp.mean(~jnp.any(kept, axis=-1))
  return dataclasses.replace(base, dropped_token_fraction=unpicked, dropped_assignment_fraction=unpicked)


# ----------------------------------------------------------------------------------------------------------
# Soft MoE.


@_pytree
class SoftRoutingResult:
  """Soft MoE's dense routing (Puigcerver et al. 2023, Sec. 2.1): P slots per expert, each a convex combination
  of the group's tokens, and each token's output a convex combination of all E * P slot outputs. Nothing is
  dropped; every weight is differentiable. Shapes use the module legend, P = slots per expert."""

  dispatch_weight: jax.Array  # [G, S, E, P] float32, D: softmax over the tokens S of each slot (column sums 1)
  combine_weight: jax.Array  # [G, S, E, P] float32, C: softmax over the E * P slots of each token (row sums 1)
  load_balancing_loss: jax.Array  # [] 1.0: every slot is full by construction (no loss to add, Sec. 2.2)
  router_z_loss: jax.Array  # [] 0.0: the paper uses no router loss; the normalised logits are bounded by `scale`
  metrics: RoutingMetrics
  num_experts: int = static()
  slots_per_expert: int = static()


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum x^2 + eps) along `axis`: unit vectors, and a zero vector stays zero instead of NaN."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def soft_moe_route(
    tokens: jax.Array,  # [G, S, M]
    phi: jax.Array,  # [M, E, P] slot parameters
    scale: jax.Array,  # [] learned scalar
) -> SoftRoutingResult:
  """Soft MoE routing (Puigcerver et al. 2023, Algorithm 1 and Sec. 2.3 "Normalization").

  logits[g, s, e, p] = scale * <l2_normalize(x_gs), l2_normalize(phi[:, e, p])>, both normalised over M;
  D = softmax over tokens s (eq. 1: slot (e, p) takes sum_s D[s, e, p] x_s as its input), C = softmax over all
  slots (e, p) (eq. 3: token s gets sum_{e,p} C[s, e, p] y_{e,p}). The normalisation with a learned scale
  (initialised to 1) keeps the logits from growing with d_model (the paper's fix for large models, Sec. 2.3);
  only the logits read normalised inputs, the slots mix the raw tokens (`moe_jax.dispatch.soft_dispatch`).

  NON-CAUSAL: every slot mixes the whole group (future tokens included), so only encoders may use it.
  Float32 whatever the input dtype ("selective precision").
  """
  if tokens.ndim != 3 or phi.ndim != 3 or tokens.shape[-1] != phi.shape[0]:
    raise ValueError(f"soft_moe_route needs tokens [G, S, M] and phi [M, E, P] with the same M; got shapes "
                     f"{tokens.shape} and {phi.shape}")
  _, _, num_experts, slots = (*tokens.shape[:2], *phi.shape[1:])
  validate_num_experts(num_experts)
  x = l2_normalize(tokens.astype(jnp.float32), axis=-1)
  phi = l2_normalize(phi.astype(jnp.float32), axis=0)
  logits = scale.astype(jnp.float32) * jnp.einsum("gsm,mep->gsep", x, phi)  # [G, S, E, P]
  dispatch_weight = jax.nn.softmax(logits, axis=1)
  flat = logits.reshape(*logits.shape[:2], num_experts * slots)  # [G, S, E*P]
  combine_weight = jax.nn.softmax(flat, axis=-1).reshape(logits.shape)
  return SoftRoutingResult(
      dispatch_weight=dispatch_weight,
      combine_weight=combine_weight,
      load_balancing_loss=jnp.ones((), jnp.float32),
      router_z_loss=jnp.zeros((), jnp.float32),
      metrics=_soft_metrics(combine_weight),
      num_experts=num_experts,
      slots_per_expert=slots,
  )


def _soft_metrics(combine_weight: jax.Array) -> RoutingMetrics:  # [G, S, E, P]
  """Nothing is dropped and every slot is full; entropy and top gate are those of each token's combine weights
  over the E * P slots, and an expert's selection is its share of the combine weight."""
  c = jax.lax.stop_gradient(combine_weight)
  num_experts = c.shape[2]
  flat = c.reshape(*c.shape[:2], -1)  # [G, S, E*P]
  per_expert = jnp.sum(c, axis=(0, 1, 3))  # [E]
  return RoutingMetrics(
      dropped_token_fraction=jnp.zeros((), jnp.float32),
      dropped_assignment_fraction=jnp.zeros((), jnp.float32),
      expert_load=jnp.ones((num_experts,), jnp.float32),
      router_entropy=jnp.mean(-jnp.sum(flat * jnp.log(jnp.maximum(flat, 1e-30)), axis=-1)),
      mean_top_gate=jnp.mean(jnp.max(flat, axis=-1)),
      expert_selection=per_expert / jnp.sum(per_expert),
  )


# ----------------------------------------------------------------------------------------------------------
# BASE layers: balanced assignment.


def sinkhorn(
    logits: jax.Array,  # [G, S, E]
    num_iterations: int,
) -> jax.Array:  # [G, S, E] log of a plan whose rows sum to 1 and (at convergence) columns to S/E
  """Log-domain Sinkhorn-Knopp: alternately normalise each token's row to mass 1 and each expert's column to mass
  S/E, the entropic relaxation of the balanced assignment (Cuturi 2013; used for BASE-style routing by S-BASE,
  Clark et al. 2022, arXiv:2202.01169). Ends on a row normalisation, so rows sum to 1 exactly."""
  tokens_per_group, num_experts = logits.shape[1:]
  column_mass = math.log(tokens_per_group / num_experts)

  def step(_, log_plan):
    log_plan = log_plan - jax.nn.logsumexp(log_plan, axis=1, keepdims=True) + column_mass
    return log_plan - jax.nn.logsumexp(log_plan, axis=2, keepdims=True)

  log_plan = logits - jax.nn.logsumexp(logits, axis=2, keepdims=True)
  return jax.lax.fori_loop(0, num_iterations, step, log_plan)


def balanced_assignment(
    scores: jax.Array,  # [G, S, E] float32, higher is better
) -> jax.Array:  # [G, S] int32 expert of each token; every expert takes exactly S / E tokens of each group
  """The balanced assignment that greedy by score gives, computed by deferred acceptance (no host loop).

  Every expert has room for S / E tokens. Tokens propose to experts in order of decreasing score; each expert
  tentatively holds its best proposers (by score, ties by position) up to its room and rejects the rest, who
  propose to their next expert, until every token is held (Gale & Shapley 1962, with capacities). Both sides
  rank a (token, expert) pair by the same score, so the result is the unique stable assignment, the one that
  taking pairs in order of decreasing score and keeping each one whose token is free and whose expert has room
  would give (`moe_jax.reference.balanced_assignment_greedy`). A greedy stand-in for the optimal linear
  assignment that BASE solves by an auction (Lewis et al. 2021, Sec. 2.2): on scores whose argmax is balanced it
  returns the argmax. Each round is one sort per group; rounds stop when every token is held (at most S * E).
  """
  num_groups, tokens_per_group, num_experts = scores.shape
  if tokens_per_group % num_experts:
    raise ValueError(f"tokens_per_group={tokens_per_group} must be a multiple of num_experts={num_experts} for a "
                     "balanced assignment (every expert takes S / E tokens)")
  room = tokens_per_group // num_experts
  preference = jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)  # [G, S, E] experts, best first
  everyone = jnp.ones((num_groups, tokens_per_group, 1), bool)

  def round_(state):
    holder, next_choice = state  # [G, S] expert holding the token (-1: free); [G, S] its next proposal's rank
    free = holder < 0
    # A free token always has an expert left to ask: S tokens fill the E * S / E places exactly.
    proposal = jnp.take_along_axis(preference, jnp.minimum(next_choice, num_experts - 1)[..., None], axis=-1)
    candidate = jnp.where(free, proposal[..., 0], holder)  # every token is a candidate of exactly one expert
    score = jnp.take_along_axis(scores, candidate[..., None], axis=-1)[..., 0]
    order = jnp.argsort(-score, axis=1, stable=True)
    rank, _ = token_choice_slots(candidate[..., None], everyone, tokens_per_group, order)  # 0 = expert's best
    holder = jnp.where(rank[..., 0] < room, candidate, -1)
    return holder, jnp.where(free, next_choice + 1, next_choice)

  start = (jnp.full((num_groups, tokens_per_group), -1, jnp.int32),
           jnp.zeros((num_groups, tokens_per_group), jnp.int32))
  holder, _ = jax.lax.while_loop(lambda state: jnp.any(state[0] < 0), round_, start)
  return holder


def base_route(
    logits: jax.Array,  # [G, S, E]
    *,
    balanced: bool,
    sinkhorn_iterations: int = 8,
) -> RoutingResult:
  """BASE layers routing (Lewis et al. 2021): one expert per token, gated by sigmoid(h_t . w_{a_t}) (Sec. 2.3).

  `balanced` (training, Sec. 2.2): the assignment maximises token-expert affinity under the constraint that
  every expert takes exactly S / E tokens of each group, so no load-balancing loss and no drops; here the
  affinities are first balanced by `sinkhorn_iterations` Sinkhorn steps, then `balanced_assignment` makes the
  assignment exact (S must be a multiple of E). Evaluation (`balanced=False`, Sec. 2.4): each token takes its
  argmax expert, unbalanced, nothing dropped (capacity S), which keeps decoding causal; the balanced training
  assignment, like the paper's, compares tokens within a group.

  The assignment is discrete and carries no gradient; the router learns through the sigmoid gate.
  """
  _check_logits(logits)
  _, tokens_per_group, num_experts = logits.shape
  if sinkhorn_iterations < 0:
    raise ValueError(f"sinkhorn_iterations={sinkhorn_iterations} must be >= 0")
  logits = logits.astype(jnp.float32)
  if balanced:
    plan = sinkhorn(jax.lax.stop_gradient(logits), sinkhorn_iterations)
    expert_index = balanced_assignment(plan)[..., None]  # [G, S, 1]
    capacity = tokens_per_group // num_experts
  else:
    expert_index = jnp.argmax(logits, axis=-1).astype(jnp.int32)[..., None]
    capacity = tokens_per_group
  wanted = jnp.ones(expert_index.shape, bool)
  slot, kept = token_choice_slots(expert_index, wanted, capacity)
  gate = jax.nn.sigmoid(jnp.take_along_axis(logits, expert_index, axis=-1))  # [G, S, 1]
  probs = jax.nn.softmax(logits, axis=-1)
  assignment = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
  return RoutingResult(
      expert_index=expert_index,
      slot=slot,
      combine_weight=jnp.where(kept, gate, 0.0),
      kept=kept,
      router_probs=probs,
      # Balanced in training (f_i = 1/E): the constant 1 with zero gradient, as for expert choice.
      load_balancing_loss=load_balancing_loss(probs, assignment),
      router_z_loss=router_z_loss(logits),
      metrics=_metrics(probs, expert_index, kept, wanted, capacity),
      num_experts=num_experts,
      capacity=capacity,
  )


# ----------------------------------------------------------------------------------------------------------
# Hash layers.

_HASH_MULTIPLIER = 0x9E3779B1  # 2^32 / golden ratio, odd: Knuth's multiplicative hash


def hash_experts(
    token_ids: jax.Array,  # [G, S] integer token ids >= 0
    num_experts: int,
) -> jax.Array:  # [G, S] int32
  """A fixed hash of the token id in [0, E): Knuth's multiplicative hash mod 2^32, its high bits folded into the
  low ones (x ^ x >> 16) so that `mod E` sees all of them. It stands in for the fixed random token-to-expert
  table of Roller et al. (2021, Sec. 3, "Random Hash"): deterministic, a function of the id alone, and close to
  uniform over a range of ids."""
  validate_num_experts(num_experts)
  h = token_ids.astype(jnp.uint32) * jnp.uint32(_HASH_MULTIPLIER)
  h = h ^ (h >> jnp.uint32(16))
  return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_route(
    token_ids: jax.Array,  # [G, S] integer token ids
    *,
    num_experts: int,
    capacity_factor: float | None = 1.0,
    dropless: bool = False,
    expert_capacity: int | None = None,
) -> RoutingResult:
  """Hash layers (Roller et al. 2021, eq. 1): token t goes to expert hash(id_t) with combine weight 1; no router
  is learned and no balancing loss is needed (the hash is fixed). Capacity as for Switch (position order; from
  the factor or the absolute `expert_capacity`), or none with `dropless` (the paper drops nothing).

  `router_probs` is the one-hot of the hashed expert, so `load_balancing_loss` (no gradient: nothing to learn)
  reports the imbalance E * sum_i f_i^2 of the hash on this batch: 1.0 when balanced, E when one expert takes all.
  """
  if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
    raise ValueError(f"token_ids must be integer [groups, tokens_per_group]; got {token_ids.dtype} "
                     f"{token_ids.shape}")
  tokens_per_group = token_ids.shape[1]
  capacity = token_choice_capacity(tokens_per_group, num_experts, capacity_factor=capacity_factor,
                                   dropless=dropless, expert_capacity=expert_capacity)
  expert_index = hash_experts(token_ids, num_experts)[..., None]  # [G, S, 1]
  wanted = jnp.ones(expert_index.shape, bool)
  slot, kept = token_choice_slots(expert_index, wanted, capacity)
  assignment = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G, S, 1, E]
  probs = assignment[:, :, 0].astype(jnp.float32)
  return RoutingResult(
      expert_index=expert_index,
      slot=slot,
      combine_weight=kept.astype(jnp.float32),
      kept=kept,
      router_probs=probs,
      load_balancing_loss=load_balancing_loss(probs, assignment),
      router_z_loss=jnp.zeros((), jnp.float32),
      metrics=_metrics(probs, expert_index, kept, wanted, capacity),
      num_experts=num_experts,
      capacity=capacity,
  )


# ----------------------------------------------------------------------------------------------------------
# Dense one-hot form for einsum dispatch.


def dispatch_and_combine_tensors(
    result: RoutingResult,
) -> tuple[jax.Array, jax.Array]:  # [G, S, E, C] bool, [G, S, E, C] float32
  """One-hot dispatch mask and combine tensor of GShard/Switch einsum dispatch.

  dispatch[g, s, e, c] = 1 iff token s of group g sits in slot c of expert e; combine holds its weight.
  Memory is G*S*E*C: fine for small groups on TPU, quadratic in S otherwise (see the gather backend).
  """
  expert_onehot = jax.nn.one_hot(result.expert_index, result.num_experts, dtype=jnp.float32)  # [G,S,K,E]
  slot_onehot = jax.nn.one_hot(result.slot, result.capacity, dtype=jnp.float32)  # [G,S,K,C]
  slot_onehot = slot_onehot * result.kept[..., None]
  combine = jnp.einsum("gske,gskc,gsk->gsec", expert_onehot, slot_onehot, result.combine_weight)
  dispatch = jnp.einsum("gske,gskc->gsec", expert_onehot, slot_onehot) > 0
  return dispatch, combine
