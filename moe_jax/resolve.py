"""From the config a user asked for to the config a run executes: every "auto" value made concrete, once.

`resolve(config, device_count)` validates the config (moe_jax.config_lib), then decides, in this order:
  * a mesh axis of size 0    -> device_count / the other axes' sizes (and the mesh must cover the devices);
  * model.vocab_size = 0     -> the tokenizer's vocabulary (a smaller non-zero value is refused);
  * moe.dispatch             -> the backend that actually runs on this platform and mesh
                                (`dispatch.resolve_backend`: 'auto' and ragged backends; an optional backend
                                whose package is missing is refused here, saying how to install it);
and derives the facts a reader of a run wants next to them: tokens per routing group and the expert capacity
in training and evaluation, as the router family declares it (none for Soft MoE). Each decision is a `Decision`
(field, requested, resolved, why); `Resolved.record()` is what `config.json` stores: the requested config, the
resolved one and the decisions, so a run says what ran, not only what was asked.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import ml_collections

from moe_jax import config_lib, dispatch, environment, flops
from moe_jax import data as data_lib
from moe_jax.data import span_corruption


@dataclasses.dataclass(frozen=True)
class Decision:
  field: str
  requested: Any
  resolved: Any
  why: str

  def line(self) -> str:
    return f"resolve: {self.field} {self.requested!r} -> {self.resolved!r} ({self.why})"


@dataclasses.dataclass(frozen=True)
class Resolved:
  requested: ml_collections.ConfigDict  # as the user wrote it
  config: ml_collections.ConfigDict  # what the run executes: no "auto" value left
  typed: config_lib.ExperimentConfig  # the same, typed and checked
  decisions: tuple[Decision, ...]  # every value that differs between the two, and why
  derived: dict[str, Any]  # facts implied by the resolved config (capacity, tokens per group)

  def record(self) -> dict:
    """JSON-safe: what config.json holds, with the Python, platform and package versions the run used."""
    return {"requested": config_lib.to_dict(self.requested), "resolved": config_lib.to_dict(self.config),
            "decisions": [dataclasses.asdict(d) for d in self.decisions], "derived": self.derived,
            "environment": environment.describe()}


def resolve(config: ml_collections.ConfigDict, device_count: int, *, platform: str | None = None,
            log: bool = False) -> Resolved:
  """Validate `config` and make every "auto" value concrete for a run on `device_count` devices of `platform`
  (default: jax.default_backend())."""
  resolved = copy.deepcopy(config)
  decisions = []

  def decide(path: str, value: Any, why: str) -> None:
    section, name = path.split(".")
    decisions.append(Decision(path, resolved[section][name], value, why))
    resolved[section][name] = value

  # The mesh first: a mesh that does not fit the machine is the most basic mistake, and the rules relating
  # batch, experts and groups to the mesh need its size.
  mesh = config_lib.section_from_config(config_lib.MeshConfig, config.mesh)
  rest = [name for name in config_lib.MESH_AXES if getattr(mesh, name) == 0]
  if rest:  # MeshConfig allows at most one
    others = math.prod(size for size in mesh.sizes if size)
    given = " * ".join(f"mesh.{n}={getattr(mesh, n)}" for n in config_lib.MESH_AXES
                       if n != rest[0] and getattr(mesh, n) != 1) or "1"
    if device_count % others:
      raise ValueError(f"{given} must divide the number of devices ({device_count})")
    decide(f"mesh.{rest[0]}", device_count // others, f"{device_count} devices / {given}")
  sizes = tuple(resolved.mesh[name] for name in config_lib.MESH_AXES)
  if math.prod(sizes) != device_count:
    raise ValueError(f"mesh.data * mesh.fsdp * mesh.expert * mesh.tensor = {' * '.join(map(str, sizes))} = "
                     f"{math.prod(sizes)} must equal the number of devices ({device_count})")
  config_lib.validate(resolved)

  tokenizer_vocab = data_lib.pipeline.model_vocab_size(resolved.data)
  if resolved.model.vocab_size == 0:
    sentinels = f" and {resolved.data.num_sentinels} sentinels" if resolved.data.objective == "span_corruption" else ""
    decide("model.vocab_size", tokenizer_vocab, f"the {resolved.data.tokenizer!r} tokenizer's vocabulary{sentinels}")
  elif resolved.model.vocab_size < tokenizer_vocab:
    raise ValueError(f"model.vocab_size={resolved.model.vocab_size} must be >= the tokenizer's vocabulary "
                     f"({tokenizer_vocab}), or 0 to use it")

  typed = config_lib.typed(resolved)
  derived: dict[str, Any] = {}
  if typed.model.moe_layer_interval > 0:
    moe = typed.moe
    platform = platform or jax.default_backend()
    split = typed.mesh.expert > 1
    backend = dispatch.resolve_backend(moe.dispatch, platform, split)
    if backend != moe.dispatch:
      why = (f"experts split over {typed.mesh.expert} devices: no ragged all-to-all, capacity buffers instead"
             if split and moe.dispatch in dispatch.RAGGED + ("auto",) and backend == "gather"
             else f"the best dropless grouped matmul installed for platform {platform!r}, of "
                  f"{dispatch.AUTO.get(platform, dispatch.AUTO_ELSEWHERE) + dispatch.AUTO_ELSEWHERE}")
      decide("moe.dispatch", backend, why)
      typed = config_lib.typed(resolved)
    derived = _moe_facts(typed)

  result = Resolved(requested=config, config=resolved, typed=typed, decisions=tuple(decisions), derived=derived)
  if log:
    for decision in result.decisions:
      print(decision.line(), flush=True)
  return result


def _moe_facts(exp: config_lib.ExperimentConfig) -> dict[str, Any]:
  """Tokens per routing group, and the expert capacity C (per group) in training and evaluation where the router
  has one (`MoeConfig.capacity`: Soft MoE has none)."""
  moe, group = exp.moe, exp.tokens_per_group
  facts = {"moe.tokens_per_group": group}
  for key, training in (("moe.capacity", True), ("moe.eval_capacity", False)):
    capacity = moe.capacity(group, training=training)
    if capacity is not None:
      facts[key] = capacity
  return facts


def train_flops_per_token(config: ml_collections.ConfigDict, model_cfg: config_lib.ModelConfig) -> float:
  """Training FLOPs per token of train.seq_len (the encoder-decoder: per encoder input token, its decoder's
  share included), for MFU and the sweep summaries."""
  seq_len = config.train.seq_len
  if model_cfg.architecture == "encoder_decoder":
    targets = span_corruption.lengths(seq_len, config.data.noise_density, config.data.mean_noise_span_length)
    return flops.flops_per_sequence(model_cfg, seq_len, targets.targets).train / seq_len
  return flops.flops_per_token(model_cfg, seq_len).train
