"""The expert-scaling diagnosis (configs/sweeps/expert_scaling.py) lists the runs results/SCALING.md pre-registers, at
its settings, and its rules choose as SCALING.md says on constructed numbers. Builds configs only; trains nothing."""

import json
import math

import pytest

from configs.sweeps import common, confirm
from configs.sweeps import expert_scaling as es
from moe_jax import config_lib

FINGERPRINT = es.EVAL_SET["full"]["fingerprint"]


def commit(results, losses: dict[str, float], *, fingerprint=FINGERPRINT, step=es.STEPS) -> None:
  """Committed run files as the pinned trainer writes them (result.json, eval_set.json), for `losses`."""
  for name, loss in losses.items():
    run = results / "runs" / name
    run.mkdir(parents=True)
    status = "diverged" if math.isinf(loss) else "completed"
    (run / "result.json").write_text(json.dumps({"status": status, "step": step}))
    if status == "completed":
      scored = {"step": step, "result": {"mean": loss, "fingerprint": fingerprint}}
      (run / "eval_set.json").write_text(json.dumps(scored))


def d1_losses(dense: tuple[float, float], switch: tuple[float, float]) -> dict[str, float]:
  """D1 losses: each arm's (init 0.1, init 1.0) loss, the same on both seeds."""
  return {es.d1_name(arm, init, seed): pair[i] for arm, pair in (("dense", dense), ("switch-e8", switch))
          for i, init in enumerate(es.INIT_SCALES) for seed in es.SEEDS}


def test_d1_is_eight_runs_of_dense_and_switch_e8_at_both_init_scales_on_the_reserved_seeds(tmp_path):
  sweep = es.get_config("diagnosis", results=tmp_path)
  configs = {run.name: common.build_config(run) for run in sweep.runs}
  assert sweep.name == "expert-scaling-diagnosis" and len(configs) == 8
  for config in configs.values():
    config_lib.validate(config)
  assert {(run.base, config.model.init_scale, config.seed) for run, config in zip(sweep.runs, configs.values())} == {
      (base, init, seed) for base in ("dense-cpu", "switch-cpu") for init in (0.1, 1.0) for seed in (200, 201)}
  for config in configs.values():
    assert config.train.num_steps * config.train.batch_size * config.train.seq_len == 2_498_560
    assert (config.train.warmup_steps, config.train.checkpoint_every, config.train.eval_every) == (61, 122, 245)
    assert config.data.validation_fraction == 0.08
    assert (config.train.eval_set_min_tokens, config.train.eval_file_cap_tokens,
            config.train.eval_subset_cap_tokens) == (1_000_000, 32_768, 640)
  for name, config in configs.items():  # confirm.py's base settings
    if name.startswith("dense"):
      assert config.train.learning_rate == confirm.DENSE["train.learning_rate"] == 6e-3
    else:
      assert config.train.learning_rate == confirm.SWITCH["train.learning_rate"] == 3e-3
      assert (config.moe.num_experts, config.moe.group_size, config.moe.capacity_factor,
              config.moe.eval_capacity_factor, config.train.aux_loss_weight) == (8, 4096, 1.25, 2.0, 1e-2)
  assert len(es.PINNED_COMMIT) == 40


def test_rule_1_takes_the_lower_mean_init_scale_and_keeps_0_1_on_a_tie():
  assert es.init_choice(d1_losses(dense=(1.60, 1.5995), switch=(1.60, 1.50))) == {"dense": 0.1, "switch": 1.0}
  losses = d1_losses(dense=(1.60, 1.58), switch=(1.50, 1.60))
  losses[es.d1_name("dense", 1.0, 201)] = 1.63  # mean over seeds: 1.605 against 1.60
  assert es.init_choice(losses) == {"dense": 0.1, "switch": 0.1}
  losses[es.d1_name("switch-e8", 1.0, 200)] = math.inf  # diverged: loses
  assert es.init_choice(losses)["switch"] == 0.1
  del losses[es.d1_name("switch-e8", 0.1, 201)]
  with pytest.raises(ValueError, match="switch-e8-init0.1-s201"):
    es.init_choice(losses)


