"""The expert-scaling diagnosis (configs/sweeps/expert_scaling.py) lists the runs results/SCALING.md pre-registers, at
its settings, and its rules choose as SCALING.md says on constructed numbers. Builds configs only; trains nothing."""

import json
import math

import numpy as np
import pytest

from configs import lm
from configs.sweeps import common, confirm
from configs.sweeps import expert_scaling as es
from moe_jax import config_lib, runstate
from moe_jax.data import pipeline

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


# ---- Freeze 1: the confirmatory runs and the settings the rule gives them ----

# A complete diagnosis, constructed to exercise every rule (the comments give what each rule must decide).
COMPLETE = {
    **d1_losses(dense=(1.6000, 1.5995), switch=(1.6000, 1.5000)),  # rule 1: dense a tie, keeps 0.1; Switch 1.0
    # dense: 1e-2 beats the centre (6e-3) by 0.005, at the grid's edge: the extension 2e-2 runs and loses.
    "dense-lr0.003": 1.6100, "dense-lr0.01": 1.5950, "dense-lr0.02": 1.5990,
    # E = 8 (centre: its D1 run at init 1.0, 1.5000): 1.5e-3 lower by 0.0008, a tie (no extension, 3e-3 stays);
    # capacity factor 2.0 lower by 0.002 (taken); alpha 1e-1 lower by 0.0005 (a tie, 1e-2 stays).
    "switch-e8-lr0.0015": 1.4992, "switch-e8-lr0.006": 1.5100, "switch-e8-cf2": 1.4980,
    "switch-e8-alpha0.001": 1.5200, "switch-e8-alpha0.1": 1.4995,
    # E = 32: 6e-3 best at the edge; its extension 1.2e-2 better still (taken); cf 2.0 worse; alpha 1e-3 best.
    "switch-e32-centre": 1.4800, "switch-e32-lr0.0015": 1.4900, "switch-e32-lr0.006": 1.4700,
    "switch-e32-lr0.012": 1.4650, "switch-e32-cf2": 1.4850, "switch-e32-alpha0.001": 1.4750,
    "switch-e32-alpha0.1": 1.4900,
    "switch-e128": 1.4000,  # its loss enters no rule
}
E8 = {"model.init_scale": 1.0, "train.learning_rate": 3e-3, "moe.capacity_factor": 2.0, "train.aux_loss_weight": 1e-2}
E32 = {"model.init_scale": 1.0, "train.learning_rate": 1.2e-2, "moe.capacity_factor": 1.25,
       "train.aux_loss_weight": 1e-3}
COMPLETE_CHOICES = {"dense": {"model.init_scale": 0.1, "train.learning_rate": 1e-2}, "switch-e2": E8, "switch-e8": E8,
                    "switch-e32": E32, "switch-e128": E32}


def test_freeze1_applies_rules_1_to_6_to_the_complete_diagnosis_with_ties_and_extensions():
  assert es.freeze1_choices(COMPLETE) == COMPLETE_CHOICES
  flipped = dict(COMPLETE, **{"dense-lr0.02": 1.5900})  # the extension now wins by 0.005: taken
  assert es.freeze1_choices(flipped)["dense"]["train.learning_rate"] == 2e-2
  # 1.2e-2 within 0.001 of 6e-3: a tie is judged against the centre (3e-3, 1.48) only, so the lowest is still taken.
  near_lr = dict(COMPLETE, **{"switch-e32-lr0.012": 1.4695})
  assert es.freeze1_choices(near_lr)["switch-e32"]["train.learning_rate"] == 1.2e-2
  near_centre = dict(COMPLETE, **{"switch-e8-cf2": 1.4991})  # lower by 0.0009: a tie, 1.25 stays for E = 8 and E = 2
  chosen = es.freeze1_choices(near_centre)
  assert chosen["switch-e8"]["moe.capacity_factor"] == chosen["switch-e2"]["moe.capacity_factor"] == 1.25


def test_freeze1_refuses_an_incomplete_diagnosis_naming_the_missing_runs():
  d1_missing = {name: loss for name, loss in COMPLETE.items() if name != "switch-e8-init1-s201"}
  with pytest.raises(ValueError, match=r"missing runs .*\['switch-e8-init1-s201'\]"):
    es.freeze1_choices(d1_missing)
  for missing in ("dense-lr0.02", "switch-e32-lr0.012", "switch-e8-alpha0.1", "switch-e128"):
    with pytest.raises(ValueError, match=rf"missing runs .*\['{missing}'\]"):
      es.freeze1_choices({name: loss for name, loss in COMPLETE.items() if name != missing})
  with pytest.raises(ValueError, match="does not list.*switch-e8-lr0.012"):  # an extension that was not due
    es.freeze1_choices(dict(COMPLETE, **{"switch-e8-lr0.012": 1.49}))


