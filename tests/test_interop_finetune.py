"""An imported checkpoint is a run like any other (issue 31 item 4): `configs/from_run.py` gives its config, a run
started from it with `train.init_from` fine-tunes it (its loss falls), and `experiments/upcycle.py` turns an
imported dense model into a MoE that trains. The imported workdir is only read."""

import importlib.util
import os
import subprocess
import sys

import pytest

from moe_jax import interop, train
from tests.helpers import REPO, cpu_env, train_losses
from tests.test_faults_workdir import _snapshot
from tests.test_interop import copy_fixture, write_tokenizer


def _from_run(workdir: str):
  spec = importlib.util.spec_from_file_location("from_run", os.path.join(REPO, "configs", "from_run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(workdir)


# A few short steps on all devices (the import recorded the one mesh it was made on).
SMALL = {"mesh.data": 0, "train.batch_size": 8, "train.seq_len": 16, "train.warmup_steps": 0,
         "train.learning_rate": 1e-2, "train.eval_every": 0, "train.eval_batches": 1, "train.log_every": 1,
         "train.checkpoint_every": 0, "train.peak_tflops": 1.0}
# The upcycled MoE: every FFN becomes 4 experts, top-2, renormalised, dropless.
MOE = {"model.moe_layer_interval": 1, "moe.num_experts": 4, "moe.router": "top_k", "moe.top_k.k": 2,
       "moe.top_k.renormalize": True, "moe.dropless": True}


def _config(workdir: str, data_dir: str, steps: int, fields: dict):
  config = _from_run(workdir)
  for path, value in {**fields, "data.data_dir": data_dir, "train.num_steps": steps}.items():
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The llama fixture (a dense, tied-head Llama of 96 ids) imported with a word-level tokenizer of 96 ids."""
  root = tmp_path_factory.mktemp("imported")
  source = copy_fixture("llama", root / "hf")
  write_tokenizer(source, 96)
  interop.import_to_workdir(str(source), str(root / "run"))
  return str(root / "run")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_an_imported_checkpoint_fine_tunes_from_its_config_with_falling_loss(imported, data_dir, tmp_path):
  before = _snapshot(imported)
  config = _config(imported, data_dir, 8, {**SMALL, "train.init_from": imported})
  result = train.train_and_evaluate(config, str(tmp_path / "tuned"))
  assert result.status == "completed"
  losses = train_losses(tmp_path / "tuned")
  assert min(losses[s] for s in (7, 8)) < losses[1]
  assert _snapshot(imported) == before


@pytest.mark.slow  # the upcycling CLI in a subprocess, then a MoE run: over 20 s on 2 cores
def test_an_imported_dense_model_upcycles_from_the_cli_and_trains(imported, data_dir, tmp_path, capsys):
  upcycled = str(tmp_path / "upcycled")
  fields = {**SMALL, **MOE}
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "upcycle.py"), f"--dense_workdir={imported}",
                  f"--config={REPO}/configs/from_run.py:{imported}", f"--config.data.data_dir={data_dir}",
                  "--config.train.num_steps=4", *(f"--config.{k}={v}" for k, v in fields.items()),
                  f"--workdir={upcycled}"], check=True, env=dict(cpu_env(8), PYTHONPATH=REPO), cwd=REPO, timeout=600)
  config = _config(imported, data_dir, 4, fields)
  assert os.listdir(os.path.join(upcycled, "checkpoints")) == ["0"]
  result = train.train_and_evaluate(config, upcycled)
  assert result.status == "completed" and "resumed from checkpoint at step 0" in capsys.readouterr().out
  assert len(train_losses(upcycled)) == 4
