"""The experiment config schema: every field declared once, with its type, default, valid range and meaning.

A config has a `seed` and five sections, each a frozen dataclass below: `model`, `moe`, `data`, `train`, `mesh`.
Each field is declared once, with `field(default, rule, doc)`. From that one declaration come:
  * `default_config()`: the `ml_collections.ConfigDict` that every file in `configs/` starts from and that
    `--config.section.field=value` overrides;
  * validation: building a section (`MoeConfig(...)`) or `typed(config)` raises `ValueError` naming
    `section.field`, its value and its valid range;
  * the typed objects that the model and the trainer receive (`typed`, `model_config`);
  * `docs/config.md` (`config_docs()`; tests/test_config.py checks that it is current).
Rules that relate several fields of a section are its `_check` method, next to the fields; rules across
sections are `ExperimentConfig._check`. Rules that need the machine (device count) or the tokenizer are applied
where those are known, in `moe_jax.resolve`. Modules deeper down receive already-valid typed configs and do not
check the same ranges again.

The field vocabulary (`field`, the rules, `Section`) is `moe_jax.schema`. Fields that choose an implementation
(dispatch backend, activation, norm, ...) draw from the names `moe_jax.registry` declares, and `moe.router` from
the router families of `moe_jax.routers`, each of which also declares its options section `moe.<router>`: this
module imports no model or training code (no flax, optax or orbax), so validating a config builds nothing.

Saved configs of earlier versions (a checkpoint's or a run's config.json, a committed sweep's overrides) name
fields that have moved since; `migrate` rewrites them by the one table `RENAMED` before they are read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from moe_jax import registry, routers
from moe_jax.routers import family as family_lib
from moe_jax.schema import (Rule, Section, at_least, boolean, choice, config_fields, field, finite, float_at_least,
                            in_range, non_negative, one_of, positive, text)

if TYPE_CHECKING:
  import ml_collections

# ml_collections is imported where ConfigDicts are made, not here: the typed sections (MoeConfig, ModelConfig)
# are all the model needs, and a machine without ml_collections (benchmarks/gpu.py) can still build the model.


# ----------------------------------------------------------------------------------------------------------
# The sections.


@dataclasses.dataclass(frozen=True)
class MoeConfig(Section):
  """An MoE feed-forward layer (used where model.moe_layer_interval > 0).

  `router` names a router family of `moe_jax.routers` (listed below the table), which declares its own options
  as the section `moe.<router>` (e.g. `moe.top_k.k`, `moe.soft_moe.slots_per_expert`) and which of the options
  shared by several routers it reads (capacity factors, dropless, batch_prioritized, jitter, router precision).
  A non-default value of an option the chosen router does not read, or in another router's section, is refused:
  nothing is silently ignored. 'expert_choice' and 'soft_moe' are non-causal: encoder layers only (MoeFeedForward
  causal=False; the encoder-decoder's decoder stack routes with `decoder_router`).
  """

  NAME: ClassVar[str] = "moe"
  num_experts: int = field(8, at_least(1), "experts E per MoE layer")
  router: str = field("switch", one_of(routers.names), "routing algorithm: a router family of moe_jax.routers")
  capacity_factor: float = field(1.25, finite(), "training capacity factor; > 0 unless dropless")
  # Mesh-TensorFlow MoE: 1.25 in training, 2.0 in evaluation.
  eval_capacity_factor: float = field(2.0, finite(), "evaluation capacity factor; > 0 unless dropless")
  dropless: bool = field(False, boolean(), "no capacity limit: no token is ever dropped")
  expert_capacity: int = field(0, at_least(0), "absolute slots per expert and routing group, in training and "
                               "evaluation alike (Hugging Face Switch Transformers' expert_capacity, 64 in "
                               "switch-base-8); 0 = from the capacity factors; token-choice routers, not dropless")
  batch_prioritized: bool = field(False, boolean(), "tokens with higher top gate claim capacity first (V-MoE BPR)")
  jitter_eps: float = field(0.0, in_range(0, 1), "multiplicative router-input noise U[1-eps, 1+eps] in training")
  dispatch: str = field("gather", choice("dispatch"), "token dispatch backend requested (resolve picks the one run)")
  expert_dropout: float = field(0.0, in_range(0, 1), "dropout inside experts (Switch Table 4), training only")
  group_size: int = field(0, at_least(0), "tokens per routing group; 0: one group per sequence")
  # Ablation of Switch "selective precision" (Sec. 2.4, Table 2): bfloat16 computes the whole router, the logits'
  # matmul and the softmax, in bfloat16.
  router_dtype: str = field("float32", choice("dtype"), "router precision, softmax included (Switch selective "
                            "precision)")
  expert_d_ff: int = field(0, at_least(0), "hidden width of each routed expert; 0 = model.d_ff (fine-grained "
                           "experts: narrower, DeepSeekMoE)")
  num_shared_experts: int = field(0, at_least(0), "experts every token passes through beside the routed ones "
                                  "(DeepSeekMoE shared experts)")
  shared_expert_d_ff: int = field(0, at_least(0), "hidden width of each shared expert; 0 = the routed experts'")
  shared_expert_gate: bool = field(False, boolean(), "scale the shared experts' output by sigmoid(x . w_gate), w_gate "
                                   "[M, 1] learned (Qwen1.5/Qwen2-MoE); needs num_shared_experts >= 1")
  check_router_inputs: bool = field(False, boolean(), "debug: report NaN/inf router inputs on stderr (host callback)")
  decoder_router: str = field("", one_of(lambda: ("",) + tuple(n for n in routers.names() if routers.get(n).causal)),
                              "encoder-decoder only: the router of the decoder stack's MoE layers ('' = moe.router), "
                              "which must be causal; lets 'expert_choice' or 'soft_moe' route the encoder")
  # moe.<router>.*: the options section of every router family that has one, in `routers.FAMILIES` order. Given as
  # a mapping {router: section or mapping of its fields} (missing ones take their defaults); held as a tuple so
  # that the config stays hashable (the layer keeps it as a static attribute).
  options: tuple[Section, ...] = dataclasses.field(default=())

  def __post_init__(self):
    given = dict(self.options) if isinstance(self.options, Mapping) else {type(s).NAME[len("moe."):]: s
                                                                         for s in self.options}
    sections = MoeConfig.option_sections()
    for name in given:
      if name not in sections:
        raise ValueError(f"unknown config field 'moe.{name}'; router options sections are "
                         + ", ".join(f"moe.{n}" for n in sections))
    object.__setattr__(self, "options", tuple(_as_section(cls, given.get(name, {})) for name, cls in sections.items()))
    super().__post_init__()

  @staticmethod
  def option_sections() -> dict[str, type[Section]]:
    """router -> its options section class, for the routers registered now."""
    return {name: f.options for name, f in routers.FAMILIES.items() if f.options is not None}

  def _check(self) -> None:
    """`decoder_router` (encoder-decoder only, see `ExperimentConfig`) differs from `router` when set; the router
    family's own rules (`RouterFamily.check`, listed with its section below); a shared option the router does not
    read, or a section of a router not used, keeps its default; capacity factors > 0 unless dropless; a dropless
    dispatch ('dropless', 'ragged_dot', 'auto') needs dropless=True; `expert_capacity` > 0 needs dropless=False
    (and a router that reads it); `shared_expert_gate` needs `num_shared_experts` >= 1."""
    if self.decoder_router == self.router:
      raise ValueError(f"moe.decoder_router={self.decoder_router!r} repeats moe.router; leave it '' (the default)")
    used = (self.router, self.decoder_router) if self.decoder_router else (self.router,)
    for name in used:  # the family's own rules first: they name what the router needs (Soft MoE: dispatch)
      routers.get(name).check(self, self.options_of(name))
    reads = {option for name in used for option in routers.get(name).reads}
    for option in family_lib.SHARED_OPTIONS:
      value, default = getattr(self, option), MoeConfig.__dataclass_fields__[option].default
      if option not in reads and value != default:
        raise ValueError(f"moe.{option}={value!r} is not read by moe.router={self.router!r}"
                         + (f" nor moe.decoder_router={self.decoder_router!r}" if self.decoder_router else "")
                         + f"; leave it at {default!r}")
    for options in self.options:
      name = type(options).NAME[len("moe."):]
      changed = [f.name for f in config_fields(type(options)) if getattr(options, f.name) != f.default]
      if name not in used and changed:
        raise ValueError(f"moe.{name}.{changed[0]}={getattr(options, changed[0])!r} is an option of router {name!r}, "
                         f"which this config does not use (moe.router={self.router!r}); leave it at its default")
    if self.expert_capacity and self.dropless:
      raise ValueError(f"moe.expert_capacity={self.expert_capacity} needs moe.dropless=False (dropless routing has "
                       "no capacity); leave it at 0")
    if self.shared_expert_gate and not self.num_shared_experts:
      raise ValueError("moe.shared_expert_gate=True gates the shared experts: it needs moe.num_shared_experts >= 1 "
                       "(got 0)")
    if "capacity_factor" in reads and not self.dropless:
      for name in ("capacity_factor", "eval_capacity_factor"):
        if getattr(self, name) <= 0:
          raise ValueError(f"moe.{name}={getattr(self, name)} must be > 0 (or set moe.dropless=True)")
    if self.dispatch in registry.names("dropless_dispatch") and not self.dropless:
      raise ValueError(f"moe.dispatch={self.dispatch!r} needs dropless=True (capacity routing drops; use "
                       "'gather' or 'einsum')")

  def options_of(self, router: str) -> Section | None:
    """The options section of `router` (None for a router without options)."""
    return next((s for s in self.options if type(s).NAME == f"moe.{router}"), None)

  @property
  def family(self) -> family_lib.RouterFamily:
    """The router family of `router` (moe_jax.routers)."""
    return routers.get(self.router)

  @property
  def router_options(self) -> Section | None:
    """The options section of the chosen router, `moe.<router>`."""
    return self.options_of(self.router)

  def decoder_stack(self) -> "MoeConfig":
    """The MoE config of the encoder-decoder's decoder stack: `decoder_router` in place of `router`, the encoder
    router's options section back at its defaults; itself when `decoder_router` is ''."""
    if not self.decoder_router:
      return self
    options = {type(s).NAME[len("moe."):]: s for s in self.options if type(s).NAME != f"moe.{self.router}"}
    return dataclasses.replace(self, router=self.decoder_router, decoder_router="", options=options)

  def capacity(self, tokens_per_group: int, *, training: bool) -> int | None:
    """Slots per expert and routing group of S = `tokens_per_group` tokens (min(S, `expert_capacity`) when that is
    set); None where the router has none."""
    return self.family.capacity(self, self.router_options, tokens_per_group, training)

  @property
  def needs_token_ids(self) -> bool:
    """Whether the router reads token ids instead of (only) token features: Hash layers."""
    return self.family.needs_token_ids

  @property
  def needs_rng(self) -> bool:
    """Whether a training call draws noise."""
    return self.jitter_eps > 0 or self.expert_dropout > 0 or self.family.draws_noise(self.router_options)


def _as_section(cls: type[Section], value: Section | Mapping[str, Any]) -> Section:
  """A nested section from itself or from a mapping of its fields (missing ones take their defaults)."""
  if isinstance(value, cls):
    return value
  values = value.to_dict() if hasattr(value, "to_dict") else dict(value)
  known = {f.name for f in config_fields(cls)}
  for name in values:
    if name not in known:
      raise ValueError(f"unknown config field {cls.path(name)!r}; known fields are listed in docs/config.md")
  return cls(**values)


# A tuple of numbers > 0 (a list too: config.json holds JSON arrays; ModelConfig keeps a tuple), each as
# `positive()` checks one: in float32, where the rotary frequencies are computed.
_POSITIVE_TUPLE = Rule(
    (tuple, list),
    lambda v: all(isinstance(f, (int, float)) and not isinstance(f, bool) and positive().ok(f) for f in v),
    lambda: f"a tuple of numbers each {positive().allowed()}")

# The rotary-scaling fields each model.rope_scaling reads; the others must keep their defaults.
_ROPE_SCALING_READS = {
    "none": (),
    "llama3": ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"),
    "longrope": ("rope_original_max_len", "rope_short_factor", "rope_long_factor", "rope_short_mscale",
                 "rope_long_mscale"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
  """The model's hyper-parameters; `moe` is attached by `model_config` when the model has MoE blocks.

  `architecture` 'decoder' is the decoder-only LM (moe_jax.model); 'encoder_decoder' is T5's (moe_jax.encdec):
  `num_layers` encoder blocks and `num_decoder_layers` decoder blocks, the MoE interval applied to each stack.
  """

  NAME: ClassVar[str] = "model"
  architecture: str = field("decoder", choice("architecture"), "decoder-only LM, or T5's encoder-decoder")
  vocab_size: int = field(0, at_least(0), "vocabulary size; 0 takes the tokenizer's")
  # The defaults are the cpu size of configs/lm.py: 4 blocks of width 128 on bytes; paper sizes live there.
  d_model: int = field(128, at_least(1), "residual width M")
  num_heads: int = field(4, at_least(1), "attention heads H")
  num_kv_heads: int = field(0, at_least(0), "key/value heads K of grouped-query attention; 0 = num_heads "
                            "(multi-head), 1 = multi-query; must divide num_heads")
  head_dim: int = field(32, Rule((int,), lambda v: v >= 2 and v % 2 == 0, lambda: "an even integer >= 2"),
                        "attention head dimension D (rotary embedding rotates feature pairs)")
  d_ff: int = field(512, at_least(1), "hidden width F of every FFN and expert")
  num_layers: int = field(4, at_least(1), "transformer blocks (encoder-decoder: encoder blocks)")
  num_decoder_layers: int = field(0, at_least(0), "encoder-decoder only: decoder blocks; 0 = num_layers")
  max_seq_len: int = field(256, at_least(1), "longest sequence the model accepts")
  moe_layer_interval: int = field(2, at_least(0), "0: dense model; N: every N-th block's FFN is a MoE layer (Switch: 2)")
  moe_start_block: int = field(0, at_least(0), "blocks before this one stay dense; MoE every moe_layer_interval-th "
                               "block from it on (DeepSeekMoE: 1, DeepSeek-V3: 3)")
  norm: str = field("rmsnorm", choice("norm"), "norm layer: rmsnorm (T5, Llama), layernorm (scale and bias; "
                    "Phi-3.5), layernorm_nobias (scale only; DBRX), layernorm_noparam (no parameters; OLMo)")
  norm_eps: float = field(1e-6, positive(), "epsilon of every norm (T5, Switch, Qwen: 1e-6; Mixtral, OLMoE, "
                          "DBRX, Phi-3.5: 1e-5)")
  norm_position: str = field("pre", choice("norm_position"), "pre: x + f(Norm(x)); post: x + Norm(f(x)), no norm "
                             "before attention or FFN (OLMo 2; decoder LM only)")
  rope_theta: float = field(10_000.0, positive(), "rotary base theta: feature pair j turns by theta^(-2j/D) per "
                            "position (Mixtral, Qwen: 1e6; DBRX: 5e5)")
  rope_scaling: str = field("none", choice("rope_scaling"), "long-context rotary scaling: none, llama3 (Llama 3.1 "
                            "frequency interpolation), longrope (per-pair factors and attention factor; Phi-3)")
  rope_scaling_factor: float = field(8.0, positive(), "llama3: low frequencies divided by it")
  rope_low_freq_factor: float = field(1.0, positive(), "llama3: wavelengths above original_max_len / it are "
                                      "divided by rope_scaling_factor")
  rope_high_freq_factor: float = field(4.0, positive(), "llama3: wavelengths below original_max_len / it are kept; "
                                       "> rope_low_freq_factor")
  rope_original_max_len: int = field(0, at_least(0), "llama3, longrope: the pre-training context length "
                                     "(original_max_position_embeddings); > 0 for them")
  rope_short_factor: tuple[float, ...] = field((), _POSITIVE_TUPLE, "longrope: head_dim / 2 frequency divisors for "
                                               "sequences up to rope_original_max_len")
  rope_long_factor: tuple[float, ...] = field((), _POSITIVE_TUPLE, "longrope: head_dim / 2 frequency divisors for "
                                              "longer sequences")
  rope_short_mscale: float = field(1.0, positive(), "longrope: cos/sin factor up to rope_original_max_len")
  rope_long_mscale: float = field(1.0, positive(), "longrope: cos/sin factor for longer sequences")
  qk_norm: str = field("none", choice("qk_norm"), "RMSNorm (eps norm_eps, learned scale) on queries and keys before "
                       "rotary: per_head over D, one scale shared by the heads (Qwen3); full over the whole "
                       "projected q and k (OLMoE, OLMo 2)")
  attention_bias: str = field("none", choice("attention_bias"), "biases on the q/k/v projections (qkv: Qwen2) and "
                              "also the output projection (qkvo: Phi-3.5)")
  clip_qkv: float = field(0.0, non_negative(), "clamp q, k, v to [-c, c] after the projection, bias and QK-norm "
                          "(DBRX: 8); 0 = off")
  scale_attention: bool = field(True, boolean(), "divide attention logits by sqrt(head_dim); False: unscaled "
                                "(T5, Switch)")
  scale_tied_head: bool = field(True, boolean(), "tied output projection multiplies by d_model^-1/2 (T5, Switch); "
                                "False: plain h E^T (Llama, Qwen, OLMo)")
  lm_head_bias: bool = field(False, boolean(), "a bias [V] on the output projection (Phi-3.5)")
  activation: str = field("gelu", choice("activation"), "FFN activation; geglu/swiglu are gated (T5.1.1)")
  tie_embeddings: bool = field(False, boolean(), "share input embedding and output projection")
  dropout: float = field(0.0, in_range(0, 1), "dropout on residual branches and dense FFNs")
  init_scale: float = field(0.1, positive(), "Switch init: truncated normal with variance init_scale / fan_in")
  dtype: str = field("float32", choice("dtype"), "activation dtype (params and router stay float32)")
  positions: str = field("rotary", choice("positions"), "position scheme: rotary (decoder LM) or T5's learned "
                         "relative position buckets (encoder-decoder only)")
  relative_buckets: int = field(32, Rule((int,), lambda v: v >= 2 and v % 2 == 0, lambda: "an even integer >= 2"),
                                "relative positions: buckets per direction pair (T5: 32)")
  relative_max_distance: int = field(128, at_least(2), "relative positions: distance from which all share the "
                                     "last bucket (T5: 128)")
  scan_layers: bool = field(False, boolean(), "run the repeated block pattern (moe_layer_interval blocks, the last "
                            "one MoE) under nnx.scan: one compiled loop body instead of num_layers copies")
  remat: str = field("none", choice("remat"), "rematerialise each block in the backward pass: none, full (keep "
                     "only block inputs) or save_dots (also keep the dense matmuls' outputs); same values")
  moe: MoeConfig | None = None  # derived: the moe section when moe_layer_interval > 0

  def __post_init__(self):
    for f in config_fields(type(self)):  # JSON lists (config.json, ConfigDicts read from it) -> tuples: hashable
      if isinstance(getattr(self, f.name), list):
        object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
    super().__post_init__()

  def _check(self) -> None:
    """`num_kv_heads` divides `num_heads`; `moe_start_block + moe_layer_interval <= num_layers` (at least one
    MoE block) when `moe_layer_interval > 0`; the decoder LM has rotary positions and no `num_decoder_layers`;
    relative positions need `relative_max_distance > relative_buckets / 2` (exact buckets below it); `scan_layers`
    needs no dense first blocks and `num_layers` a multiple of the block pattern (`moe_layer_interval` blocks, 1
    for a dense model). The rotary fields (`rope_*`) need rotary positions; a `rope_*` field the chosen
    `rope_scaling` does not read keeps its default; llama3 and longrope need `rope_original_max_len > 0`, llama3
    `rope_high_freq_factor > rope_low_freq_factor`, longrope `head_dim / 2` entries in each of `rope_short_factor`
    and `rope_long_factor`; `scale_tied_head=False` needs `tie_embeddings`; the encoder-decoder keeps
    `norm_position='pre'`, `qk_norm='none'`, `attention_bias='none'`, `clip_qkv=0` and `lm_head_bias=False`
    (no encoder-decoder family uses them)."""
    self._check_rope()
    if self.architecture == "encoder_decoder":
      for name in ("norm_position", "qk_norm", "attention_bias", "clip_qkv", "lm_head_bias"):
        value, default = getattr(self, name), ModelConfig.__dataclass_fields__[name].default
        if value != default:
          raise ValueError(f"model.{name}={value!r} is for model.architecture='decoder'; leave it at {default!r} "
                           "for the encoder-decoder")
    if not self.scale_tied_head and not self.tie_embeddings:
      raise ValueError("model.scale_tied_head=False needs model.tie_embeddings=True (it scales the tied output "
                       "projection only)")
    if self.architecture == "decoder":
      if self.positions != "rotary":
        raise ValueError(f"model.positions={self.positions!r} must be 'rotary' for model.architecture='decoder'")
      if self.num_decoder_layers:
        raise ValueError(f"model.num_decoder_layers={self.num_decoder_layers} must be 0 for "
                         "model.architecture='decoder' (it has num_layers blocks)")
    if self.positions == "relative" and self.relative_max_distance <= self.relative_buckets // 2:
      raise ValueError(f"model.relative_max_distance={self.relative_max_distance} must be > relative_buckets / 2 = "
                       f"{self.relative_buckets // 2}")
    if self.num_kv_heads and self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
    if self.scan_layers:
      period = self.moe_layer_interval or 1
      if self.moe_start_block or self.num_layers % period:
        raise ValueError(f"model.scan_layers=True needs model.moe_start_block=0 (got {self.moe_start_block}) and "
                         f"model.num_layers={self.num_layers} a multiple of the block pattern's "
                         f"{period} blocks (model.moe_layer_interval)")
    if self.moe_layer_interval and self.moe_start_block + self.moe_layer_interval > self.num_layers:
      raise ValueError(f"model.moe_layer_interval={self.moe_layer_interval} must be <= model.num_layers="
                       f"{self.num_layers} - model.moe_start_block={self.moe_start_block}")

  def _check_rope(self) -> None:
    """The rotary fields' rules of `_check`."""
    defaults = ModelConfig.__dataclass_fields__
    rope_fields = ["rope_theta", "rope_scaling"] + [n for reads in _ROPE_SCALING_READS.values() for n in reads]
    if self.positions != "rotary":
      reads = ()
    else:
      reads = ("rope_theta", "rope_scaling") + _ROPE_SCALING_READS[self.rope_scaling]
    for name in dict.fromkeys(rope_fields):
      value, default = getattr(self, name), defaults[name].default
      if name not in reads and value != default:
        why = (f"model.positions={self.positions!r}" if self.positions != "rotary"
               else f"model.rope_scaling={self.rope_scaling!r}")
        raise ValueError(f"model.{name}={value!r} is not read with {why}; leave it at {default!r}")
    if self.positions != "rotary" or self.rope_scaling == "none":
      return
    if self.rope_original_max_len <= 0:
      raise ValueError(f"model.rope_original_max_len={self.rope_original_max_len} must be > 0 for "
                       f"model.rope_scaling={self.rope_scaling!r} (the pre-training context length)")
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be > "
                       f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
    if self.rope_scaling == "longrope":
      for name in ("rope_short_factor", "rope_long_factor"):
        if len(getattr(self, name)) != self.head_dim // 2:
          raise ValueError(f"model.{name} has {len(getattr(self, name))} entries; longrope needs head_dim / 2 = "
                           f"{self.head_dim // 2}")

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the blocks whose FFN is a mixture of experts: s+N-1, s+2N-1, ... from s = moe_start_block
    (encoder-decoder: of the encoder; `moe_blocks(decoder_layers)` gives the decoder's)."""
    return self.moe_blocks(self.num_layers)

  def moe_blocks(self, num_blocks: int) -> tuple[int, ...]:
    """The MoE block indices of a stack of `num_blocks` blocks, by the rule of `moe_layers`. A rule of the block
    fields alone, so validation can ask it before the `moe` section is attached (`model_config`)."""
    if self.moe_layer_interval == 0:
      return ()
    start, interval = self.moe_start_block, self.moe_layer_interval
    return tuple(i for i in range(start, num_blocks) if (i - start + 1) % interval == 0)

  @property
  def decoder_layers(self) -> int:
    """Blocks of the encoder-decoder's decoder."""
    return self.num_decoder_layers or self.num_layers

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def expert_d_ff(self) -> int:
    """Hidden width of each routed expert (fine-grained experts are narrower than the dense FFN)."""
    return self.moe.expert_d_ff or self.d_ff

  @property
  def shared_d_ff(self) -> int:
    """Total hidden width of the shared experts: num_shared_experts x their width (0: none)."""
    return self.moe.num_shared_experts * (self.moe.shared_expert_d_ff or self.expert_d_ff)


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """Where training text comes from and how it becomes tokens (moe_jax.data)."""

  NAME: ClassVar[str] = "data"
  dataset: str = field("stdlib", choice("dataset"), "corpus: the embedded stdlib, a text_dir, or a registered TFDS set")
  data_dir: str | None = field(None, text(nullable=True),
                               "cache of prepared TFDS data; None: $MOE_JAX_DATA_DIR, else ~/.cache/moe_jax/tfds "
                               "(stdlib, text_dir), TFDS's default for registered sets")
  text_dir: str | None = field(None, text(nullable=True), "directory of text files (dataset 'text_dir')")
  text_glob: str = field("**/*.txt", text(), "glob of text files under text_dir ('**' recurses)")
  tokenizer: str = field("byte", text(), "'byte', or the path of a Hugging Face tokenizer.json "
                                                 "or a SentencePiece .model file")
  download: bool = field(False, boolean(), "registered sets only: may this run download and prepare them?")
  validation_fraction: float = field(0.02, in_range(0, 0.5, closed_low=False, closed_high=True),
                                     "stdlib/text_dir: share of files held out for evaluation")
  objective: str = field("causal_lm", choice("objective"), "what a batch asks: next-token prediction (decoder LM) "
                         "or T5 span corruption (encoder-decoder; train.seq_len = encoder input length)")
  noise_density: float = field(0.15, in_range(0, 1, closed_low=False), "span corruption: share of tokens masked "
                               "(T5: 0.15)")
  mean_noise_span_length: float = field(3.0, float_at_least(1), "span corruption: mean masked span length (T5: 3)")
  num_sentinels: int = field(100, at_least(1), "span corruption: sentinel ids appended after the tokenizer's "
                             "vocabulary (T5's extra_ids: 100)")

  def _check(self) -> None:
    """`tokenizer` is 'byte' or an existing file; dataset='text_dir' needs an existing `text_dir`."""
    # These read the file system, so that a missing path fails here rather than minutes into a run.
    if self.tokenizer != "byte" and not os.path.isfile(os.path.expanduser(self.tokenizer)):
      raise ValueError(f"data.tokenizer={self.tokenizer!r} is neither 'byte' nor an existing tokenizer.json or "
                       "SentencePiece .model file (train one with experiments/train_tokenizer.py)")
    if self.dataset == "text_dir":
      if self.text_dir is None:
        raise ValueError("data.text_dir=None must be set to a directory when data.dataset='text_dir'")
      if not os.path.isdir(os.path.expanduser(self.text_dir)):
        raise ValueError(f"data.text_dir={self.text_dir!r} is not an existing directory")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """Optimisation, evaluation, logging and checkpointing of a run (moe_jax.train).

  loss = cross-entropy + aux_loss_weight * load-balancing loss + z_loss_weight * router z-loss, summed over the
  MoE blocks (Switch eq. 4, ST-MoE eq. 5).
  DeepSeek-V3's sequence-wise balance loss adds with its own weight, moe.sequence_aux_loss_weight.
  """

  NAME: ClassVar[str] = "train"
  batch_size: int = field(32, at_least(1), "global batch size in sequences")
  seq_len: int = field(128, at_least(1), "training sequence length L (<= model.max_seq_len)")
  num_steps: int = field(200, at_least(1), "optimizer steps")
  # AdamW for the cpu size; the paper-size configs use Adafactor with rsqrt decay as Switch/T5 did.
  optimizer: str = field("adamw", choice("optimizer"), "AdamW, or Adafactor as in Switch")
  learning_rate: float = field(3e-3, positive(), "peak learning rate")
  warmup_steps: int = field(20, at_least(0), "linear warmup steps")
  schedule: str = field("cosine", choice("schedule"), "decay after warmup (rsqrt: T5/Switch inverse square root)")
  min_lr_ratio: float = field(0.1, in_range(0, 1, closed_high=True), "final learning rate / peak (cosine, linear)")
  weight_decay: float = field(0.01, non_negative(), "decoupled weight decay")
  b1: float = field(0.9, in_range(0, 1), "Adam beta1")
  b2: float = field(0.99, in_range(0, 1), "Adam beta2")
  adafactor_decay_rate: float = field(0.8, in_range(0, 1, closed_high=True),
                                      "Adafactor second-moment decay exponent: beta2_t = 1 - t^-rate")
  grad_clip_norm: float = field(1.0, non_negative(), "global gradient-norm clip; 0 = off")
  aux_loss_weight: float = field(1e-2, non_negative(), "alpha: load-balancing loss weight (Switch: 1e-2)")
  z_loss_weight: float = field(0.0, non_negative(), "beta: router z-loss weight (ST-MoE: 1e-3); 0 = off")
  eval_every: int = field(100, at_least(0), "evaluate every N steps and at the end; 0 = only at the end")
  eval_batches: int = field(8, at_least(1), "validation batches per evaluation")
  # The fixed evaluation set of results/SCALING.md (moe_jax.evalset, docs/evaluation.md): every validation file,
  # each capped, scored per file with an interval over files; replaces the eval_batches of the packed stream.
  eval_set_min_tokens: int = field(0, at_least(0), "use the fixed evaluation set, refused below this many targets "
                                   "(SCALING.md: 1000000); 0 = off, evaluate train.eval_batches of the packed "
                                   "validation stream")
  eval_file_cap_tokens: int = field(32768, at_least(1), "fixed evaluation set: most targets one validation file "
                                    "contributes (a longer file enters as one fixed window)")
  eval_subset_cap_tokens: int = field(0, at_least(0), "fixed evaluation set: score only the first N targets of each "
                                      "file's window at every evaluation and the whole set at the last step "
                                      "(SCALING.md: 640); 0 = the whole set every time")
  eval_bootstrap_resamples: int = field(1000, at_least(1), "fixed evaluation set: bootstrap resamples over files "
                                        "of each score's 95% interval")
  log_every: int = field(20, at_least(1), "progress line every N steps (metrics are written every step)")
  checkpoint_every: int = field(100, at_least(0), "save every N steps and at the end; 0 = only at the end")
  keep_checkpoints: int = field(2, at_least(1), "checkpoints kept on disk")
  peak_tflops: float = field(0.0, non_negative(), "per-device peak for MFU; 0 = measure a matmul at start-up")
  # What a run does after a fault (docs/faults.md).
  skip_nonfinite_batches: int = field(0, at_least(0), "skip up to N batches whose loss or gradient is non-finite "
                                      "(their update is discarded); 0 = stop at the first")
  resume_step: int = field(0, at_least(0), "resume from this checkpoint step instead of the newest (newer ones are "
                           "moved to checkpoints/superseded); 0 = the newest")
  allow_changes: bool = field(False, boolean(), "resume although schedule/optimizer or data fields differ from the "
                              "checkpoint's (changes are recorded in resume_log.jsonl)")
  init_from: str = field("", Rule((str,), lambda v: v == v.strip(), lambda: "a workdir's path, or ''"),
                         "start the parameters from the newest checkpoint of this moe_jax workdir (read only; fresh "
                         "optimizer state, step 0; the same parameter shapes); a resume uses the run's own "
                         "checkpoints; '' = a fresh initialisation")
  startup_timeout_s: int = field(300, at_least(1), "seconds a multi-process run waits for all its processes to "
                                 "connect at start-up")
  peer_timeout_s: int = field(60, at_least(1), "seconds a multi-process run waits for a process that stopped "
                              "responding (killed, its machine gone) before every other process stops in one line")


MESH_AXES = ("data", "fsdp", "expert", "tensor")  # the order of moe_jax.parallel's mesh axes


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
  """The device mesh ('data', 'fsdp', 'expert', 'tensor'), moe_jax.parallel: the batch is split over 'data',
  'fsdp' and 'expert'; parameters, gradients and optimizer state over 'fsdp' (along d_model); experts over
  'expert'; attention heads and FFN hidden units over 'tensor'. The defaults (every size 1 but a 0 on
  'data' in most configs) are the ('data', 'expert') meshes of earlier versions."""

  NAME: ClassVar[str] = "mesh"
  data: int = field(1, at_least(0), "data-parallel axis size (parameters replicated); 0 = the devices the other "
                    "axes leave")
  fsdp: int = field(1, at_least(0), "fully-sharded data-parallel axis size (parameters, gradients, optimizer "
                    "state split along d_model); 0 = the rest")
  expert: int = field(1, at_least(0), "expert-parallel axis size (experts split over it); 0 = the rest")
  tensor: int = field(1, at_least(0), "tensor-parallel axis size (heads and FFN/expert hidden units split); "
                      "0 = the rest")

  def _check(self) -> None:
    """At most one axis is 0 ("the rest of the devices")."""
    rest = [name for name in MESH_AXES if getattr(self, name) == 0]
    if len(rest) > 1:
      raise ValueError(f"mesh.{rest[1]}=0: only one mesh axis may be 0 (the rest of the devices); "
                       + ", ".join(f"mesh.{n}=0" for n in rest) + " are")

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    return tuple(getattr(self, name) for name in MESH_AXES)

  @property
  def devices(self) -> int | None:
    """Devices the mesh spans; None until resolve() fills in the axis that is 0."""
    return math.prod(self.sizes) or None

  @property
  def token_devices(self) -> int | None:
    """Devices the batch is split over (all but 'tensor'); None until resolved."""
    return self.data * self.fsdp * self.expert if self.devices else None


SECTIONS: tuple[type[Section], ...] = (ModelConfig, MoeConfig, DataConfig, TrainConfig, MeshConfig)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Section):
  """A whole run: the seed and the five sections, with the rules that relate sections."""

  NAME: ClassVar[str] = ""
  seed: int = field(0, Rule((int,), lambda v: 0 <= v < 2**32, lambda: "in [0, 2**32)"),
                    "PRNG seed for parameters, dropout, jitter and data order")
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def _check(self) -> None:
    """`train.seq_len <= model.max_seq_len`; `data.objective` is 'span_corruption' exactly for the encoder-decoder,
    with at least as many `data.num_sentinels` as noise spans per input; `train.batch_size` divisible by the
    devices the batch is split over (mesh.data * mesh.fsdp * mesh.expert); `mesh.fsdp` divides `model.d_model`;
    `mesh.tensor` divides `model.num_heads`, the key/value heads and every FFN width (`model.d_ff` where a block is
    dense, the experts' and shared experts' widths); `model.scan_layers` refuses a router that reads token ids
    (hash: scanned blocks get none); with MoE blocks: `moe.num_experts` divisible by `mesh.expert`, a non-causal
    router ('expert_choice', 'soft_moe') refused in a causal stack (the decoder LM; the encoder-decoder's decoder
    stack, which then routes with `moe.decoder_router`), routing groups (`moe.group_size`, 0: one per sequence)
    tiling the batch into a multiple of the mesh's devices, and the router's capacity defined on a group's tokens
    (router='base': tokens per group a multiple of `moe.num_experts`), in each stack with MoE layers (the
    encoder-decoder's decoder: batch x span-corruption targets length)."""
    model, moe, train, mesh = self.model, self.moe, self.train, self.mesh
    if train.seq_len > model.max_seq_len:
      raise ValueError(f"train.seq_len={train.seq_len} must be <= model.max_seq_len={model.max_seq_len}")
    wanted = "span_corruption" if model.architecture == "encoder_decoder" else "causal_lm"
    if self.data.objective != wanted:
      raise ValueError(f"data.objective={self.data.objective!r} must be {wanted!r} for "
                       f"model.architecture={model.architecture!r}")
    if wanted == "span_corruption":
      from moe_jax.data import span_corruption  # the data package only when a run corrupts spans

      lengths = span_corruption.lengths(train.seq_len, self.data.noise_density, self.data.mean_noise_span_length)
      if lengths.num_spans > self.data.num_sentinels:
        raise ValueError(f"data.num_sentinels={self.data.num_sentinels} must be >= the {lengths.num_spans} noise "
                         f"spans of a train.seq_len={train.seq_len} input")
    devices = mesh.token_devices
    if devices is not None and train.batch_size % devices:
      raise ValueError(f"train.batch_size={train.batch_size} must be divisible by mesh.data * mesh.fsdp * "
                       f"mesh.expert = {mesh.data} * {mesh.fsdp} * {mesh.expert} = {devices}")
    # Split dimensions must divide evenly (a NamedSharding refuses a ragged split).
    if mesh.fsdp > 1 and model.d_model % mesh.fsdp:
      raise ValueError(f"mesh.fsdp={mesh.fsdp} must divide model.d_model={model.d_model} (FSDP splits d_model)")
    if mesh.tensor > 1:
      moe_blocks = model.moe_layer_interval > 0
      widths = {"model.num_heads": model.num_heads, "model.num_kv_heads": model.num_kv_heads or model.num_heads}
      if not moe_blocks or model.moe_layer_interval > 1 or model.moe_start_block > 0:
        widths["model.d_ff"] = model.d_ff
      if moe_blocks:
        widths["moe.expert_d_ff"] = moe.expert_d_ff or model.d_ff
        if moe.num_shared_experts:
          widths["moe.num_shared_experts * width"] = moe.num_shared_experts * (
              moe.shared_expert_d_ff or moe.expert_d_ff or model.d_ff)
      for name, width in widths.items():
        if width % mesh.tensor:
          raise ValueError(f"mesh.tensor={mesh.tensor} must divide {name}={width} (tensor parallelism splits it)")
    if model.moe_layer_interval == 0:
      return
    if model.scan_layers and moe.needs_token_ids:
      raise ValueError(f"model.scan_layers=True cannot run moe.router={moe.router!r}: it reads token ids and "
                       "scanned blocks get none; leave model.scan_layers=False")
    if mesh.expert and moe.num_experts % mesh.expert:
      raise ValueError(f"moe.num_experts={moe.num_experts} must be divisible by mesh.expert={mesh.expert}")
    causal = [name for name in routers.names() if routers.get(name).causal]
    if model.architecture == "decoder":
      if not moe.family.causal:
        raise ValueError(f"moe.router={moe.router!r} is non-causal (a token's routing reads all tokens of its "
                         "group, future ones included) and cannot train an autoregressive decoder; use one of "
                         + ", ".join(map(repr, causal)) + " (or model.architecture='encoder_decoder', where it "
                         "may route the encoder)")
      if moe.decoder_router:
        raise ValueError(f"moe.decoder_router={moe.decoder_router!r} is for model.architecture='encoder_decoder'; "
                         "the decoder LM routes with moe.router")
    elif not moe.family.causal and not moe.decoder_router:
      raise ValueError(f"moe.router={moe.router!r} is non-causal: it may route the encoder, but the decoder stack's "
                       f"MoE layers need a causal router; set moe.decoder_router (one of {', '.join(map(repr, causal))})")
    # Routing groups tile the batch and never straddle devices (moe_layer.group_tokens, parallel), in each stack
    # that has MoE layers: the encoder-decoder's decoder routes its batch x target-length tokens the same way.
    stacks = [("train.seq_len", train.seq_len, moe)]
    if model.architecture == "encoder_decoder" and model.moe_blocks(model.decoder_layers):
      stacks.append((f"span-corruption targets length (of train.seq_len={train.seq_len})", lengths.targets,
                     moe.decoder_stack()))
    for what, length, stack in stacks:
      tokens, per_group = train.batch_size * length, moe.group_size or length
      if tokens % per_group:
        raise ValueError(f"moe.group_size={moe.group_size} must divide train.batch_size * {what} = "
                         f"{train.batch_size} * {length} = {tokens}")
      try:  # the router's own rules on a group's tokens (BASE: a multiple of the experts)
        stack.capacity(per_group, training=True)
      except ValueError as error:
        raise ValueError(f"{error} ({what} {length})") from None
      groups = tokens // per_group
      if devices is not None and groups % devices:
        raise ValueError(f"moe.group_size={moe.group_size} gives {groups} routing groups ({what} {length}), which "
                         f"must be a multiple of mesh.data * mesh.fsdp * mesh.expert = {devices}")

  @property
  def tokens_per_group(self) -> int:
    """S: tokens per routing group in training (group_size 0: one group per sequence)."""
    return self.moe.group_size or self.train.seq_len


# ----------------------------------------------------------------------------------------------------------
# ConfigDict <-> typed.


def _section_defaults(section: type[Section]) -> ml_collections.ConfigDict:
  import ml_collections

  values = {}
  for f in config_fields(section):
    rule = f.metadata["rule"]
    # A None default needs its type declared, so that --config.data.text_dir=/path can override it.
    values[f.name] = ml_collections.FieldReference(None, field_type=rule.kinds[0]) if f.default is None else f.default
  for name, nested in _nested_sections(section).items():
    values[name] = _section_defaults(nested)
  return ml_collections.ConfigDict(values)


def _nested_sections(section: type[Section]) -> dict[str, type[Section]]:
  """The sections nested in `section`, by name: the router families' options in `moe` (moe.<router>.*)."""
  return MoeConfig.option_sections() if section is MoeConfig else {}


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default: a small Switch LM on the embedded stdlib corpus."""
  import ml_collections

  config = ml_collections.ConfigDict()
  config.seed = ExperimentConfig.__dataclass_fields__["seed"].default
  for section in SECTIONS:
    config[section.NAME] = _section_defaults(section)
  return config


def section_from_config(section: type[Section], values: Any) -> Section:
  """A typed section (e.g. `DataConfig`) from its part of a ConfigDict (or a dict), refusing unknown and missing
  fields and checking each value."""
  values = values.to_dict() if hasattr(values, "to_dict") else dict(values)  # a ConfigDict or a mapping
  known = {f.name: f for f in config_fields(section)}
  nested = _nested_sections(section)
  for name in values:
    if name not in known and name not in nested:
      raise ValueError(f"unknown config field {section.path(name)!r}; known fields are listed in docs/config.md")
  for name, f in known.items():
    if name not in values:
      raise ValueError(f"config field {section.path(name)!r} is missing ({f.metadata['doc']})")
  for name in nested:
    if name not in values:
      raise ValueError(f"config section {section.path(name)!r} is missing")
  if not nested:
    return section(**values)
  options = {name: section_from_config(cls, values.pop(name)) for name, cls in nested.items()}
  return section(**values, options=options)


def typed(config: ml_collections.ConfigDict) -> ExperimentConfig:
  """The checked, typed form of `config`; ValueError naming the first bad field. No array is created."""
  names = {section.NAME for section in SECTIONS}
  for key in config.keys():
    if key != "seed" and key not in names:
      raise ValueError(f"unknown config field {key!r}; known fields are listed in docs/config.md")
  if "seed" not in config:
    raise ValueError("config field 'seed' is missing")
  sections = {}
  for section in SECTIONS:
    if section.NAME not in config:
      raise ValueError(f"config section {section.NAME!r} is missing")
    sections[section.NAME] = section_from_config(section, config[section.NAME])
  return ExperimentConfig(seed=config.seed, **sections)


def validate(config: ml_collections.ConfigDict) -> ExperimentConfig:
  """Check every field and cross-field rule that needs no devices or tokenizer (see moe_jax.resolve)."""
  return typed(config)


def model_config(config: ml_collections.ConfigDict | ExperimentConfig, vocab_size: int) -> ModelConfig:
  """The typed model config; `vocab_size` is the tokenizer's, used when model.vocab_size is 0."""
  if isinstance(config, ExperimentConfig):
    model, moe = config.model, config.moe
  else:  # only the model's sections: e.g. a pod config's data paths need not exist here to count its FLOPs
    model, moe = section_from_config(ModelConfig, config.model), section_from_config(MoeConfig, config.moe)
  return dataclasses.replace(model, vocab_size=model.vocab_size or vocab_size,
                             moe=moe if model.moe_layer_interval > 0 else None)


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-safe data (what config.json and checkpoints record)."""
  return json.loads(config.to_json())


# Fields that have moved since a config was saved: old dotted path -> new dotted path, applied by `migrate`.
# Append a line when a field moves; never reuse an old path for another meaning.
RENAMED: dict[str, str] = {
    # Issue 29: a router family's own options moved into its section moe.<router>.
    "moe.top_k": "moe.top_k.k",
    "moe.renormalize": "moe.top_k.renormalize",
    "moe.second_expert_policy": "moe.top_k.second_expert_policy",
    "moe.second_expert_threshold": "moe.top_k.second_expert_threshold",
    "moe.score_function": "moe.top_k.score_function",
    "moe.routed_scaling": "moe.top_k.routed_scaling",
    "moe.num_expert_groups": "moe.top_k.num_expert_groups",
    "moe.topk_expert_groups": "moe.top_k.topk_expert_groups",
    "moe.group_score": "moe.top_k.group_score",
    "moe.balancing_bias_rate": "moe.top_k.balancing_bias_rate",
    "moe.sequence_aux_loss_weight": "moe.top_k.sequence_aux_loss_weight",
    "moe.slots_per_expert": "moe.soft_moe.slots_per_expert",
    "moe.sinkhorn_iterations": "moe.base.sinkhorn_iterations",
}


def migrate(saved: Mapping[str, Any]) -> dict:
  """A saved config, whole or partial (a checkpoint's or config.json's config, a sweep run's overrides), as nested
  plain data with every field of `RENAMED` at its new path. Fields already at their new path stay as they are.

  All old fields are taken out before any is put back, because a section may take an old field's name
  (`moe.top_k` was the int K and is now the section holding `moe.top_k.k`)."""
  out = copy.deepcopy(saved.to_dict() if hasattr(saved, "to_dict") else dict(saved))
  moved = {}
  for old, new in RENAMED.items():
    *parents, leaf = old.split(".")
    node = out
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node and not isinstance(node[leaf], dict):
      moved[new] = node.pop(leaf)
  for new, value in moved.items():
    *parents, leaf = new.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def saved_config(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved by an earlier run (config.json's "requested" or "resolved") as a ConfigDict of today's
  schema: renamed fields at their new paths (`migrate`), laid over `default_config()`, so that a field added since
  it was saved takes its default (what the code computed before the field existed, e.g. model.norm_eps 1e-6,
  model.rope_theta 1e4; `config_changes` reads a missing field the same way) and every field keeps its type
  for command-line overrides."""
  config = default_config()
  config.update(migrate(saved))
  return config


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """Every leaf field that differs between a checkpoint's config and `current`, both as JSON dicts
  (`to_dict`): path -> (old, new).

  A field the checkpoint's config lacks (added to the schema since) and that `current` leaves at its default is no
  change: the checkpoint's run computed what the default computes (e.g. model.remat='none', mesh.fsdp=1).
  """
  old, new = _leaves(migrate(saved)), _leaves(current)
  defaults = _leaves(to_dict(default_config()))
  return {path: (old.get(path), new.get(path)) for path in sorted(set(old) | set(new))
          if old.get(path) != new.get(path) and not (path not in old and new.get(path) == defaults.get(path))}


def dense_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The dense model with the FLOPs per token of a top-1 Switch config: same widths, every FFN dense.

  Switch top-1 sends each token through exactly one expert of the same d_ff as the dense FFN, so the two
  match in FLOPs per token up to the router (2 * d_model * E multiply-adds per token per MoE layer).
  """
  twin = copy.deepcopy(config)
  twin.model.moe_layer_interval = 0
  if config.mesh.data and config.mesh.expert:  # the expert axis becomes data parallelism
    twin.mesh.data = config.mesh.data * config.mesh.expert
  elif config.mesh.expert == 0:  # it was "the rest": now 'data' is
    twin.mesh.data = 0
  twin.mesh.expert = 1
  return twin


DOCS_PATH = "docs/config.md"  # relative to the repository root


def config_docs() -> str:
  """docs/config.md: every field, its valid values, default and meaning, and each section's cross-field rules."""
  lines = [
      "# Config fields",
      "",
      "Generated from the schema in `moe_jax/config_lib.py` by `python -m moe_jax.config_lib` (a test checks that",
      "it is current). Every config in `configs/` starts from `config_lib.default_config()` and the command line",
      "overrides fields (`--config.train.num_steps=400`). A bad value raises `ValueError` naming the field and its",
      "valid range before anything is built; an unknown field is refused. `moe_jax.resolve` then makes the",
      "\"auto\" values concrete (a mesh axis of size 0, `model.vocab_size = 0`, the dispatch backend that runs)",
      "and checks what needs the machine: `mesh.data * mesh.fsdp * mesh.expert * mesh.tensor` must equal the",
      "number of devices and a non-zero",
      "`model.vocab_size` must cover the tokenizer's vocabulary. Each run's `config.json` records the requested",
      "config, the resolved one and every decision.",
  ]
  for section in (ExperimentConfig, *SECTIONS):
    lines += _section_docs(section)
    if section is MoeConfig:
      lines += _router_docs()
      for name, nested in MoeConfig.option_sections().items():
        lines += _section_docs(nested)
        check = routers.get(name).check.__doc__
        if check:
          lines += ["", "Rules with the other moe fields: " + " ".join(check.split())]
  return "\n".join(lines) + "\n"


def _section_docs(section: type[Section]) -> list[str]:
  lines = ["", f"## {section.NAME or 'run'}", "", "| field | valid values | default | meaning |",
           "| --- | --- | --- | --- |"]
  for f in config_fields(section):
    lines.append(f"| `{section.path(f.name)}` | {f.metadata['rule'].allowed()} | `{f.default!r}` | "
                 f"{f.metadata['doc']} |")
  if section.rules_doc():
    lines += ["", "Rules: " + section.rules_doc()]
  return lines


def _router_docs() -> list[str]:
  """The router families (moe_jax.routers) and what each declares."""
  lines = ["", "Routers (`moe.router`, one module each in `moe_jax/routers/`):", "",
           "| router | what it does | options | shared options it reads | causal | reads token ids |",
           "| --- | --- | --- | --- | --- | --- |"]
  for name, family in routers.FAMILIES.items():
    options = f"`moe.{name}.*`" if family.options else "none"
    reads = ", ".join(f"`{option}`" for option in family.reads) or "none"
    lines.append(f"| `{name}` | {family.summary} | {options} | {reads} | {'yes' if family.causal else 'no'} | "
                 f"{'yes' if family.needs_token_ids else 'no'} |")
  return lines


if __name__ == "__main__":
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DOCS_PATH), "w") as out:
    out.write(config_docs())
