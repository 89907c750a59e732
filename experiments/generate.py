"""Continue a prompt with a trained run's model, streaming the text as it is generated.

  python experiments/generate.py --workdir=/tmp/switch --prompt="def main(" \
      [--max_new_tokens=128] [--temperature=0.8] [--top_k=40] [--top_p=0.95] [--batch=1] [--seed=0] [--step=N]

The run is read only (`runstate.load`, one device) and decoded with a KV cache (moe_jax.decode; its MoE layers
dropless). A decoder LM continues EOS + the prompt (EOS is what precedes every document in training, so the prompt
reads as a document's start); an encoder-decoder reads the prompt + EOS as its encoder input (T5: e.g. a span-
corrupted text with sentinels) and generates its targets from the start token. --batch rows sample the same
prompt independently; the first row is printed as it comes, every row at the end when there are several.
Sampling is moe_jax.sampling's (temperature 0: greedy; top-k, then top-p) with --seed; a row stops at EOS. The
last line (stderr) gives the time to the first token, compilation included, and the tokens per second (all rows)
of the steps after the step's compilation. Bad input is refused with one line, exit status 2.
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_jax import decode, encdec, runstate, sampling  # noqa: E402
from moe_jax.data import pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run whose model generates (read only).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that restores).")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most per row.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only; 0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens holding this probability; 1: off.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows generated together from the same prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling key.")


class _Stream:
  """Prints a row's text as its tokens arrive. A token may end inside a multi-byte character: that character is
  held back until the bytes completing it arrive (`flush` prints whatever is left)."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.printed = tokenizer, [], ""

  def add(self, token: int) -> None:
    self.ids.append(token)
    self._show(self.tokenizer.decode(np.asarray(self.ids)).rstrip("\ufffd"))

  def flush(self) -> None:
    self._show(self.tokenizer.decode(np.asarray(self.ids)))
    sys.stdout.write("\n")

  def _show(self, text: str) -> None:
    if text.startswith(self.printed) and len(text) > len(self.printed):
      sys.stdout.write(text[len(self.printed):])
      sys.stdout.flush()
      self.printed = text


def _setup():
  """(run, tokenizer, sampling config, prompt ids) after every check that needs no model; ValueError otherwise."""
  config = sampling.SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  if _MAX_NEW_TOKENS.value < 1:
    raise ValueError(f"--max_new_tokens={_MAX_NEW_TOKENS.value} must be >= 1")
  if _BATCH.value < 1:
    raise ValueError(f"--batch={_BATCH.value} must be >= 1")
  run_config = runstate.run_config(_WORKDIR.value)  # before loading: a bad workdir fails fast
  tokenizer = pipeline.get_tokenizer(run_config.data)
  ids = np.asarray(tokenizer.encode(_PROMPT.value), np.int32)
  max_len = run_config.model.max_seq_len
  if run_config.model.architecture == "encoder_decoder":
    ids = np.append(ids, np.int32(tokenizer.eos_id))
    if len(ids) > max_len:
      raise ValueError(f"the prompt is {len(ids)} tokens with EOS, more than model.max_seq_len={max_len}")
    if _MAX_NEW_TOKENS.value > max_len:
      raise ValueError(f"--max_new_tokens={_MAX_NEW_TOKENS.value} exceeds model.max_seq_len={max_len}")
  else:
    ids = np.concatenate([[np.int32(tokenizer.eos_id)], ids])
    if len(ids) + _MAX_NEW_TOKENS.value - 1 > max_len:
      raise ValueError(f"EOS + the prompt ({len(ids)} tokens) + --max_new_tokens={_MAX_NEW_TOKENS.value} exceed "
                       f"model.max_seq_len={max_len} by {len(ids) + _MAX_NEW_TOKENS.value - 1 - max_len}")
  return run_config, tokenizer, config, ids


def generate() -> None:
  _, tokenizer, config, ids = _setup()
  run = runstate.load(_WORKDIR.value, step=_STEP.value)
  batch, new = _BATCH.value, _MAX_NEW_TOKENS.value
  if run.typed.model.architecture == "encoder_decoder":
    decoder = decode.Decoder(run.model, batch_size=batch, max_length=new, encoder_length=len(ids))
    prompts, encoder_inputs = np.full((batch, 1), encdec.PAD_ID, np.int32), np.tile(ids, (batch, 1))
  else:
    decoder = decode.Decoder(run.model, batch_size=batch, max_length=len(ids) + new - 1)
    prompts, encoder_inputs = np.tile(ids, (batch, 1)), None
  rows, stream = [[] for _ in range(batch)], _Stream(tokenizer)  # each row's new tokens; row 0 printed as they come
  print(f"{_WORKDIR.value} step {run.step}, {config}:", file=sys.stderr)
  sys.stdout.write(_PROMPT.value)
  start, first, steps = time.perf_counter(), None, 0
  done = np.zeros(batch, bool)
  tokens_of_steps = decoder.generate(prompts, np.full(batch, prompts.shape[1]), max_new_tokens=new, config=config,
                                     key=jax.random.key(_SEED.value), stop_tokens=[tokenizer.eos_id],
                                     pad_id=tokenizer.pad_id, encoder_inputs=encoder_inputs)
  for i, tokens in enumerate(tokens_of_steps):
    if i == 0:  # the prefill and the first token, compilation included
      first = time.perf_counter() - start
    elif i == 1:  # the first step, compiled: the rate is timed from here
      start = time.perf_counter()
    else:
      steps += 1
    for b in np.flatnonzero(~done & (tokens != tokenizer.eos_id)):
      rows[b].append(int(tokens[b]))
      if b == 0:
        stream.add(int(tokens[0]))
    done |= tokens == tokenizer.eos_id
  elapsed = time.perf_counter() - start
  stream.flush()
  if batch > 1:
    for b, row in enumerate(rows):
      print(f"[{b}] {_PROMPT.value}{tokenizer.decode(np.asarray(row, np.int32))}")
  rate = (f"{steps * batch / elapsed:.1f} tokens/s over the {steps} steps after the first two (compiled)" if steps
          else "too few steps for a rate")
  print(f"first token after {first:.2f} s (compilation included); {rate} ({batch} rows)", file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    generate()
  except ValueError as error:
    print(f"cannot generate: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(main)
