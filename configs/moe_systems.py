"""What the published MoE systems' configs share: a decoder at its published widths for a pod, and a `cpu` variant
with the same structure at a tiny width that trains on the embedded corpus.

Each family file (configs/mixtral.py, dbrx.py, ...) describes its system as a `System`: the published widths
with their sources, and the routing. `get_config(system, variant)` turns it into an experiment config:
  full   the published sizes and architecture (their vocabulary, rotary base, norm epsilon, QK-norm, biases;
         bf16 compute; Adafactor-free AdamW as the systems report), for the calculator
         (`experiments/model_stats.py`) and for pods;
  cpu    the same structure (attention grouping, experts per token, shared experts, dense first blocks, MoE
         interval) at d_model 64 on the stdlib corpus's byte vocabulary, a few hundred steps on 2 cores.
"""

from __future__ import annotations

import dataclasses

from moe_jax import config_lib

# The cpu variant's widths: heads and experts keep the system's ratios where they fit.
CPU_WIDTH = dict(d_model=64, head_dim=16, max_seq_len=128)
CPU_LAYERS = 4
CPU_MAX_EXPERTS = 16


@dataclasses.dataclass(frozen=True)
class System:
  """A published MoE decoder: widths (model.*), routing (moe.*) and what we do not implement of it."""

  name: str
  model: dict  # model.* fields at the published size
  moe: dict  # moe.* fields at the published size
  published_total: float  # parameters, as the paper or model card states them
  published_active: float
  not_modelled: str = ""  # parts of the published model left out of the figures (said in the docstring)
  train: dict = dataclasses.field(default_factory=dict)  # train.* fields of the system's recipe, both variants
  cpu_moe: dict = dataclasses.field(default_factory=dict)  # moe.* the cpu variant's fewer experts change
  # model.* of the published attention and norms (rotary base, norm epsilon, QK-norm, biases, qkv clipping), each
  # with its source: the full variant only, so that the cpu variants keep training as they did.
  architecture: dict = dataclasses.field(default_factory=dict)


def get_config(system: System, variant: str):
  if variant not in ("full", "cpu"):
    raise ValueError(f"config variant {variant!r} must be 'full' or 'cpu'")
  config = config_lib.default_config()
  config.model.update(system.model)
  config.moe.update(system.moe)
  config.train.update(system.train)
  config.moe.dispatch = "dropless" if system.moe.get("dropless") else "gather"
  if variant == "full":
    config.model.update(system.architecture)
    config.model.dtype = "bfloat16"
    config.data.dataset = "c4/en"
    config.data.tokenizer = f"/path/to/{system.name}_tokenizer.model"  # set --config.data.tokenizer on the pod
    config.train.update(dict(batch_size=1024, seq_len=4096 if system.model["max_seq_len"] >= 4096 else 2048))
    config.mesh.data, config.mesh.expert = 0, 8
    return config
  return _cpu(config, system)


def _cpu(config, system: System):
  """The same structure at a tiny width: heads, kv-head grouping, experts per token, shared experts and dense
  first blocks kept; widths, depth and expert count shrunk."""
  model, moe = system.model, system.moe
  heads = 4
  group = model["num_heads"] // (model.get("num_kv_heads") or model["num_heads"])  # query heads per kv head
  experts = min(moe["num_experts"], CPU_MAX_EXPERTS)
  # Experts per token scale with the expert count, but a top-k router stays top-k (k >= 2).
  k = moe.get("top_k", {}).get("k", 1)
  top_k = max(2, round(k * experts / moe["num_experts"])) if k > 1 else 1
  ffn_ratio = model["d_ff"] / model["d_model"]
  config.model.update(dict(CPU_WIDTH, vocab_size=0, num_heads=heads, num_kv_heads=max(1, heads // group),
                           d_ff=int(CPU_WIDTH["d_model"] * ffn_ratio), num_layers=CPU_LAYERS,
                           moe_start_block=min(model.get("moe_start_block", 0), 1)))
  expert_ratio = (moe.get("expert_d_ff") or model["d_ff"]) / model["d_model"]
  config.moe.update(dict(num_experts=experts, top_k=dict(k=top_k),
                         expert_d_ff=max(8, int(CPU_WIDTH["d_model"] * expert_ratio)) if moe.get("expert_d_ff") else 0))
  config.moe.update(system.cpu_moe)
  if moe.get("shared_expert_d_ff"):
    config.moe.shared_expert_d_ff = max(8, int(CPU_WIDTH["d_model"] * moe["shared_expert_d_ff"] / model["d_model"]))
  config.train.update(dict(batch_size=16, seq_len=128, num_steps=200, warmup_steps=20, eval_every=100,
                           log_every=20, checkpoint_every=100))
  return config
