"""Train a dense or MoE language model from a config file.

  python experiments/train.py --config=configs/lm.py:switch-cpu --workdir=/tmp/switch \
      [--config.train.num_steps=400 --config.moe.num_experts=16 ...]

Multi-process (TPU pod, GPU cluster): add --distributed on every process; on a plain set of hosts also
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. Each process reads its slice of the data;
process 0 writes metrics; checkpoints are written collectively.

Resumes automatically from the latest checkpoint in --workdir. Exit status: 0 done (or preempted and saved),
1 non-finite loss or failed checkpoint, 2 invalid config.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:switch-cpu.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Initialise jax.distributed for a multi-process run. Without the three flags below, JAX detects the "
    "cluster itself (TPU pods, SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, e.g. 10.0.0.1:1234.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every step at INFO; keep the progress readable
    logging.set_verbosity(logging.WARNING)
  import jax

  if _DISTRIBUTED.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  elif _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
    raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed")
  from moe_jax import resolve, train
  from moe_jax.checkpoint import CheckpointError

  config = _CONFIG.value
  try:
    resolve.resolve(config, jax.device_count())  # every bad field fails here, before anything is built
  except ValueError as error:
    print(f"invalid configuration: {error}", file=sys.stderr)
    sys.exit(2)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except (train.NonFiniteLossError, CheckpointError) as error:
    print(f"training stopped: {error}", file=sys.stderr)
    sys.exit(1)
  evaluated = f"; eval cross-entropy {result.eval_loss:.4f}" if result.eval_loss is not None else ""
  print(f"{result.status} at step {result.step}{evaluated}; wall time {result.wall_time_s:.0f} s; "
        f"workdir {result.workdir}")


def parse_flags(argv):
  """absl's parser, but an unknown --config.x field is a one-line error rather than a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    field = str(error).strip("\"'")
    print(f"invalid configuration: unknown config field {field!r} (fields are listed in docs/config.md)",
          file=sys.stderr)
    sys.exit(2)
  except flags.Error as error:  # a value of the wrong type, a missing required flag, ...
    print(f"invalid configuration: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
