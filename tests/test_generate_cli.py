"""experiments/generate.py and experiments/evaluate.py on a tiny run, as subprocesses: evaluate prints the loss,
bits per byte and perplexity of the model's own forward pass; generate streams the greedy continuation the model
computes; both read the run without writing it and refuse bad input with one line and exit status 2."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from moe_jax import config_lib, models, runstate
from tests.helpers import REPO, cpu_env, write_run


def _config():
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2, max_seq_len=64))
  config.moe.num_experts = 4
  config.train.update(dict(batch_size=2, seq_len=32))
  return config


def _files(directory) -> dict[str, float]:
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, dirs, names in os.walk(directory) for name in names + dirs}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
  """A workdir as training leaves it (config.json, one checkpoint at step 3) of a 2-block Switch LM."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  write_run(workdir, _config())
  return workdir


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *flags], capture_output=True,
                        text=True, env=cpu_env(1), cwd=REPO, timeout=300)


@pytest.mark.slow  # ~35 s in a subprocess; the default tier keeps evalset's score equal to the trainer's cross-entropy and the command's refusal
def test_evaluate_prints_the_models_own_loss_bits_per_byte_and_perplexity(tiny_run, tmp_path):
  text = "def f(x):\n  return x\n"
  (tmp_path / "a.txt").write_text(text)
  before = _files(tiny_run)
  done = _run("evaluate.py", f"--workdir={tiny_run}", f"--text_glob={tmp_path}/*.txt", "--json")
  assert done.returncode == 0, done.stderr
  record = json.loads(done.stdout.strip().splitlines()[-1])
  # The reference: the byte tokenizer's ids (byte + 3, EOS = 1) scored by the restored model's forward pass.
  ids = [1] + [b + 3 for b in text.encode()] + [1]
  loaded = runstate.load(tiny_run)
  logits, _ = models.forward(loaded.model, {"inputs": np.asarray([ids[:-1]], np.int32)})
  nats = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray([ids[1:]])), np.float64)
  assert record["step"] == 3 and record["set"]["tokens"] == len(ids) - 1 and record["set"]["documents"] == 1
  np.testing.assert_allclose(record["loss"], nats.mean(), rtol=1e-5)
  np.testing.assert_allclose(record["bits_per_byte"], nats.sum() / math.log(2) / (len(text) + 1), rtol=1e-5)
  np.testing.assert_allclose(record["perplexity"], math.exp(record["loss"]), rtol=1e-9)
  assert record["loss_interval"][0] <= record["loss"] <= record["loss_interval"][1]
  assert _files(tiny_run) == before  # read only


# One refusal of each command in the default tier: each is a subprocess (a few seconds of imports).
@pytest.mark.parametrize("flags,message", [
    (("--text_glob=/nonexistent/*.txt",), "matches no file"),
    pytest.param(("--text_glob=/x", "--dataset=stdlib"), "exactly one of --text_glob and --dataset",
                 marks=pytest.mark.slow),
    pytest.param(("--dataset=stdlib", "--seq_len=65"), "--seq_len=65 must be in", marks=pytest.mark.slow),
])
def test_evaluate_refuses_bad_input_with_one_line(tiny_run, flags, message):
  done = _run("evaluate.py", f"--workdir={tiny_run}", *flags)
  assert done.returncode == 2 and message in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_evaluate_refuses_a_directory_that_is_not_a_run(tmp_path):
  done = _run("evaluate.py", f"--workdir={tmp_path}", "--dataset=stdlib")
  assert done.returncode == 2 and "is not the workdir of a training run" in done.stderr


def _greedy_reference(workdir, ids, new_tokens):
  """Greedy continuation by re-running the full forward pass on the sequence so far (padded to one length: a
  causal model's logits at a position ignore what follows), stopped at EOS."""
  loaded = runstate.load(workdir)
  forward = jax.jit(lambda tokens: models.forward(loaded.model, {"inputs": tokens})[0])
  sequence = list(ids)
  for _ in range(new_tokens):
    padded = np.zeros((1, len(ids) + new_tokens), np.int32)
    padded[0, :len(sequence)] = sequence
    token = int(np.argmax(np.asarray(forward(padded))[0, len(sequence) - 1]))
    if token == 1:  # EOS
      break
    sequence.append(token)
  return sequence[len(ids):]


@pytest.mark.slow  # ~13 s in a subprocess; the default tier keeps the decoder's greedy equality in-process (tests/test_decode.py) and the command's refusal
def test_generate_streams_the_greedy_continuation_of_the_full_forward_pass(tiny_run):
  prompt, new_tokens = "def f(", 8
  before = _files(tiny_run)
  done = _run("generate.py", f"--workdir={tiny_run}", f"--prompt={prompt}", f"--max_new_tokens={new_tokens}",
              "--temperature=0")
  assert done.returncode == 0, done.stderr
  ids = [1] + [b + 3 for b in prompt.encode()]  # EOS, then the prompt's bytes
  from moe_jax.data import tokenizers
  expected = tokenizers.ByteTokenizer().decode(np.asarray(_greedy_reference(tiny_run, ids, new_tokens)))
  assert done.stdout == prompt + expected + "\n"
  assert "tokens/s" in done.stderr.splitlines()[-1]
  assert _files(tiny_run) == before  # read only


@pytest.mark.slow  # two subprocesses
def test_generate_samples_batches_repeatably_for_a_seed(tiny_run):
  flags = (f"--workdir={tiny_run}", "--prompt=x", "--max_new_tokens=6", "--batch=2", "--temperature=1.5",
           "--top_k=50", "--top_p=0.95")
  first, again = _run("generate.py", *flags, "--seed=3"), _run("generate.py", *flags, "--seed=3")
  assert first.returncode == 0, first.stderr
  assert first.stdout == again.stdout and "[0] x" in first.stdout and "[1] x" in first.stdout


@pytest.mark.parametrize("flags,message", [
    (("--max_new_tokens=100",), "exceed model.max_seq_len=64"),
    pytest.param(("--temperature=-1",), "temperature=-1.0 must be >= 0", marks=pytest.mark.slow),
    pytest.param(("--temperature=0", "--top_k=3"), "temperature=0 is greedy decoding", marks=pytest.mark.slow),
])
def test_generate_refuses_bad_input_with_one_line(tiny_run, flags, message):
  done = _run("generate.py", f"--workdir={tiny_run}", "--prompt=abc", *flags)
  assert done.returncode == 2 and message in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
