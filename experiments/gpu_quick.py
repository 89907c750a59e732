"""Quick GPU sweep: dense vs Switch E = 8 and 16 at d_model 512 in bfloat16 on the embedded stdlib corpus.

  python experiments/gpu_quick.py [--workdir_root workdirs] [--results_root results] [--data_dir DIR]
  python experiments/gpu_quick.py --size=gpu-quick-tiny     # the same three runs at toy size (CPU test)

Runs configs/sweeps/scaling.py:gpu-quick (configs/lm.py:*-gpu widths: 8 blocks, d_model 512, d_ff 2048; 500
steps of 32 x 512 bytes = 8.2M fresh tokens a run, seed 0) through the sweep runner and writes
results/scaling-gpu-quick/{summary.json, summary.csv, curves.json}, as the CPU sweep does. Budget: <= 8 minutes
for all three runs on one H100/H200, compilation included; the script prints each run's time and tokens/s.
It refuses to start when a run would read more tokens than the training split holds (a repeated token).

On the lent GPU machine (Python 3.12, jax, flax, optax, orbax-checkpoint and chex installed; no network, no
ml-collections, grain or tensorflow-datasets). Here, in the repository root:

  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
      ml-collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6 tensorboardX==2.6.5 \\
      importlib-resources==7.1.0 dm-tree==0.1.10 docstring-parser==0.18.0 googleapis-common-protos==1.76.0 \\
      immutabledict==4.3.1 portpicker==1.6.0 simple-parsing==0.1.9 tensorflow-metadata==1.21.0 \\
      termcolor==3.3.0 toml==0.10.2
  python3 -m pip wheel --no-deps -w .whl promise==2.3     # sdist only: build its pure-Python wheel here

(~11 MB; the list is the closure of those three packages' requirements minus what the GPU image has.) Then run
there with `.whl` carried:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
  PYTHONUNBUFFERED=1 python3 experiments/gpu_quick.py --workdir_root=/tmp/runs --results_root=$OUT/results

The corpus is the running Python's standard library, prepared on first use into ~/.cache/moe_jax/tfds (tfds
and array-record from the wheels; under a minute, not counted in the budget). A cache carried from here is not
used there: its key holds the Python version and the file list, and the GPU image's Python 3.12 differs (a
Debian-style stdlib without test/ is ~12M bytes, which is why a run stays at 8.2M tokens). So the GPU corpus
and validation split differ from the CPU study's, as do the model size, dtype and tokens per step: compare
arms within this sweep, not with the CPU results.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs.sweeps import common, scaling  # noqa: E402
from moe_jax import sweep as sweep_lib  # noqa: E402
from moe_jax.data import pipeline  # noqa: E402

BUDGET_S = 8 * 60


def training_split_tokens(data_config) -> int:
  """Tokens of one epoch of the training split (EOS included), as the pipeline reads them."""
  source, text_key = pipeline.document_source(data_config, "train")
  tokenizer = pipeline.get_tokenizer(data_config)
  docs = pipeline.tokenized_documents(source, text_key=text_key, tokenizer=tokenizer, seed=0, repeat=False)
  return sum(len(docs[i]["tokens"]) for i in range(len(docs)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="gpu-quick", choices=("gpu-quick", "gpu-quick-tiny"))
  parser.add_argument("--workdir_root", default="workdirs")
  parser.add_argument("--results_root", default="results")
  parser.add_argument("--data_dir", default=None, help="prepared-corpus cache (default ~/.cache/moe_jax/tfds)")
  args = parser.parse_args()

  import jax

  sweep = scaling.get_config(args.size)
  if args.data_dir:
    for run in sweep.runs:
      run.overrides.data.data_dir = args.data_dir
  configs = {run.name: common.build_config(run) for run in sweep.runs}
  print(f"{sweep.name}: {len(sweep.runs)} runs on {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  start = time.perf_counter()
  epoch = training_split_tokens(next(iter(configs.values())).data)
  tokens = max(c.train.num_steps * c.train.batch_size * c.train.seq_len for c in configs.values())
  if tokens > epoch:
    raise SystemExit(f"a run would read {tokens} tokens but the training split holds {epoch}: tokens would "
                     "repeat; lower train.num_steps in configs/sweeps/common.py or use a larger corpus")
  print(f"corpus: {epoch / 1e6:.1f}M training tokens; a run reads {tokens / epoch:.0%} of an epoch "
        f"({time.perf_counter() - start:.0f} s to prepare and count)", flush=True)

  sweep_start = time.perf_counter()
  refused = sweep_lib.run_sweep(sweep, common.build_config, args.workdir_root)
  elapsed = time.perf_counter() - sweep_start
  rows = sweep_lib.aggregate(sweep, common.build_config, args.workdir_root, args.results_root)
  print(f"\n{sweep.name} -> {os.path.join(args.results_root, sweep.name)}")
  for row in rows:
    print(f"  {row['run']:<14} eval {row['final_eval_loss']:.4f}  {row['wall_time_s']:6.0f} s  "
          f"{row['tokens_per_s']:9.0f} tokens/s (median step)")
  within = "within" if elapsed <= BUDGET_S else "OVER"
  print(f"all runs {elapsed:.0f} s, {within} the {BUDGET_S // 60}-minute budget (corpus preparation excluded)")
  if refused:  # reported one line each as they happened; the others ran
    print(f"{len(refused)} run(s) refused: {sorted(refused)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