def test_the_confirmatory_runs_are_step_2s_arms_seeds_and_budget_at_the_chosen_settings():
  runs = es.confirmatory_runs(COMPLETE_CHOICES, include_e128=False)
  primary = [f"{arm}-s{seed}" for seed in range(20, 28) for arm in ("switch-e8", "switch-e32")]
  secondary = [f"{arm}-s{seed}" for seed in (20, 21, 22) for arm in ("dense", "switch-e2")]
  assert list(runs) == primary + secondary  # SCALING.md's execution order
  with_e128 = es.confirmatory_runs(COMPLETE_CHOICES, include_e128=True)
  assert list(with_e128) == [*runs, "switch-e128-s20", "switch-e128-s21", "switch-e128-s22"]
  sweep = common.new_sweep("t", "cpu")
  for name, (base, seed, overrides) in with_e128.items():
    common.add_run(sweep, name, group=name, base=base, seed=seed, overrides=overrides)
  for run in sweep.runs:
    config = common.build_config(run)
    config_lib.validate(config)
    arm, seed = run.name.rsplit("-s", 1)
    assert config.seed == int(seed) and config.seed not in (*es.SEEDS, 0, 1, 2, 3, 4, *range(10, 18), 100)
    assert config.train.num_steps * config.train.batch_size * config.train.seq_len == 10_035_200
    assert (config.train.num_steps, config.train.warmup_steps, config.train.checkpoint_every,
            config.train.eval_every) == (2450, 245, 122, 245)
    assert config.data.validation_fraction == 0.08
    assert (config.train.eval_set_min_tokens, config.train.eval_file_cap_tokens,
            config.train.eval_subset_cap_tokens) == (1_000_000, 32_768, 640)
    choice = COMPLETE_CHOICES[arm]
    assert (config.model.init_scale, config.train.learning_rate) == (choice["model.init_scale"],
                                                                     choice["train.learning_rate"])
    if arm == "dense":
      assert run.base == "dense-cpu"
    else:
      assert (config.moe.num_experts, config.moe.capacity_factor, config.train.aux_loss_weight) == (
          int(arm.removeprefix("switch-e")), choice["moe.capacity_factor"], choice["train.aux_loss_weight"])
      assert (config.moe.group_size, config.moe.eval_capacity_factor) == (4096, 2.0)  # rule 6: as in confirm.py
    stream = es.stream_config(config.seed)  # fresh_tokens reads the stream this run reads
    assert (stream.data, stream.seed, stream.train.batch_size, stream.train.seq_len) == (
        config.data, config.seed, config.train.batch_size, config.train.seq_len)


def test_the_confirmatory_sweep_is_listed_only_from_frozen_values_into_results_expert_scaling(monkeypatch):
  monkeypatch.setattr(es, "FROZEN", None)
  with pytest.raises(ValueError, match="FROZEN is None"):
    es.get_config("confirmatory")
  with pytest.raises(ValueError, match="'diagnosis' or 'confirmatory'"):
    es.get_config("confirm")
  monkeypatch.setattr(es, "FROZEN", COMPLETE_CHOICES)
  monkeypatch.setattr(es, "INCLUDE_E128", False)
  sweep = es.get_config("confirmatory")
  assert sweep.name == "expert-scaling" and len(sweep.runs) == 22
  assert {run.group for run in sweep.runs} == {"switch-e8", "switch-e32", "dense", "switch-e2"}
  monkeypatch.setattr(es, "INCLUDE_E128", True)
  assert [run.name for run in es.get_config("confirmatory").runs][-3:] == [f"switch-e128-s{s}" for s in (20, 21, 22)]
  monkeypatch.setattr(es, "FROZEN", {arm: COMPLETE_CHOICES[arm] for arm in ("dense", "switch-e8", "switch-e32")})
  with pytest.raises(ValueError, match="switch-e128"):
    es.get_config("confirmatory")


