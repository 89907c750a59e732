"""The experiment config: its fields, their valid ranges, and conversion to the typed model configs.

Every config file in `configs/` starts from `default_config()` and changes fields. `validate(config)` checks
every field against `FIELDS` (the one table of names, types and ranges; `docs/config.md` is generated from
it) and the cross-field rules, raising `ValueError` naming the field before anything is built or compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

import ml_collections

from moe_jax import data as data_lib
from moe_jax import experts
from moe_jax.moe_layer import ROUTERS, MoeConfig
from moe_jax.model import DTYPES, ModelConfig
from moe_jax.layers import NORMS


@dataclasses.dataclass(frozen=True)
class Field:
  kind: type | tuple[type, ...]
  check: Callable[[Any], bool]
  allowed: str  # the valid range, in words, for messages and docs
  doc: str


def _int_at_least(n: int) -> tuple[type, Callable[[Any], bool], str]:
  return int, lambda v: v >= n, f">= {n}"


def _choice(*options: str) -> tuple[type, Callable[[Any], bool], str]:
  return str, lambda v: v in options, "one of " + ", ".join(repr(o) for o in options)


def _unit_interval(closed_high: bool = False) -> tuple[type, Callable[[Any], bool], str]:
  if closed_high:
    return (int, float), lambda v: 0.0 <= v <= 1.0, "in [0, 1]"
  return (int, float), lambda v: 0.0 <= v < 1.0, "in [0, 1)"


def _positive() -> tuple[type, Callable[[Any], bool], str]:
  return (int, float), lambda v: v > 0 and math.isfinite(v), "> 0"


def _non_negative() -> tuple[type, Callable[[Any], bool], str]:
  return (int, float), lambda v: v >= 0 and math.isfinite(v), ">= 0"


def _bool() -> tuple[type, Callable[[Any], bool], str]:
  return bool, lambda v: True, "True or False"


def _f(spec: tuple, doc: str) -> Field:
  return Field(*spec, doc=doc)


OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")

FIELDS: dict[str, Field] = {
    "seed": _f((int, lambda v: 0 <= v < 2**32, "in [0, 2**32)"), "PRNG seed for parameters, dropout, jitter and data order"),
    # Model.
    "model.vocab_size": _f(_int_at_least(0), "vocabulary size; 0 takes the tokenizer's"),
    "model.d_model": _f(_int_at_least(1), "residual width M"),
    "model.num_heads": _f(_int_at_least(1), "attention heads H"),
    "model.head_dim": _f(
        (int, lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"), "attention head dimension D (rotary pairs)"
    ),
    "model.d_ff": _f(_int_at_least(1), "hidden width F of every FFN and expert"),
    "model.num_layers": _f(_int_at_least(1), "transformer blocks"),
    "model.max_seq_len": _f(_int_at_least(1), "longest sequence the model accepts"),
    "model.moe_layer_interval": _f(
        _int_at_least(0), "0: dense model; N: every N-th block's FFN is a MoE layer (Switch: 2)"
    ),
    "model.norm": _f(_choice(*NORMS), "pre-norm layer"),
    "model.activation": _f(_choice(*experts.ACTIVATIONS), "FFN activation; geglu/swiglu are gated (T5.1.1)"),
    "model.tie_embeddings": _f(_bool(), "share input embedding and output projection"),
    "model.dropout": _f(_unit_interval(), "dropout on residual branches and dense FFNs"),
    "model.init_scale": _f(_positive(), "Switch init: truncated normal with variance init_scale / fan_in"),
    "model.dtype": _f(_choice(*DTYPES), "activation dtype (params and router stay float32)"),
    # Mixture of experts (used when model.moe_layer_interval > 0).
    "moe.num_experts": _f(_int_at_least(1), "experts E per MoE layer"),
    "moe.router": _f(_choice(*ROUTERS), "routing algorithm"),
    "moe.top_k": _f(_int_at_least(1), "experts per token K (1 for switch; <= num_experts)"),
    "moe.capacity_factor": _f(_positive(), "training capacity factor (ignored when dropless)"),
    "moe.eval_capacity_factor": _f(_positive(), "evaluation capacity factor"),
    "moe.dropless": _f(_bool(), "no capacity limit: no token is ever dropped"),
    "moe.renormalize": _f(_bool(), "renormalise the top-k weights to sum to 1 (Mixtral)"),
    "moe.batch_prioritized": _f(_bool(), "tokens with higher top gate claim capacity first (V-MoE BPR)"),
    "moe.second_expert_policy": _f(_choice("all", "random"), "GShard policy for choices after the first"),
    "moe.second_expert_threshold": _f(
        ((int, float), lambda v: 0.0 < v <= 1.0, "in (0, 1]"), "GShard 'random' policy threshold"
    ),
    "moe.jitter_eps": _f(_unit_interval(), "multiplicative router-input noise U[1-eps, 1+eps] in training"),
    "moe.dispatch": _f(_choice("einsum", "gather", "dropless"), "token dispatch backend"),
    "moe.expert_dropout": _f(_unit_interval(), "dropout inside experts (Switch Table 4)"),
    "moe.group_size": _f(_int_at_least(0), "tokens per routing group; 0: see MoeConfig"),
    "moe.router_dtype": _f(_choice("float32", "bfloat16"), "router precision (Switch selective precision)"),
    # Training.
    "train.batch_size": _f(_int_at_least(1), "global batch size in sequences"),
    "train.seq_len": _f(_int_at_least(1), "training sequence length L (<= model.max_seq_len)"),
    "train.num_steps": _f(_int_at_least(1), "optimizer steps"),
    "train.optimizer": _f(_choice(*OPTIMIZERS), "AdamW, or Adafactor as in Switch"),
    "train.learning_rate": _f(_positive(), "peak learning rate"),
    "train.warmup_steps": _f(_int_at_least(0), "linear warmup steps"),
    "train.schedule": _f(_choice(*SCHEDULES), "decay after warmup (rsqrt: T5/Switch inverse square root)"),
    "train.min_lr_ratio": _f(_unit_interval(closed_high=True), "final learning rate / peak (cosine, linear)"),
    "train.weight_decay": _f(_non_negative(), "decoupled weight decay"),
    "train.b1": _f(_unit_interval(), "Adam beta1"),
    "train.b2": _f(_unit_interval(), "Adam beta2"),
    "train.adafactor_decay_rate": _f(
        _unit_interval(closed_high=True), "Adafactor second-moment decay exponent: beta2_t = 1 - t^-rate (0.8)"
    ),
    "train.grad_clip_norm": _f(_non_negative(), "global gradient-norm clip; 0 = off"),
    "train.aux_loss_weight": _f(_non_negative(), "alpha: load-balancing loss weight (Switch: 1e-2)"),
    "train.z_loss_weight": _f(_non_negative(), "beta: router z-loss weight (ST-MoE: 1e-3); 0 = off"),
    "train.eval_every": _f(_int_at_least(0), "evaluate every N steps and at the end; 0 = only at the end"),
    "train.eval_batches": _f(_int_at_least(1), "validation batches per evaluation"),
    "train.log_every": _f(_int_at_least(1), "progress line every N steps (metrics are written every step)"),
    "train.checkpoint_every": _f(_int_at_least(0), "save every N steps and at the end; 0 = only at the end"),
    "train.keep_checkpoints": _f(_int_at_least(1), "checkpoints kept on disk"),
    "train.peak_tflops": _f(_non_negative(), "per-device peak for MFU; 0 = measure a matmul at start-up"),
    # Mesh.
    "mesh.data": _f(_int_at_least(0), "data-parallel mesh axis size; 0 = all devices / mesh.expert"),
    "mesh.expert": _f(_int_at_least(1), "expert-parallel mesh axis size (experts split over it)"),
}


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default: a small Switch LM on the embedded stdlib corpus."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=0, d_model=128, num_heads=4, head_dim=32, d_ff=512, num_layers=4, max_seq_len=256,
      moe_layer_interval=2, norm="rmsnorm", activation="gelu", tie_embeddings=False, dropout=0.0,
      init_scale=0.1, dtype="float32",
  ))
  config.moe = ml_collections.ConfigDict(dataclasses.asdict(MoeConfig()))
  config.data = data_lib.default_data_config()
  config.train = ml_collections.ConfigDict(dict(
      batch_size=32, seq_len=128, num_steps=200, optimizer="adamw", learning_rate=3e-3, warmup_steps=20,
      schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.99, adafactor_decay_rate=0.8,
      grad_clip_norm=1.0,
      aux_loss_weight=1e-2, z_loss_weight=0.0, eval_every=100, eval_batches=8, log_every=20,
      checkpoint_every=100, keep_checkpoints=2, peak_tflops=0.0,
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=1, expert=1))
  return config


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      paths.extend(_leaf_paths(value, path + "."))
    else:
      paths.append(path)
  return paths


def _check_field(path: str, value: Any, field: Field) -> None:
  kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
  # bool is an int in Python: only accept it where a bool is asked for.
  if isinstance(value, bool) and bool not in kinds:
    raise ValueError(f"{path}={value!r} has type bool; expected {field.allowed}")
  if not isinstance(value, kinds):
    names = "/".join(k.__name__ for k in kinds)
    raise ValueError(f"{path}={value!r} has type {type(value).__name__}; expected {names} {field.allowed}")
  if not field.check(value):
    raise ValueError(f"{path}={value!r} must be {field.allowed}")


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
  """Raise ValueError naming the first bad field. Cheap: runs before any array is created.

  `device_count` (default: none checked) verifies that the mesh fits the devices.
  """
  for path in _leaf_paths(config):
    if path.startswith("data."):
      continue  # the data package owns its fields
    if path not in FIELDS:
      raise ValueError(f"unknown config field {path!r}; known fields are listed in docs/config.md")
  for path, field in FIELDS.items():
    try:
      value = _get(config, path)
    except (KeyError, AttributeError):
      raise ValueError(f"config field {path!r} is missing ({field.doc})") from None
    _check_field(path, value, field)
  data_lib.validate_data_config(config.data)

  model, moe, train, mesh = config.model, config.moe, config.train, config.mesh
  if train.seq_len > model.max_seq_len:
    raise ValueError(f"train.seq_len={train.seq_len} must be <= model.max_seq_len={model.max_seq_len}")
  if model.moe_layer_interval > model.num_layers:
    raise ValueError(
        f"model.moe_layer_interval={model.moe_layer_interval} must be <= model.num_layers={model.num_layers}"
    )
  if mesh.data == 0:
    raise ValueError("mesh.data=0 must be resolved against the device count first (config_lib.resolve)")
  devices = mesh.data * mesh.expert
  if device_count is not None and devices != device_count:
    raise ValueError(
        f"mesh.data * mesh.expert = {mesh.data} * {mesh.expert} = {devices} must equal the number of devices "
        f"({device_count})"
    )
  if train.batch_size % devices:
    raise ValueError(
        f"train.batch_size={train.batch_size} must be divisible by mesh.data * mesh.expert = {devices}"
    )
  if model.moe_layer_interval > 0:
    if moe.num_experts % mesh.expert:
      raise ValueError(
          f"moe.num_experts={moe.num_experts} must be divisible by mesh.expert={mesh.expert}"
      )
    if moe.router == "expert_choice":
      raise ValueError(
          "moe.router='expert_choice' is non-causal (each expert picks among all tokens of a group, future "
          "ones included) and cannot train an autoregressive decoder; use 'switch' or 'top_k'"
      )
    moe_config(config)  # MoeConfig's own cross-field checks (top_k vs num_experts, ...)
    _check_routing_groups(config, devices)
  vocab = config.model.vocab_size
  if vocab:
    tokenizer_vocab = data_lib.get_tokenizer(config.data).vocab_size
    if tokenizer_vocab > vocab:
      raise ValueError(
          f"model.vocab_size={vocab} must be >= the tokenizer's vocabulary ({tokenizer_vocab}), or 0 to use it"
      )


def _check_routing_groups(config: ml_collections.ConfigDict, devices: int) -> None:
  """Routing groups must tile the batch and split evenly over the devices (moe_layer.group_tokens)."""
  tokens = config.train.batch_size * config.train.seq_len
  group = config.moe.group_size or config.train.seq_len
  if tokens % group:
    raise ValueError(
        f"moe.group_size={config.moe.group_size} must divide train.batch_size * train.seq_len = {tokens}"
    )
  if (tokens // group) % devices:
    raise ValueError(
        f"moe.group_size={config.moe.group_size} gives {tokens // group} routing groups, which must be a multiple "
        f"of mesh.data * mesh.expert = {devices}"
    )


def moe_config(config: ml_collections.ConfigDict) -> MoeConfig:
  try:
    return MoeConfig(**config.moe.to_dict())
  except ValueError as error:  # MoeConfig names its own fields; say where they sit in the experiment config
    raise ValueError(f"moe.{error}") from None


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The typed model config; `vocab_size` is the tokenizer's, used when model.vocab_size is 0."""
  fields = config.model.to_dict()
  fields["vocab_size"] = fields["vocab_size"] or vocab_size
  use_moe = fields["moe_layer_interval"] > 0
  return ModelConfig(**fields, moe=moe_config(config) if use_moe else None)


