"""What a config costs: parameters (total vs active, by component), FLOPs per token, and memory to train and serve.

  python experiments/model_stats.py --config=configs/mixtral.py:full [--config.moe.num_experts=16 ...]
      [--devices=256] [--serve_batch=1] [--serve_context=32768] [--json]
  python experiments/model_stats.py --systems_table     # the README's table of the published systems
  python experiments/model_stats.py --switch_table      # the README's Switch Table 9 comparison

An encoder-decoder (configs/switch_t5.py) is also counted per sequence: train.seq_len encoder tokens and the
span-corruption targets they imply (512 -> 114).

Every figure comes from moe_jax.flops, the same code the FLOPs of training runs and the tests use, applied to
the typed model config that the model is built from. Memory is per device for the config's batch, sequence
length, optimizer, compute dtype and mesh (the axis of size 0 takes the --devices the others leave), split as
moe_jax.parallel splits it (fsdp, expert, tensor; `flops.memory_estimate`). experiments/plan.py compiles the
step for a mesh and prints XLA's figures next to these.
"""

import dataclasses
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_jax import config_lib, flops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mixtral.py:full.")
_DEVICES = flags.DEFINE_integer("devices", 0, "devices for the mesh axis of size 0 (default: the other axes' product)")
_SERVE_BATCH = flags.DEFINE_integer("serve_batch", 1, "sequences served at once, for the KV cache")
_SERVE_CONTEXT = flags.DEFINE_integer("serve_context", 0, "tokens per served sequence (default: max_seq_len)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of the table")
_SYSTEMS_TABLE = flags.DEFINE_bool("systems_table", False, "print the markdown table of configs/SYSTEMS")
_SWITCH_TABLE = flags.DEFINE_bool("switch_table", False, "print the markdown table of Switch Table 9 vs ours")

# The published systems, one config file each (configs/<module>.py, variant 'full').
SYSTEMS = ("mixtral", "dbrx", "deepseekmoe", "olmoe", "qwen3_moe", "glam", "deepseek_v3")

def stats(config, *, devices: int = 0, serve_batch: int = 1, serve_context: int = 0) -> dict:
  """Every figure the calculator prints, for `config` (an experiment ConfigDict)."""
  # The tokenizer's vocabulary is only needed when model.vocab_size = 0 (the byte tokenizer's 259).
  cfg = config_lib.model_config(config, vocab_size=259)
  sizes = {name: config.mesh[name] for name in config_lib.MESH_AXES}
  given = math.prod(v for v in sizes.values() if v)
  devices = devices or given
  for name, size in sizes.items():  # the axis of size 0 (at most one) takes the devices the others leave
    if size == 0:
      sizes[name] = devices // given
  devices = math.prod(sizes.values())
  expert = sizes["expert"] if cfg.moe_layers else 1
  breakdown = flops.param_breakdown(cfg)
  sequence = None
  if cfg.architecture == "encoder_decoder":  # FLOPs of one (inputs, targets) pair of span corruption
    from moe_jax.data import span_corruption

    lengths = span_corruption.lengths(config.train.seq_len, config.data.noise_density,
                                      config.data.mean_noise_span_length)
    per_sequence = flops.flops_per_sequence(cfg, lengths.inputs, lengths.targets)
    sequence = {"forward": per_sequence.forward, "train": per_sequence.train, "inputs_length": lengths.inputs,
                "targets_length": lengths.targets,
                **{k: getattr(per_sequence, k) for k in flops.FlopsBreakdown.__dataclass_fields__}}
    per_token = flops.FlopsBreakdown(*(v / lengths.inputs for v in dataclasses.astuple(per_sequence)))
  else:
    per_token = flops.flops_per_token(cfg, config.train.seq_len)
  memory = flops.memory_estimate(cfg, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                                 optimizer=config.train.optimizer, data_devices=devices // (
                                     expert * sizes["fsdp"] * sizes["tensor"]),
                                 expert_devices=expert, fsdp_devices=sizes["fsdp"], tensor_devices=sizes["tensor"])
  context = serve_context or cfg.max_seq_len
  return {
      "params": {**{k: getattr(breakdown, k) for k in (
          "embeddings", "attention", "position_bias", "norms", "dense_ffn", "router", "shared_experts", "routed_experts",
          "routed_experts_active")}, "total": breakdown.total, "active": breakdown.active},
      "flops_per_token": {"forward": per_token.forward, "train": per_token.train, "seq_len": config.train.seq_len},
      # encoder-decoder only: one sequence of inputs_length encoder and targets_length decoder tokens
      **({"flops_per_sequence": sequence} if sequence else {}),
      "train_memory_per_device": {"devices": devices, "mesh": sizes, "expert_shards": expert,
                                  "weights": memory.params,
                                  "gradients": memory.gradients, "optimizer": memory.optimizer,
                                  "activations": memory.activations, "total": memory.total,
                                  "checkpoint_on_disk": memory.checkpoint},
      "inference": {"weights_bf16": 2.0 * breakdown.total, "batch": serve_batch, "context": context,
                    "kv_cache_bf16": flops.kv_cache_bytes(cfg, batch_size=serve_batch, context=context)},
  }