def test_d2_is_listed_once_d1_is_committed_at_the_init_scale_rule_1_chose(tmp_path):
  commit(tmp_path, d1_losses(dense=(1.60, 1.55), switch=(1.60, 1.60)))  # dense: 1.0; Switch: tie, 0.1
  sweep = es.get_config("diagnosis", results=tmp_path)
  runs = {run.name: common.build_config(run) for run in sweep.runs}
  d2 = sorted(set(runs) - set(es.d1_runs()))
  assert d2 == sorted(["dense-lr0.003", "dense-lr0.01", *(f"switch-e{e}-{change}" for e in (8, 32) for change in (
      "lr0.0015", "lr0.006", "cf2", "alpha0.001", "alpha0.1")), "switch-e32-centre"])  # 13; E = 128 comes later
  for name in d2:
    config = runs[name]
    assert config.seed == 200
    assert config.model.init_scale == (1.0 if name.startswith("dense") else 0.1)
  assert runs["switch-e32-cf2"].moe.capacity_factor == 2.0 and runs["switch-e32-cf2"].moe.num_experts == 32
  assert runs["switch-e32-centre"].train.learning_rate == 3e-3 and runs["dense-lr0.01"].train.learning_rate == 1e-2
  assert runs["switch-e8-alpha0.1"].train.aux_loss_weight == 0.1


def test_committed_results_on_another_evaluation_set_or_step_are_refused(tmp_path):
  commit(tmp_path / "a", {"dense-init0.1-s200": 1.6}, fingerprint="0" * 64)
  with pytest.raises(ValueError, match="another|study's"):
    es.get_config("diagnosis", results=tmp_path / "a")
  commit(tmp_path / "b", {"dense-init0.1-s200": 1.6}, step=490)
  with pytest.raises(ValueError, match="step 490"):
    es.committed_losses(tmp_path / "b")


def test_an_lr_extension_goes_a_factor_2_beyond_the_edge_only_when_the_best_rate_is_there():
  init = {"dense": 0.1, "switch": 0.1}
  losses = {"dense-init0.1-s200": 1.60, "dense-lr0.003": 1.61, "dense-lr0.01": 1.58}
  assert es.lr_extension("dense", losses, init) == pytest.approx(2e-2)
  losses["dense-lr0.01"] = 1.5995  # within the tie of the centre: the centre stays, no extension
  assert es.lr_extension("dense", losses, init) is None
  e8 = {"switch-e8-init0.1-s200": 1.50, "switch-e8-lr0.0015": 1.48, "switch-e8-lr0.006": 1.52}
  assert es.lr_extension("switch-e8", e8, init) == pytest.approx(7.5e-4)
  with pytest.raises(ValueError, match="switch-e32-lr0.006"):
    es.lr_extension("switch-e32", {"switch-e32-centre": 1.5, "switch-e32-lr0.0015": 1.5}, init)


def test_rules_2_to_4_choose_each_setting_on_its_own_and_e128_takes_e32s_choices(tmp_path):
  init_losses = d1_losses(dense=(1.60, 1.65), switch=(1.50, 1.60))  # both arms keep 0.1
  e32 = {"switch-e32-centre": 1.50, "switch-e32-lr0.0015": 1.52, "switch-e32-lr0.006": 1.49,
         "switch-e32-cf2": 1.4995, "switch-e32-alpha0.001": 1.47, "switch-e32-alpha0.1": 1.51}
  init = es.init_choice(init_losses)
  with pytest.raises(ValueError, match="switch-e32-lr0.012"):  # the best rate is the edge: the extension is due
    es.arm_choice("switch-e32", e32, init)
  e32["switch-e32-lr0.012"] = 1.495  # the extension loses to 6e-3
  choice = es.arm_choice("switch-e32", e32, init)
  assert choice == {"train.learning_rate": 6e-3, "moe.capacity_factor": 1.25, "train.aux_loss_weight": 1e-3}
  commit(tmp_path, {**init_losses, **e32})
  runs = {run.name: run for run in es.get_config("diagnosis", results=tmp_path).runs}
  assert "switch-e32-lr0.012" in runs
  e128 = common.build_config(runs["switch-e128"])
  assert (e128.moe.num_experts, e128.train.learning_rate, e128.moe.capacity_factor, e128.train.aux_loss_weight,
          e128.model.init_scale, e128.seed) == (128, 6e-3, 1.25, 1e-3, 0.1, 200)
  assert len([name for name in runs if name not in es.d1_runs()]) == 15  # 13 of D2, one extension, E = 128


@pytest.mark.slow
def test_check_eval_sets_passes_the_recorded_set_and_refuses_another(monkeypatch):
  """On this machine's corpus (the committed Python 3.11.7 stdlib), the pinned trainer's evaluation sets of a D1 run
  have the fingerprints freeze 0 recorded; a different recorded fingerprint refuses the run."""
  es.check_eval_sets("configs/sweeps/expert_scaling.py:diagnosis", ["switch-e8-init1-s200"])
  monkeypatch.setitem(es.EVAL_SET, "subset", {**es.EVAL_SET["subset"], "fingerprint": "0" * 64})
  with pytest.raises(ValueError, match="switch-e8-init1-s200"):
    es.check_eval_sets("configs/sweeps/expert_scaling.py", ["switch-e8-init1-s200"])
