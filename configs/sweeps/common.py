"""Shared pieces of the sweep configs: sizes, run specs, and how a run's config is built.

A sweep is a ConfigDict {name, size, runs: [ {name, group, base, seed, flop_matched, config_file, overrides} ]};
each run's config is `configs/<config_file>.py:<base>-<size>` (configs/lm.py unless named) with `overrides`
(dotted field paths) applied. The runner
`experiments/sweep.py` trains them, skips finished ones, and aggregates results/<sweep>/.
"""

import importlib

import ml_collections

# Per-size training settings shared by every run of a sweep (on top of configs/lm.py:<kind>-<size>).
SIZE_SETTINGS = {
    # 2 CPU cores: 250 steps of 32 x 128 bytes (1M fresh tokens of the 31 MB stdlib corpus, ~1/30 epoch).
    "cpu": {"train.num_steps": 250, "train.warmup_steps": 25, "train.eval_every": 25, "train.eval_batches": 16,
            "train.checkpoint_every": 100, "train.log_every": 50},
    # One GPU: lm1b bytes, 10k steps of 32 x 512 (164M fresh tokens).
    "gpu": {"train.eval_every": 500, "train.eval_batches": 50, "train.checkpoint_every": 1000},
    # Switch-Base on a pod: the paper's step count is in configs/lm.py.
    "paper": {},
    # One H100/H200 in <= 8 minutes for 3 runs, compile included (experiments/gpu_quick.py): the gpu model
    # (d_model 512, 8 blocks) in bfloat16 on the embedded stdlib corpus, 500 steps of 32 x 512 bytes = 8.2M
    # fresh tokens (under one epoch even of a Debian stdlib without test/, ~12M bytes; the script checks).
    "gpu-quick": {"data.dataset": "stdlib", "model.dtype": "bfloat16", "train.num_steps": 500,
                  "train.warmup_steps": 50, "train.eval_every": 100, "train.eval_batches": 20,
                  "train.checkpoint_every": 0, "train.log_every": 100, "train.peak_tflops": 989.0},
    # The same runs at toy size on CPU: the test of the script.
    "gpu-quick-tiny": {"data.dataset": "stdlib", "model.dtype": "bfloat16", "model.d_model": 32,
                       "model.num_heads": 2, "model.head_dim": 16, "model.d_ff": 64, "model.num_layers": 2,
                       "model.max_seq_len": 32, "train.batch_size": 4, "train.seq_len": 32, "train.num_steps": 4,
                       "train.warmup_steps": 1, "train.eval_every": 2, "train.eval_batches": 1,
                       "train.checkpoint_every": 0, "train.log_every": 2, "train.peak_tflops": 1.0},
}
# Sweep sizes whose runs start from another size of configs/lm.py (default: the same name).
LM_SIZE = {"gpu-quick": "gpu", "gpu-quick-tiny": "gpu"}


def new_sweep(name: str, size: str) -> ml_collections.ConfigDict:
  if size not in SIZE_SETTINGS:
    raise ValueError(f"sweep size {size!r} must be one of {tuple(SIZE_SETTINGS)}")
  return ml_collections.ConfigDict({"name": f"{name}-{size}", "size": size, "runs": []})


def add_run(sweep: ml_collections.ConfigDict, name: str, *, group: str, base: str, seed: int,
            overrides: dict | None = None, flop_matched: bool = True, config_file: str = "lm") -> None:
  """Append a run: `base` names the variant of `configs/<config_file>.py` without its size ('switch' or
  'dense' of configs/lm.py; 'switch-base' of configs/switch_t5.py); `group` gathers the seeds of one setting."""
  size = sweep.size
  nested: dict = {}
  for path, value in dict(SIZE_SETTINGS[size], seed=seed, **(overrides or {})).items():
    *parents, leaf = path.split(".")
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  sweep.runs.append(ml_collections.ConfigDict({
      "name": name, "group": group, "base": f"{base}-{LM_SIZE.get(size, size)}", "seed": seed,
      "flop_matched": flop_matched, "config_file": config_file,
      "overrides": nested,
  }))


def flat_overrides(run: ml_collections.ConfigDict) -> dict:
  """The run's overrides as {'dotted.path': value}."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value

  walk(run.overrides, "")
  return flat


def build_config(run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full experiment config of one run."""
  config = importlib.import_module(f"configs.{run.get('config_file', 'lm')}").get_config(run.base)
  for path, value in flat_overrides(run).items():
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise ValueError(f"sweep run {run.name!r} overrides unknown config field {path!r}")
    node[leaf] = value
  return config