def _billions(n: float) -> str:
  return f"{n / 1e9:,.2f}B"


def _gib(n: float) -> str:
  return f"{n / 2**30:,.1f} GiB"


def table(s: dict) -> str:
  p, f, m, i = s["params"], s["flops_per_token"], s["train_memory_per_device"], s["inference"]
  lines = ["parameters"]
  lines += [f"  {k:<24} {_billions(v):>12}" for k, v in p.items() if k not in ("total", "active")]
  lines += [f"  {'total':<24} {_billions(p['total']):>12}", f"  {'active per token':<24} {_billions(p['active']):>12}",
            f"FLOPs per token at L = {f['seq_len']}",
            f"  {'forward':<24} {f['forward'] / 1e9:>11,.2f}G", f"  {'training (3x)':<24} {f['train'] / 1e9:>11,.2f}G",
            *([f"FLOPs per sequence of {s['flops_per_sequence']['inputs_length']} input and "
               f"{s['flops_per_sequence']['targets_length']} target tokens (per token above: per input token)",
               f"  {'forward':<24} {s['flops_per_sequence']['forward'] / 1e9:>11,.1f}G"]
              if "flops_per_sequence" in s else []),
            f"training memory per device ({m['devices']} devices, mesh "
            + " ".join(f"{k}={v}" for k, v in m["mesh"].items()) + ")"]
  lines += [f"  {k:<24} {_gib(m[k]):>12}" for k in ("weights", "gradients", "optimizer", "activations", "total")]
  lines += [f"  {'checkpoint (all devices)':<24} {_gib(m['checkpoint_on_disk']):>12}"]
  lines += [f"inference (bf16): weights {_gib(i['weights_bf16'])}, KV cache {_gib(i['kv_cache_bf16'])} for "
            f"{i['batch']} x {i['context']} tokens"]
  return "\n".join(lines)


def systems_table() -> str:
  """Markdown: each published system's total and active parameters (ours next to the published ones), forward
  FLOPs per token and bf16 weight bytes, all from `stats`, and whether moe_jax.interop loads its published
  checkpoint (`families.published`)."""
  import importlib

  from moe_jax.interop import families

  rows = ["| system | total (published) | active (published) | forward GFLOPs / token | bf16 weights | loads the "
          "published checkpoint |", "| --- | --- | --- | --- | --- | --- |"]
  for module in SYSTEMS:
    family = importlib.import_module(f"configs.{module}")
    s, system = stats(family.get_config("full")), family.SYSTEM
    p = s["params"]
    rows.append(f"| {system.name} | {_billions(p['total'])} ({_billions(system.published_total)}) | "
                f"{_billions(p['active'])} ({_billions(system.published_active)}) | "
                f"{s['flops_per_token']['forward'] / 1e9:,.1f} at L = {s['flops_per_token']['seq_len']} | "
                f"{s['inference']['weights_bf16'] / 1e9:,.0f} GB | {families.published(system.name)} |")
  return "\n".join(rows)


def _figure(n: float, *, trillions: bool = False) -> str:
  """A figure as Table 9 prints it: billions (0.223B, 1571B), FLOPs from 10^12 on in trillions (6.3T)."""
  return f"{n / 1e12:g}T" if trillions and n >= 1e12 else f"{n / 1e9:g}B"


def switch_table() -> str:
  """Markdown: Switch Table 9's models (configs/switch_t5.py), our parameters and forward FLOPs per sequence
  (512 encoder / 114 decoder tokens) next to the published ones, all from `stats`."""
  from configs import switch_t5

  rows = ["| model | params (ours) | Table 9 | gap | FLOPs / seq (ours) | Table 9 | gap |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, (params, per_sequence) in switch_t5.TABLE9.items():
    s = stats(switch_t5.get_config(name))
    total, forward = s["params"]["total"], s["flops_per_sequence"]["forward"]
    rows.append(f"| {name} | {total / 1e9:,.3f}B | {_figure(params)} | {total / params - 1:+.1%} | "
                f"{forward / 1e9:,.1f}B | {_figure(per_sequence, trillions=True)} | "
                f"{forward / per_sequence - 1:+.1%} |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SYSTEMS_TABLE.value:
    print(systems_table())
    return
  if _SWITCH_TABLE.value:
    print(switch_table())
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<file>.py:<variant> is required (or --systems_table)")
  try:
    result = stats(_CONFIG.value, devices=_DEVICES.value, serve_batch=_SERVE_BATCH.value,
                   serve_context=_SERVE_CONTEXT.value)
  except ValueError as error:
    print(f"invalid configuration: {error}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result) if _JSON.value else table(result))


if __name__ == "__main__":
  app.run(main)
