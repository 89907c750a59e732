"""Host memory and throughput of importing a Hugging Face checkpoint (moe_jax.interop.load).

  python benchmarks/interop_import.py          # a ~300 MB random Mixtral-style checkpoint; a minute or two
  python benchmarks/interop_import.py --d_model 32 --d_ff 64 --num_layers 2 --vocab_size 128 \
      --output /tmp/interop_import.json        # smoke run (tests/test_interop.py)

Writes a random checkpoint of the family (--family, default mixtral; float32, 494 MB at the default sizes) in
safetensors shards of --shard_mb with their index, tensor by tensor (never all in memory), then imports it in a
fresh Python process onto one CPU device. The goal (issue 31): for a checkpoint of N bytes, peak host memory at
most N plus one tensor. Here N is the checkpoint's tensor bytes (its files less their headers) and one tensor is
its largest tensor (the embedding at the default sizes). On the CPU backend the imported model itself lives in
host memory (N bytes of float32 parameters for a float32 checkpoint), so the figure checked is the import's peak
resident set (VmHWM, reset just before the import) less the resident set before it (jax up, moe_jax imported),
against N + the largest tensor. Also recorded: the import's wall time and MB/s (N / seconds), and the machine;
--note says under what conditions it ran (a shared machine's MB/s is not a throughput to quote). JSON at --output
(default benchmarks/results/interop_import.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness (benchmarks/ is not a package)
from moe_jax import fileio  # noqa: E402  (no jax: the baseline RSS stays the import's own)

DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results", "interop_import.json")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="mixtral", help="a Llama-style MoE family: mixtral, olmoe, qwen3_moe")
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=1792)
  parser.add_argument("--num_layers", type=int, default=4)
  parser.add_argument("--num_experts", type=int, default=8)
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--shard_mb", type=int, default=100)
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  parser.add_argument("--note", default="", help="recorded with the figures: e.g. that the machine was shared")
  parser.add_argument("--import_only", default=None, help=argparse.SUPPRESS)  # the child process: a checkpoint dir
  return parser.parse_args(argv)


def hf_config(args) -> dict:
  """A float32 config.json of the family at the benchmark's sizes (head_dim 64, 4x fewer kv heads)."""
  from moe_jax.interop import families

  family = families.get(args.family)
  heads = max(args.d_model // 64, 1)
  hf = dict(family.TEMPLATE, model_type=family.MODEL_TYPE, architectures=[family.ARCHITECTURE], dtype="float32",
            vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
            moe_intermediate_size=args.d_ff, num_hidden_layers=args.num_layers, num_attention_heads=heads,
            num_key_value_heads=max(heads // 4, 1), head_dim=args.d_model // heads, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            num_local_experts=args.num_experts, num_experts=args.num_experts, num_experts_per_tok=2,
            norm_topk_prob=True, tie_word_embeddings=False)
  return hf


def write_random_checkpoint(args, directory: str) -> None:
  """The family's tensors at random (normal, std 0.02), written one at a time."""
  import numpy as np
  from flax import nnx

  from moe_jax import models
  from moe_jax.interop import shards, transfer

  hf = hf_config(args)
  config, family = transfer.hf_config_to_moe(hf)
  model_cfg = transfer.typed_model(config)
  abstract = nnx.state(nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
  shapes = {path: v.get_value().shape for path, v in nnx.to_flat_state(abstract)}
  rng = np.random.default_rng(0)

  def tensors():
    for rule in family.rules(model_cfg):
      value = rng.standard_normal(shapes[rule.param], dtype=np.float32) * np.float32(0.02)
      yield from zip(rule.tensors, rule.transform.to_tensors(value))

  shards.write_checkpoint(directory, tensors(), max_shard_bytes=args.shard_mb * 10**6)
  fileio.write_json(os.path.join(directory, shards.CONFIG), hf)


def memory_status() -> dict[str, int]:
  """This process's resident set now (VmRSS) and its peak since the last reset (VmHWM), in bytes (Linux)."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
  """Start VmHWM again from the current resident set (proc(5), /proc/pid/clear_refs: 5)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def import_only(directory: str) -> dict:
  """In the child: the checkpoint's sizes, RSS before the import, its peak during it, its time."""
  import jax

  from moe_jax import interop
  from moe_jax.interop import shards

  jax.numpy.zeros(1).block_until_ready()  # the backend up before the baseline
  reader = shards.CheckpointReader(directory)
  checkpoint_bytes = reader.nbytes()
  largest = max(reader.nbytes(name) for name in reader.names)
  reset_peak()
  before = memory_status()["VmRSS"]
  start = time.perf_counter()
  _, model = interop.load(directory)
  jax.block_until_ready(jax.tree.leaves(model))
  seconds = time.perf_counter() - start
  peak = memory_status()["VmHWM"]
  return {"checkpoint_bytes": checkpoint_bytes, "largest_tensor_bytes": largest, "rss_before_bytes": before,
          "peak_rss_bytes": peak, "seconds": seconds, "mb_per_s": checkpoint_bytes / 1e6 / seconds}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.import_only:
    print(json.dumps(import_only(args.import_only)))
    return {}
  import harness  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as directory:
    write_random_checkpoint(args, directory)
    files = sorted(os.listdir(directory))
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--import_only", directory],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": REPO})
  measured = json.loads(child.stdout.strip().splitlines()[-1])
  over = measured["peak_rss_bytes"] - measured["rss_before_bytes"]
  bound = measured["checkpoint_bytes"] + measured["largest_tensor_bytes"]
  report = {"config": {k: v for k, v in vars(args).items() if k != "import_only"}, "files": files,
            "machine": harness.machine_info(), **measured, "peak_over_baseline_bytes": over,
            "bound_bytes": bound, "within_bound": over <= bound,
            "peak_over_baseline_per_checkpoint_byte": over / measured["checkpoint_bytes"],
            "bound_per_checkpoint_byte": bound / measured["checkpoint_bytes"]}
  print(f"{args.family}: {measured['checkpoint_bytes'] / 1e6:,.1f} MB in {len(files)} files imported in "
        f"{measured['seconds']:.2f} s ({measured['mb_per_s']:,.0f} MB/s); peak RSS over baseline "
        f"{over / 1e6:,.1f} MB = {over / measured['checkpoint_bytes']:.3f} x the checkpoint (bound: checkpoint + "
        f"largest tensor = {bound / 1e6:,.1f} MB = {bound / measured['checkpoint_bytes']:.3f} x, "
        f"{'met' if over <= bound else 'NOT met'})")
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, report, indent=2)
  print(f"wrote {args.output}")
  return report


if __name__ == "__main__":
  main()
