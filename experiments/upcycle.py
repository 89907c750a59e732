"""Sparse upcycling of a dense run (Komatsuzaki et al. 2022): its newest checkpoint becomes step 0 of a MoE run.

  python experiments/upcycle.py --dense_workdir=/tmp/dense --config=configs/lm.py:switch-cpu \
      --config.moe.router=top_k --config.moe.top_k.renormalize=True --workdir=/tmp/upcycled
  python experiments/train.py --config=<the same config and overrides> --workdir=/tmp/upcycled

The config is the MoE model of the dense run's widths (moe_jax.upcycle explains when the upcycled model starts
exactly at the dense model's loss: renormalised top-k weights and no dropped tokens).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_jax import upcycle  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The MoE run's config, e.g. configs/lm.py:switch-cpu.")
_DENSE = flags.DEFINE_string("dense_workdir", None, "Workdir of the dense run to upcycle (its newest checkpoint).")
_WORKDIR = flags.DEFINE_string("workdir", None, "New workdir of the MoE run: its step-0 checkpoint is written here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    step = upcycle.upcycle_checkpoint(_DENSE.value, _CONFIG.value, _WORKDIR.value)
  except ValueError as error:
    print(f"cannot upcycle: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"upcycled step {step} of {_DENSE.value} into {_WORKDIR.value}/checkpoints/0; train with "
        "experiments/train.py and the same --config")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "dense_workdir", "workdir"])
  app.run(main)
