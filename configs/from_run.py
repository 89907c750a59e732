"""The config of an existing run: its workdir's config.json, as the run requested it (auto values stay auto, so
the mesh is chosen again for this machine's devices).

  # fine-tune a run, e.g. a checkpoint imported with experiments/convert.py, from its newest checkpoint
  python experiments/train.py --config=configs/from_run.py:/runs/olmoe --config.train.init_from=/runs/olmoe \
      --config.train.num_steps=500 --config.train.learning_rate=1e-4 --workdir=/runs/olmoe-ft
  # upcycle an imported dense model into a MoE of its widths
  python experiments/upcycle.py --dense_workdir=/runs/llama --config=configs/from_run.py:/runs/llama \
      --config.moe.num_experts=8 --config.model.moe_layer_interval=1 --workdir=/runs/llama-moe

Read as `moe_jax.runstate.run_config` reads a run's resolved config (`config_lib.saved_config`): renamed fields
at their new paths, fields added since at their defaults, every field typed for command-line overrides.
"""

import os

from moe_jax import config_lib, fileio


def get_config(workdir: str):
  record = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.isfile(record):
    raise ValueError(f"configs/from_run.py:{workdir}: {record} does not exist (the argument is a run's workdir)")
  requested = fileio.read_json(record)["requested"]
  return config_lib.saved_config(requested)
