"""Decoder-only transformer language model with Switch (or any MoE) feed-forward layers.

Axis legend: B batch · L sequence length · M d_model · F d_ff · V vocabulary.

Architecture (Fedus et al. 2021, Sec. 2; a decoder-only variant of T5 as in their LM experiments):
pre-norm blocks x + Attn(Norm(x)), x + FFN(Norm(x)) (or post-norm x + Norm(Attn(x)), x + Norm(FFN(x)), OLMo 2:
`model.norm_position`), where FFN is a `MoeFeedForward` on every `moe_layer_interval`-th block from
`moe_start_block` on (Switch: every other block; DeepSeekMoE: every block but the first) and a dense `FeedForward`
elsewhere. Attention is multi-head or grouped-query (`num_kv_heads`), with the published families' options
(`layers.Attention`: rotary base and scaling, QK-norm, biases, qkv clipping, unscaled logits). The output
projection is untied `unembed` [M, V] or the tied embedding (scaled by M^-1/2 or not: `model.scale_tied_head`),
plus `unembed_bias` [V] with `model.lm_head_bias`.

Rematerialisation (`model.remat`, Chen et al. 2016, arXiv:1604.06174): each block's forward pass runs under
`nnx.remat`, so the backward pass recomputes the block's activations instead of keeping them: 'full' keeps only
each block's input, 'save_dots' also the matmul outputs (no batch dimension: jax's `dots_with_no_batch_dims_saveable`,
the dense projections; attention scores are recomputed). Same math and same values either way; 'none' (the
default) compiles the model as before.

Scanned blocks (`model.scan_layers`): the blocks repeat a pattern of `moe_layer_interval` blocks whose last is MoE
([dense, MoE] for Switch; one block for a dense model or MoE on every block). With scanning on, each pattern
position's parameters are stacked over the R = num_layers / period repetitions (leading logical axis 'layers')
and `nnx.scan` runs the pattern R times: one compiled loop body instead of num_layers copies (compile time and
program size independent of depth, as MaxText's scan_layers). `blocks_to_scanned` / `scanned_to_blocks` convert
parameter and checkpoint trees between the layouts; both compute the same function.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import layers, parallel
from moe_jax.config_lib import ModelConfig
from moe_jax.init import switch_init
from moe_jax.moe_layer import DTYPES, FeedForward, MoeAux, MoeFeedForward


@flax.struct.dataclass
class LmAux:
  """Auxiliary outputs of the MoE blocks: the summed losses the training loss adds, and each block's own."""

  load_balancing_loss: jax.Array  # [] sum over MoE blocks (Switch eq. 4 per block)
  router_z_loss: jax.Array  # [] sum over MoE blocks (ST-MoE eq. 5 per block)
  sequence_aux_loss: jax.Array  # [] sum over MoE blocks (DeepSeek-V3 eq. 17 per block, its alpha included)
  blocks: dict[int, MoeAux]  # block index -> that block's losses and routing metrics; {} for a dense model


# Where a block's norms sit (model.norm_position): 'pre' normalises each sublayer's input, x + f(Norm(x)) (T5,
# Llama, every MoE family); 'post' each sublayer's output, x + Norm(f(x)), with no norm before attention or the
# FFN (OLMo 2, Groeneveld/OLMo team 2024, arXiv:2501.00656 Sec. 3.2; the final norm stays).
NORM_POSITIONS = ("pre", "post")


def rope_of(cfg: ModelConfig) -> layers.Rope:
  """The rotary frequencies model.rope_theta and model.rope_scaling (with its model.rope_* fields) ask for."""
  return layers.Rope(
      theta=cfg.rope_theta, scaling=cfg.rope_scaling, factor=cfg.rope_scaling_factor,
      low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
      original_max_len=cfg.rope_original_max_len, short_factor=cfg.rope_short_factor,
      long_factor=cfg.rope_long_factor, short_mscale=cfg.rope_short_mscale, long_mscale=cfg.rope_long_mscale)


