"""The main job: a small Switch Transformer vs its FLOP-matched dense twin on the embedded stdlib corpus.

  make run            (or: python experiments/main.py [--steps 200] [--workdir workdirs/main] [--fresh])

Trains configs/lm.py:switch-cpu and :dense-cpu one after the other (each resumes if interrupted) and prints
their validation cross-entropies side by side.
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import lm  # noqa: E402
from moe_jax import train  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--workdir", default="workdirs/main")
  parser.add_argument("--fresh", action="store_true", help="delete earlier runs in --workdir first")
  args = parser.parse_args()
  if args.fresh:
    shutil.rmtree(args.workdir, ignore_errors=True)

  start = time.perf_counter()
  results = {}
  for name in ("switch-cpu", "dense-cpu"):
    config = lm.get_config(name)
    config.train.num_steps = args.steps
    print(f"\n=== {name}: {config.model.num_layers} blocks, d_model {config.model.d_model}, "
          f"{'%d experts on every %d-th block' % (config.moe.num_experts, config.model.moe_layer_interval) if config.model.moe_layer_interval else 'dense'} ===",
          flush=True)
    results[name] = train.train_and_evaluate(config, os.path.join(args.workdir, name))

    if results[name].status != "completed":
      print(f"{name} {results[name].status} at step {results[name].step}; run again to continue")
      return

  print("\nvalidation cross-entropy (nats per byte) after", args.steps, "steps")
  for name, result in results.items():
    print(f"  {name:<12} {result.eval_loss:.4f}   ({result.wall_time_s:.0f} s)")
  gap = results["switch-cpu"].eval_loss - results["dense-cpu"].eval_loss
  print(f"  Switch - dense: {gap:+.4f} nats  (negative = Switch better)")
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
