"""A trained run's loss, bits per byte and perplexity on a fixed evaluation set, with bootstrap intervals.

  python experiments/evaluate.py --workdir=/tmp/switch --text_glob='/data/held_out/**/*.txt'
  python experiments/evaluate.py --workdir=/tmp/switch --dataset=stdlib     # the validation split of a corpus
      [--text_dir=D] [--data_dir=D] [--step=N] [--seq_len=128] [--batch_size=8] [--cap_tokens=32768] [--json]

The set is moe_jax.evalset's fixed, fingerprinted set: every document (a file of --text_glob, or a validation
document of --dataset, which takes the run's own data settings with only the dataset replaced: 'stdlib' or
'text_dir' with --text_dir) enters, tokenized with the run's tokenizer, capped at --cap_tokens targets by a window
fixed per document, and is scored from its own rows. Loss is nats per target token over the whole set; bits per
byte divides the summed nats by ln 2 and the bytes the targets stand for; perplexity is exp(loss). Each interval
is the bootstrap over documents (`stats.document_bootstrap`), the perplexity's the exp of the loss's. The
fingerprint printed with them says which text was scored: two runs with equal fingerprints were scored on the same
rows. The run is read only (`runstate.load`, one device); a decoder LM's causal_lm run only. Bad input (a
workdir that is not a run's, no file matching, a set below --min_tokens) is refused with one line, exit status 2.
"""

import glob
import json
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_jax import evalset, runstate  # noqa: E402
from moe_jax.data import pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run to evaluate (read only).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest that restores).")
_TEXT_GLOB = flags.DEFINE_string("text_glob", None, "Evaluate on these files (recursive glob), one document each.")
_DATASET = flags.DEFINE_enum("dataset", None, ["stdlib", "text_dir"],
                             "Evaluate on the validation split of this corpus, with the run's data settings.")
_TEXT_DIR = flags.DEFINE_string("text_dir", None, "--dataset=text_dir: the directory (default: the run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "--dataset: where its prepared records are (default: the run's).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Targets per row (default: the run's train.seq_len).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
_CAP_TOKENS = flags.DEFINE_integer("cap_tokens", evalset.DEFAULT_CAP_TOKENS, "Most targets one document adds.")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 0, "Refuse a set of fewer targets than this.")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples over documents.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the summary lines.")


def _documents(run_config, tokenizer) -> dict:
  """name -> token ids of each document to score, from --text_glob or --dataset."""
  if _TEXT_GLOB.value:
    paths = sorted(p for p in glob.glob(_TEXT_GLOB.value, recursive=True) if os.path.isfile(p))
    if not paths:
      raise ValueError(f"--text_glob={_TEXT_GLOB.value!r} matches no file")
    documents = {}
    for path in paths:
      with open(path, encoding="utf-8", errors="replace") as f:
        documents[path] = tokenizer.encode(f.read())
    return documents
  data = run_config.data.copy_and_resolve_references()
  data.dataset = _DATASET.value
  if _TEXT_DIR.value:
    data.text_dir = _TEXT_DIR.value
  if _DATA_DIR.value:
    data.data_dir = _DATA_DIR.value
  return evalset.validation_documents(data)


def evaluate() -> dict:
  """The run's scores on the chosen set: the record --json prints."""
  if bool(_TEXT_GLOB.value) == bool(_DATASET.value):
    raise ValueError("give exactly one of --text_glob and --dataset")
  if _TEXT_DIR.value and _DATASET.value != "text_dir":
    raise ValueError("--text_dir goes with --dataset=text_dir")
  if _DATA_DIR.value and not _DATASET.value:
    raise ValueError("--data_dir goes with --dataset")
  config = runstate.run_config(_WORKDIR.value)  # before loading: a bad workdir fails fast
  if config.model.architecture != "decoder" or config.data.objective != "causal_lm":
    raise ValueError(f"{_WORKDIR.value} trains model.architecture={config.model.architecture!r} on "
                     f"data.objective={config.data.objective!r}; evaluation scores a decoder LM's next-token "
                     "prediction")
  tokenizer = pipeline.get_tokenizer(config.data)
  seq_len = _SEQ_LEN.value or config.train.seq_len
  if not 1 <= seq_len <= config.model.max_seq_len:
    raise ValueError(f"--seq_len={seq_len} must be in [1, model.max_seq_len={config.model.max_seq_len}]")
  eval_set = evalset.build_eval_set(_documents(config, tokenizer), tokenizer=tokenizer, seq_len=seq_len,
                                    cap_tokens=_CAP_TOKENS.value, min_tokens=_MIN_TOKENS.value)
  run = runstate.load(_WORKDIR.value, step=_STEP.value)
  result = evalset.evaluate_documents(evalset.token_cross_entropy_fn(run.model), eval_set,
                                      batch_size=_BATCH_SIZE.value, resamples=_RESAMPLES.value)
  low, high = result.interval.interval
  return {"workdir": _WORKDIR.value, "step": run.step, "set": eval_set.summary(), "loss": result.mean,
          "loss_interval": [low, high], "bits_per_byte": result.bits_per_byte,
          "bits_per_byte_interval": list(result.bits_per_byte_interval.interval),
          "perplexity": math.exp(result.mean), "perplexity_interval": [math.exp(low), math.exp(high)],
          "confidence": result.interval.confidence, "resamples": result.interval.resamples,
          "batch_size": result.batch_size}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    record = evaluate()
  except ValueError as error:
    print(f"cannot evaluate: {error}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(record))
    return
  s, pct = record["set"], round(100 * record["confidence"])
  print(f"{record['workdir']} step {record['step']}: {s['documents']} documents, {s['tokens']} tokens, "
        f"{s['bytes']} bytes (set {s['fingerprint'][:12]})")
  for name in ("loss", "bits_per_byte", "perplexity"):
    low, high = record[f"{name}_interval"]
    print(f"{name:>14} {record[name]:.4f}  [{low:.4f}, {high:.4f}] ({pct}% bootstrap over documents)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