def test_frozen_holds_what_the_rule_gives_the_committed_diagnosis():
  if es.FROZEN is None:
    pytest.skip("FROZEN is None: freeze 1 is not committed yet (the diagnosis is still running)")
  assert isinstance(es.INCLUDE_E128, bool)
  assert es.FROZEN == es.freeze1_choices(es.committed_losses())


def test_the_printed_freeze_is_the_rules_literal_with_the_numbers_that_decided_it():
  report = es.freeze1_report(COMPLETE)
  literal, markdown = report.split("\n\n")
  namespace = {}
  exec(literal, namespace)  # the statement the lead pastes into the sweep file
  assert namespace["FROZEN"] == COMPLETE_CHOICES
  assert max(len(line) for line in literal.splitlines()) <= 120
  rules = markdown.splitlines()
  assert [line.split("**")[1].split(",")[0] for line in rules] == [
      "Rule 1", "Rule 2", "Rule 3", "Rule 4", "Rule 6"]
  assert "dense: 0.1 1.6000 (1.6000, 1.6000), 1 1.5995 (1.5995, 1.5995) -> **0.1** (a tie" in rules[0]
  assert "0.02 1.5990 (`dense-lr0.02` extension) -> **0.01**" in rules[1]
  assert "0.0015 1.4992 (`switch-e8-lr0.0015`)" in rules[1] and "tie, the centre stays" in rules[3]
  assert "0.012 1.4650 (`switch-e32-lr0.012` extension) -> **0.012**" in rules[1]
  assert "1.4000" in rules[4]


def test_the_diagnosis_listing_is_unchanged_by_freeze_1(tmp_path):
  """get_config('diagnosis'), the sweep experiments/study.sh runs, lists on a complete diagnosis exactly SCALING.md's
  runs: D1, D2 at rule 1's init scales, the due extensions and E = 128 at E = 32's choices, all at 610 steps."""
  commit(tmp_path, COMPLETE)
  sweep = es.get_config(results=tmp_path)
  assert sweep.name == "expert-scaling-diagnosis"
  # name -> (init scale, seed, experts (0: dense), learning rate, capacity factor, alpha)
  d1 = {es.d1_name(arm, init, seed): (init, seed, experts, lr, 1.25, 1e-2) for seed in (200, 201)
        for arm, experts, lr in (("dense", 0, 6e-3), ("switch-e8", 8, 3e-3)) for init in (0.1, 1.0)}
  expected = {
      **d1,
      "dense-lr0.003": (0.1, 200, 0, 3e-3, 1.25, 1e-2),
      "dense-lr0.01": (0.1, 200, 0, 1e-2, 1.25, 1e-2),
      "switch-e8-lr0.0015": (1.0, 200, 8, 1.5e-3, 1.25, 1e-2),
      "switch-e8-lr0.006": (1.0, 200, 8, 6e-3, 1.25, 1e-2),
      "switch-e8-cf2": (1.0, 200, 8, 3e-3, 2.0, 1e-2),
      "switch-e8-alpha0.001": (1.0, 200, 8, 3e-3, 1.25, 1e-3),
      "switch-e8-alpha0.1": (1.0, 200, 8, 3e-3, 1.25, 1e-1),
      "switch-e32-centre": (1.0, 200, 32, 3e-3, 1.25, 1e-2),
      "switch-e32-lr0.0015": (1.0, 200, 32, 1.5e-3, 1.25, 1e-2),
      "switch-e32-lr0.006": (1.0, 200, 32, 6e-3, 1.25, 1e-2),
      "switch-e32-cf2": (1.0, 200, 32, 3e-3, 2.0, 1e-2),
      "switch-e32-alpha0.001": (1.0, 200, 32, 3e-3, 1.25, 1e-3),
      "switch-e32-alpha0.1": (1.0, 200, 32, 3e-3, 1.25, 1e-1),
      "dense-lr0.02": (0.1, 200, 0, 2e-2, 1.25, 1e-2),  # the extensions due
      "switch-e32-lr0.012": (1.0, 200, 32, 1.2e-2, 1.25, 1e-2),
      "switch-e128": (1.0, 200, 128, 1.2e-2, 1.25, 1e-3),  # at E = 32's choices
  }
  assert [run.name for run in sweep.runs] == list(expected)
  for run in sweep.runs:
    config = common.build_config(run)
    experts = config.moe.num_experts if run.base == "switch-cpu" else 0
    assert (config.model.init_scale, config.seed, experts, config.train.learning_rate, config.moe.capacity_factor,
            config.train.aux_loss_weight) == expected[run.name], run.name
    assert (config.train.num_steps, config.train.warmup_steps, config.train.checkpoint_every, config.train.eval_every,
            config.data.validation_fraction) == (610, 61, 122, 245, 0.08)
    assert run.group == run.name.removesuffix(f"-s{run.seed}")