class Block(nnx.Module):
  """One transformer block, pre-norm x + Attn(Norm(x)), x + FFN(Norm(x)) (norms `attention_norm`, `ffn_norm`)
  or post-norm x + Norm(Attn(x)), x + Norm(FFN(x)) (norms `attention_out_norm`, `ffn_out_norm`); the FFN is
  dense or a mixture of experts."""

  def __init__(self, cfg: ModelConfig, *, use_moe: bool, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.post_norm = cfg.norm_position == "post"
    norm = lambda: layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)  # noqa: E731
    if not self.post_norm:
      self.attention_norm = norm()
    self.attention = layers.CausalSelfAttention(
        cfg.d_model, cfg.num_heads, cfg.head_dim, num_kv_heads=cfg.kv_heads, init_scale=cfg.init_scale,
        rope=rope_of(cfg), scale_logits=cfg.scale_attention, bias=cfg.attention_bias, qk_norm=cfg.qk_norm,
        clip_qkv=cfg.clip_qkv, norm_eps=cfg.norm_eps, dropout=cfg.dropout, dtype=dtype, rngs=rngs,
    )
    if self.post_norm:
      self.attention_out_norm = norm()
    else:
      self.ffn_norm = norm()
    self.use_moe = use_moe
    if use_moe:
      self.ffn = MoeFeedForward(
          cfg.d_model, cfg.expert_d_ff, cfg.moe, shared_d_ff=cfg.shared_d_ff, activation=cfg.activation,
          init_scale=cfg.init_scale, dtype=dtype, rngs=rngs,
      )
    else:
      self.ffn = FeedForward(
          cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=cfg.dropout, init_scale=cfg.init_scale,
          dtype=dtype, rngs=rngs,
      )
    if self.post_norm:
      self.ffn_out_norm = norm()
    self.residual_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool, token_ids: jax.Array | None = None):
    """x [B, L, M] -> ([B, L, M], aux | None); token_ids [B, L] only when the MoE router reads them (hash)."""
    if self.post_norm:
      x = x + self.attention_out_norm(self.attention(x, deterministic=deterministic)).astype(x.dtype)
      h = x
    else:
      x = x + self.attention(self.attention_norm(x), deterministic=deterministic)
      h = self.ffn_norm(x)
    if self.use_moe:
      y, aux = self.ffn(h, deterministic=deterministic, token_ids=token_ids)
    else:
      y, aux = self.ffn(h, deterministic=deterministic), None
    if self.post_norm:
      y = self.ffn_out_norm(y).astype(x.dtype)
    return x + self.residual_dropout(y, deterministic=deterministic), aux


# model.remat -> the jax.checkpoint policy of what a block keeps for the backward pass (None: keep everything).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_block(block: Block, x: jax.Array, deterministic: bool, remat: str, token_ids: jax.Array | None = None):
  """`block(x)`, under `nnx.remat` with the policy of `remat` unless 'none' (nnx.remat carries the block's state
  changes, RNG counters and DeepSeek-V3's router bias, out of the checkpointed function). Differentiate through it
  with nnx.grad / nnx.value_and_grad, as the training step does. `token_ids` [B, L]: for hash routing only."""
  if remat == "none":
    return block(x, deterministic=deterministic, token_ids=token_ids)
  run = lambda block, x, token_ids: block(x, deterministic=deterministic, token_ids=token_ids)  # noqa: E731
  return nnx.remat(run, policy=REMAT_POLICIES[remat])(block, x, token_ids)


class BlockPattern(nnx.Module):
  """One repetition of the block pattern that `model.scan_layers` scans over: `period` blocks, the last one MoE
  when the model has MoE blocks (Switch: [dense, MoE])."""

  def __init__(self, cfg: ModelConfig, period: int, *, rngs: nnx.Rngs):
    moe = cfg.moe_layer_interval > 0
    self.blocks = nnx.List([Block(cfg, use_moe=moe and j == period - 1, rngs=rngs) for j in range(period)])
    self.remat = cfg.remat

  def __call__(self, x: jax.Array, deterministic: bool):  # [B, L, M] -> ([B, L, M], (aux of each MoE block,))
    auxes = []
    for block in self.blocks:
      x = parallel.constrain(x, ("batch", "length", "activation_embed"))
      x, aux = _run_block(block, x, deterministic, self.remat)
      if aux is not None:
        auxes.append(aux)
    return x, tuple(auxes)


