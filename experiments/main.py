"""The main job: a small Switch Transformer vs its FLOP-matched dense twin on the embedded stdlib corpus.

  make run            (or: python experiments/main.py [--steps 200] [--workdir workdirs/main] [--fresh])

Trains configs/lm.py:switch-cpu and :dense-cpu one after the other (each resumes if interrupted), then scores
both final models on the same `--eval_batches` validation batches and prints the Switch - dense gap with a 95%
t-interval over the per-batch differences. The pairing removes the batch-to-batch spread of the text both
models see; the interval is the uncertainty of the evaluation sample only. It does not cover seed-to-seed
variation (another initialisation and data order), which at this budget is larger: that needs several seeds,
the study in results/README.md (protocol: results/PROTOCOL.md). ~5 minutes on 2 CPU cores.
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from configs import lm  # noqa: E402
from moe_jax import parallel, runstate, stats, train  # noqa: E402

ARMS = ("switch-cpu", "dense-cpu")


def per_batch_eval_losses(workdir: str, num_batches: int) -> np.ndarray:
  """Mean token cross-entropy of each of the first `num_batches` validation batches (train.EVAL_SEED order),
  scored by the model of the latest checkpoint of the run in `workdir`, on the mesh the run trained on.
  [num_batches]"""
  mesh = parallel.create_mesh_for(runstate.run_config(workdir).mesh)
  with parallel.mesh_context(mesh):
    run = runstate.load(workdir, mesh=mesh)
    sharding = runstate.batch_sharding(mesh)
    losses = []
    for batch in train.evaluation_iterator(run.typed, num_batches):
      ce_sum, weight_sum = train.eval_step(run.model, runstate.global_batch(batch, sharding))
      losses.append(float(ce_sum) / max(float(weight_sum), 1.0))
  return np.asarray(losses)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--eval_batches", type=int, default=32, help="validation batches of the final comparison")
  parser.add_argument("--workdir", default="workdirs/main")
  parser.add_argument("--fresh", action="store_true", help="delete earlier runs in --workdir first")
  args = parser.parse_args()
  if args.fresh:
    shutil.rmtree(args.workdir, ignore_errors=True)

  start = time.perf_counter()
  configs, results = {}, {}
  for name in ARMS:
    config = lm.get_config(name)
    config.train.num_steps = args.steps
    configs[name] = config
    print(f"\n=== {name}: {config.model.num_layers} blocks, d_model {config.model.d_model}, "
          f"{'%d experts on every %d-th block' % (config.moe.num_experts, config.model.moe_layer_interval) if config.model.moe_layer_interval else 'dense'} ===",
          flush=True)
    results[name] = train.train_and_evaluate(config, os.path.join(args.workdir, name))
    if results[name].status != "completed":
      print(f"{name} {results[name].status} at step {results[name].step}; run again to continue")
      return

  tokens = args.steps * configs["dense-cpu"].train.batch_size * configs["dense-cpu"].train.seq_len
  per_batch = {name: per_batch_eval_losses(os.path.join(args.workdir, name), args.eval_batches) for name in ARMS}
  print(f"\nvalidation cross-entropy (nats per byte) after {args.steps} steps ({tokens / 1e6:.2f}M training tokens), "
        f"mean over the same {args.eval_batches} validation batches")
  for name in ARMS:
    print(f"  {name:<12} {np.mean(per_batch[name]):.4f}   (training {results[name].wall_time_s:.0f} s)")
  gap = stats.paired_difference(per_batch["switch-cpu"], per_batch["dense-cpu"])
  low, high = gap.interval
  print(f"  Switch - dense: {gap.mean:+.4f} nats (paired standard error {gap.standard_error:.4f}; 95% interval "
        f"{low:+.4f} .. {high:+.4f}; negative = Switch better)")
  ahead = gap.verdict("Switch", "dense")
  if ahead != "inconclusive":
    verdict = (f"beyond the evaluation noise: these two models differ by more than their scoring sample explains "
               f"({ahead} ahead)")
  else:
    verdict = "within the evaluation noise: on this sample the two models cannot be told apart"
  print(f"  {verdict}.")
  print("  One seed each at a tiny budget: another seed moves the gap by up to a few hundredths of a nat (seed pairs in "
        "results/README.md), so this run alone says nothing about Switch vs dense. The multi-seed study, its "
        "protocol and intervals: results/README.md, results/PROTOCOL.md.")
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
