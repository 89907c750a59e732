"""The config of an existing run: its workdir's config.json, as the run requested it (auto values stay auto, so
the mesh is chosen again for this machine's devices).

  # fine-tune a run, e.g. a checkpoint imported with experiments/convert.py, from its newest checkpoint
  python experiments/train.py --config=configs/from_run.py:/runs/olmoe --config.train.init_from=/runs/olmoe \
      --config.train.num_steps=500 --config.train.learning_rate=1e-4 --workdir=/runs/olmoe-ft
  # upcycle an imported dense model into a MoE of its widths
  python experiments/upcycle.py --dense_workdir=/runs/llama --config=configs/from_run.py:/runs/llama \
      --config.moe.num_experts=8 --config.model.moe_layer_interval=1 --workdir=/runs/llama-moe

The saved values are laid over `config_lib.default_config()`, so every field keeps its type for command-line
overrides (a field saved as None too) and a field added since the run was saved takes its default; renamed fields
move to their new paths (config_lib.migrate).
"""

import os

from moe_jax import config_lib, fileio


def get_config(workdir: str):
  record = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.isfile(record):
    raise ValueError(f"configs/from_run.py:{workdir}: {record} does not exist (the argument is a run's workdir)")
  requested = fileio.read_json(record)["requested"]
  config = config_lib.default_config()
  config.update(config_lib.migrate(requested))
  return config