class TransformerLM(nnx.Module):
  """Decoder-only LM: tokens [B, L] -> logits [B, L, V] (float32) and the MoE auxiliary outputs."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, dtype=DTYPES[cfg.dtype], rngs=rngs)
    moe_layers = set(cfg.moe_layers)
    if cfg.scan_layers:
      # Parameters of each pattern position stacked over the repetitions, [R, ...], logical axis 'layers' first.
      period = cfg.moe_layer_interval or 1

      @nnx.split_rngs(splits=cfg.num_layers // period)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(rngs):
        return BlockPattern(cfg, period, rngs=rngs)

      self.scanned = create(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, use_moe=i in moe_layers, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.input_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    if not cfg.tie_embeddings:
      init = nnx.with_partitioning(switch_init(cfg.init_scale), ("embed", "vocab"))
      self.unembed = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size)))
    if cfg.lm_head_bias:
      init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",))
      self.unembed_bias = nnx.Param(init(rngs.params(), (cfg.vocab_size,)))

  def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, LmAux]:
    if tokens.shape[1] > self.config.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={self.config.max_seq_len}")
    x = self.input_dropout(self.embed(tokens), deterministic=deterministic)
    auxes = {}
    if self.config.scan_layers:  # validation refuses hash routing here: scanned blocks get no token ids
      x, auxes = self._scanned_blocks(x, deterministic)
    else:
      # Only a router that reads token ids (hash layers) gets them; the others never see them.
      token_ids = tokens if self.config.moe is not None and self.config.moe.needs_token_ids else None
      for index, block in enumerate(self.blocks):
        x = parallel.constrain(x, ("batch", "length", "activation_embed"))  # tokens stay split between blocks
        x, aux = _run_block(block, x, deterministic, self.config.remat, token_ids)
        if aux is not None:
          auxes[index] = aux
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      logits = self.embed.attend(x, scaled=self.config.scale_tied_head)
    else:
      logits = jnp.einsum("blm,mv->blv", x.astype(jnp.float32), self.unembed[...])
    if self.config.lm_head_bias:
      logits = logits + self.unembed_bias[...]
    return logits, sum_aux(auxes)


  def _scanned_blocks(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, dict[int, MoeAux]]:
    """The blocks as one loop over the pattern's repetitions; the MoE auxes by block index, as unscanned."""
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(x, pattern):
      return pattern(x, deterministic)

    x, stacked = body(x, self.scanned)  # stacked: (aux [R, ...] of the pattern's MoE block,) or ()
    period = self.config.moe_layer_interval or 1
    auxes = {}
    for r in range(self.config.num_layers // period):
      for aux in stacked:  # at most one MoE block per pattern, its last
        auxes[r * period + period - 1] = jax.tree.map(lambda a, r=r: a[r], aux)
    return x, auxes


def blocks_to_scanned(tree: dict, num_layers: int, period: int) -> dict:
  """A pure-dict state tree (`nnx.to_pure_dict`: parameters, a checkpoint's params or optimizer moments) of an
  unscanned model -> that of the scanned model: {'blocks': {i: ...}} becomes {'scanned': {'blocks': {j: ...}}}
  with block r * period + j at index r of every leaf. Other keys are kept; applied at every depth, so optimizer
  states (which nest parameter trees) convert too."""
  if not isinstance(tree, dict):
    return tree
  out = {k: blocks_to_scanned(v, num_layers, period) for k, v in tree.items() if k != "blocks"}
  if "blocks" in tree:
    blocks = tree["blocks"]
    out["scanned"] = {"blocks": {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                                                 *[blocks[r * period + j] for r in range(num_layers // period)])
                                 for j in range(period)}}
  return out


def scanned_to_blocks(tree: dict, num_layers: int, period: int) -> dict:
  """The inverse of `blocks_to_scanned`."""
  if not isinstance(tree, dict):
    return tree
  out = {k: scanned_to_blocks(v, num_layers, period) for k, v in tree.items() if k != "scanned"}
  if "scanned" in tree:
    stacked = tree["scanned"]["blocks"]
    out["blocks"] = {r * period + j: jax.tree.map(lambda a, r=r: a[r], stacked[j])
                     for r in range(num_layers // period) for j in range(period)}
  return out


def sum_aux(auxes: dict[int, MoeAux]) -> LmAux:
  """The model's auxiliary outputs from its MoE blocks' (`auxes`, by block index): each loss summed over the
  blocks, the blocks kept for their metrics (the decoder LM's and the encoder-decoder's both)."""
  zero = jnp.zeros((), jnp.float32)
  return LmAux(
      load_balancing_loss=sum((a.load_balancing_loss for a in auxes.values()), zero),
      router_z_loss=sum((a.router_z_loss for a in auxes.values()), zero),
      sequence_aux_loss=sum((a.sequence_aux_loss for a in auxes.values()), zero),
      blocks=auxes,
  )