def small_corpus_config(tmp_path, seed: int, streams: int):
  """A training config on a small text_dir corpus of distinct files (8 of them training), `streams` rows of 16."""
  rng = np.random.default_rng(0)
  root = tmp_path / "corpus"
  for i in range(12):
    path = root / f"doc{i:02d}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"file {i}\n" + "ab c" * int(rng.integers(5, 120)), encoding="utf-8")
  config = lm.get_config("dense-cpu")
  config.seed = seed
  config.data.update(dataset="text_dir", text_dir=str(root), data_dir=str(tmp_path / "tfds"), validation_fraction=0.25)
  config.train.update(batch_size=streams, seq_len=16)
  return config


def direct_reach(config, steps: int) -> dict:
  """What the trainer's batches themselves show: each row continues one stream, whose tokens must be its documents
  r, r + B, ... in the pipeline's order, so walking them gives the documents read; files are told apart by text."""
  exp = config_lib.typed(config)
  batches = runstate.train_batches(exp)
  rows = [[] for _ in range(exp.train.batch_size)]
  for _ in range(steps):
    batch = next(batches)
    for r, (inputs, targets) in enumerate(zip(batch["inputs"], batch["targets"])):
      rows[r].append(np.append(inputs, targets[-1]))  # the chunk of L + 1 tokens
  batches.close()
  source, text_key = pipeline.document_source(exp.data, "train")
  docs = pipeline.tokenized_documents(source, text_key=text_key, tokenizer=pipeline.get_tokenizer(exp.data),
                                      seed=exp.seed, streams_per_shard=exp.train.batch_size)
  read = {}  # position in the order -> the document's tokens
  for r, chunks in enumerate(rows):
    stream, index = np.concatenate(chunks), r
    while len(stream):
      tokens = docs[index]["tokens"]
      np.testing.assert_array_equal(stream[:len(tokens)], tokens[:len(stream)])
      read[index], stream, index = tokens, stream[len(tokens):], index + exp.train.batch_size
  texts = [tokens.tobytes() for tokens in read.values()]
  return {"documents": len(source), "largest_index": max(read), "read": len(read),
          "read_twice": len(texts) - len(set(texts))}


# Within the first epoch; into the second without reading a file twice (its epoch-2 file not yet read in epoch 1);
# far enough that files are read twice.
@pytest.mark.parametrize("seed,streams,steps,second_epoch,twice", [(20, 2, 6, False, False), (21, 4, 12, True, False),
                                                                   (22, 2, 90, True, True)])
def test_fresh_tokens_reports_how_far_the_real_training_stream_reads(tmp_path, seed, streams, steps, second_epoch,
                                                                      twice):
  config = small_corpus_config(tmp_path, seed, streams)
  found = es.fresh_tokens(config, steps)
  expected = direct_reach(config, steps)
  assert {key: found[key] for key in expected} == expected
  assert found["seed"] == seed and found["documents"] == 8
  assert (found["largest_index"] >= found["documents"], found["read_twice"] > 0) == (second_epoch, twice)
  assert found["largest_index"] % streams == found["stream"]


@pytest.mark.slow
def test_the_confirmatory_runs_score_the_evaluation_set_freeze_0_recorded(monkeypatch):
  """study.sh's check passes a confirmatory run (at constructed settings) on this machine's corpus: step 2 scores the
  set step 1 scored."""
  monkeypatch.setattr(es, "FROZEN", COMPLETE_CHOICES)
  es.check_eval_sets("configs/sweeps/expert_scaling.py:confirmatory", ["switch-e32-s27"])


def test_the_analysis_reads_the_confirmatory_runs_the_sweep_lists():
  """moe_jax.scaling_study cannot import configs/: its copy of the protocol's seeds, step and sweep name must be the
  sweep file's (one fact, checked in one place)."""
  from moe_jax import scaling_study

  assert scaling_study.PRIMARY_SEEDS == es.PRIMARY_SEEDS
  assert scaling_study.SECONDARY_SEEDS == es.SECONDARY_SEEDS
  assert scaling_study.STEPS == es.CONFIRM_STEPS
  assert scaling_study.RUNS_DIR.parts[-2] == es.CONFIRM_NAME