def dense_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The dense model with the FLOPs per token of a top-1 Switch config: same widths, every FFN dense.

  Switch top-1 sends each token through exactly one expert of the same d_ff as the dense FFN, so the two
  match in FLOPs per token up to the router (2 * d_model * E per MoE layer: 0.2% of the cpu model at E = 8,
  1.7% at E = 64).
  """
  twin = copy.deepcopy(config)
  twin.model.moe_layer_interval = 0
  if config.mesh.data:
    twin.mesh.data = config.mesh.data * config.mesh.expert
  twin.mesh.expert = 1
  return twin


def resolve(config: ml_collections.ConfigDict, device_count: int) -> ml_collections.ConfigDict:
  """A copy with run-time defaults filled in: mesh.data = 0 becomes device_count / mesh.expert."""
  resolved = copy.deepcopy(config)
  if resolved.mesh.data == 0 and resolved.mesh.expert >= 1:
    if device_count % resolved.mesh.expert:
      raise ValueError(
          f"mesh.expert={resolved.mesh.expert} must divide the number of devices ({device_count})"
      )
    resolved.mesh.data = device_count // resolved.mesh.expert
  return resolved


def config_docs() -> str:
  """Markdown table of every field, its range and meaning (written to docs/config.md)."""
  rows = ["| field | valid values | default | meaning |", "| --- | --- | --- | --- |"]
  defaults = default_config()
  for path, field in FIELDS.items():
    rows.append(f"| `{path}` | {field.allowed} | `{_get(defaults, path)!r}` | {field.doc} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(config_docs())
