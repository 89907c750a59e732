"""Router traces of a trained run: for every token and MoE block, the chosen experts, their gates, the router's
entropy and whether the token was dropped, with token ids, documents and a source label per document (code, tests,
docs, prose), in one .npz (`moe_jax.analysis.Trace`, schema in docs/analysis.md).

  python experiments/trace.py --workdir=workdirs/main/switch-cpu --output=/tmp/trace.npz
      [--dataset=stdlib | --text_glob='docs/**/*.md'] [--max_tokens=65536] [--cap_tokens=1024] [--step=N]
  python experiments/trace.py --workdir=W --steps=all --output=/tmp/trace-{step}.npz   # router saturation
  python experiments/trace.py --workdir=W --output=/tmp/trace.npz --ablations=/tmp/ablations.json

Text: the validation split of the run's own data (default), of --dataset (stdlib or text_dir, with the run's
data options), or the files of --text_glob; at most --cap_tokens tokens of each document (every document enters,
`moe_jax.evalset`'s rule), at most --max_tokens in all (the arrays are allocated for that many). The model is the
run's checkpoint (`runstate.load`, read-only), on one device, deterministic (the evaluation capacity factor). A
decoder LM and an encoder-decoder both work, with every router family (`moe_jax.tracing` says what Soft MoE and
expert choice record).

--ablations also writes, for the last step traced, the evaluation loss with each expert of each MoE block removed,
both ways (`tracing.REMOVALS`: its tokens keep only their other choices or the residual, or go to their next
choice), on the first --ablation_tokens tokens of the same text, ranked (`analysis.rank_ablations`), each loss
increase with its 95% bootstrap interval over documents (`analysis.ablation_intervals`), as JSON.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tqdm  # noqa: E402

from moe_jax import analysis, checkpoint, evalset, fileio, runstate, tracing  # noqa: E402
from moe_jax.data import pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run to trace (its checkpoints).")
_OUTPUT = flags.DEFINE_string("output", None, "Trace file (.npz); with --steps, '{step}' in it is the step.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that restores).")
_STEPS = flags.DEFINE_string("steps", None, "'all' or comma-separated steps: one trace per checkpoint.")
_DATASET = flags.DEFINE_enum("dataset", None, ["stdlib", "text_dir"], "Trace this dataset's validation split "
                             "(default: the run's data.dataset).")
_TEXT_GLOB = flags.DEFINE_string("text_glob", None, "Trace these files instead ('**' recurses).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 65536, "Most tokens traced (whole rows of the run's seq_len).")
_CAP_TOKENS = flags.DEFINE_integer("cap_tokens", 1024, "Most tokens of one document.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
_ABLATIONS = flags.DEFINE_string("ablations", None, "Also write the expert-ablation losses of the last step traced "
                                 "to this JSON file.")
_ABLATION_TOKENS = flags.DEFINE_integer("ablation_tokens", 16384, "Most tokens of the text the ablations evaluate "
                                        "(whole rows; each removal costs one forward pass of them).")


def documents(config) -> dict:
  """name -> token ids of the text to trace (module docstring), tokenized by the run's tokenizer."""
  tokenizer = pipeline.get_tokenizer(config.data)
  if _TEXT_GLOB.value:
    return {name: tokenizer.encode(text) for name, text in tracing.read_text_files(_TEXT_GLOB.value).items()}
  data = dict(config.data.to_dict(), objective="causal_lm")  # the text only: any objective's documents
  if _DATASET.value:
    data["dataset"] = _DATASET.value
  return evalset.validation_documents(data)


def steps_to_trace() -> list:
  if _STEPS.value is None:
    return [_STEP.value]
  if _STEPS.value != "all":
    return [int(s) for s in _STEPS.value.split(",")]
  directory = os.path.join(_WORKDIR.value, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory} does not exist: the run in {_WORKDIR.value} has saved no checkpoint")
  checkpointer = checkpoint.Checkpointer(directory, keep=1, read_only=True)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


def ablations(run, texts: dict, meta: dict) -> dict:
  """The ablation record of `run` (module docstring): the unablated loss and, per removal, the losses [NB][E] and
  their ranking; losses in nats per token over the evaluated tokens."""
  tokenizer = pipeline.get_tokenizer(run.config.data)
  eval_set = evalset.build_eval_set(texts, tokenizer=tokenizer, seq_len=run.typed.train.seq_len,
                                    cap_tokens=_CAP_TOKENS.value, min_tokens=0)
  rows = tracing.rows_to_trace(_ABLATION_TOKENS.value, eval_set.inputs.shape[1], len(eval_set.inputs))
  record = {**meta, "cap_tokens": _CAP_TOKENS.value, "max_tokens": _ABLATION_TOKENS.value,
            "tokens": int(eval_set.weights[:rows].sum()),
            "documents": len(set(eval_set.document[:rows].reshape(-1).tolist()) - {-1}),
            "eval_set": eval_set.fingerprint, "removals": {}}
  for removal in tracing.REMOVALS:
    nats, ablated, tokens, blocks = tracing.ablation_nats(run.model, eval_set, batch_size=_BATCH_SIZE.value,
                                                          max_tokens=_ABLATION_TOKENS.value, removal=removal)
    base, losses = nats.sum() / tokens.sum(), ablated.sum(axis=-1) / tokens.sum()
    low, high = analysis.ablation_intervals(nats, ablated, tokens)
    position = {block: i for i, block in enumerate(blocks.tolist())}
    record["base_loss"], record["blocks"] = float(base), blocks.tolist()
    record["removals"][removal] = {
        "losses": losses.tolist(),
        "ranking": [{**vars(entry), "delta_low": low[position[entry.block], entry.expert],
                     "delta_high": high[position[entry.block], entry.expert]}
                    for entry in analysis.rank_ablations(base, losses, blocks.tolist())]}
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _STEPS.value is not None and "{step}" not in _OUTPUT.value:
    raise app.UsageError("--steps writes one trace per step: put '{step}' in --output")
  try:
    texts = run = meta = None
    for step in steps_to_trace():
      run = runstate.load(_WORKDIR.value, step=step)
      if texts is None:
        texts = documents(run.config)
      with tqdm.tqdm(unit="row", desc=f"trace step {run.step}") as bar:
        def progress(rows, total, bar=bar):
          bar.total = total
          bar.update(rows)

        meta = {"workdir": os.path.abspath(_WORKDIR.value), "step": run.step, "tokenizer": run.config.data.tokenizer,
                "text": _TEXT_GLOB.value or _DATASET.value or run.config.data.dataset}
        trace = tracing.trace_documents(
            run.model, texts, tokenizer=pipeline.get_tokenizer(run.config.data), seq_len=run.typed.train.seq_len,
            cap_tokens=_CAP_TOKENS.value, batch_size=_BATCH_SIZE.value, max_tokens=_MAX_TOKENS.value,
            progress=progress, meta=meta)
      output = _OUTPUT.value.format(step=run.step)
      analysis.write_trace(output, trace)
      print(f"wrote {output}: {len(trace.token_ids)} tokens, {len(trace.document_names)} documents, MoE blocks "
            f"{trace.blocks.tolist()}, step {run.step}")
    if _ABLATIONS.value:
      fileio.write_json(_ABLATIONS.value, ablations(run, texts, meta), indent=1)
      print(f"wrote {_ABLATIONS.value}: expert ablations of step {run.step}")
  except ValueError as error:
    print(f"cannot trace: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main)
