"""Convert between Hugging Face checkpoints (config.json + safetensors) and moe_jax runs (moe_jax.interop).

  python experiments/convert.py --from=hf:/models/Mixtral-8x7B-v0.1 --to=/runs/mixtral      # import: a workdir
  python experiments/convert.py --from=/runs/mixtral-ft --to=hf:/models/mixtral-ft           # export
  python experiments/convert.py --from=/runs/mine --to=hf:/models/mine --family=llama        # a run never imported

An import writes step 0 of a run (config.json and checkpoints/0, the model's tokenizer in tokenizer/): every tool
that opens a run reads it (runstate.load, experiments/upcycle.py --dense_workdir, train.init_from). An export
writes config.json, the safetensors shards (--shard_mb each, with model.safetensors.index.json when there are
several) and the tokenizer files, for transformers' own classes (AutoModelForCausalLM.from_pretrained). Families:
mixtral, olmoe, qwen2_moe, qwen3_moe, dbrx, phimoe, switch_transformers, llama, qwen2, qwen3, olmo, olmo2.

Prints a progress bar on stderr and a summary line (parameters, bytes, dtype, time); a bad input is one line on
stderr and exit status 2.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_jax import interop  # noqa: E402

HF = "hf:"
_FROM = flags.DEFINE_string("from", None, "hf:/path of a Hugging Face model directory, or a moe_jax workdir")
_TO = flags.DEFINE_string("to", None, "a new moe_jax workdir, or hf:/path of the directory to export to")
_FAMILY = flags.DEFINE_string("family", None, "export only: the Hugging Face family (default: the one the run was "
                              "imported from)")
_STEP = flags.DEFINE_integer("step", None, "export only: the checkpoint step (default: the newest)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "export only: the tensors' dtype "
                           "(default: the imported checkpoint's, else float32)")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 5000, "export only: the largest safetensors shard, in MB")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "import only: data.tokenizer of the run (default: the model's "
                                 "tokenizer.json / tokenizer.model)")


class ProgressBar:
  """A one-line bar on stderr, redrawn at most 10 times a second."""

  def __init__(self, verb: str):
    self.verb, self.start, self.drawn = verb, time.perf_counter(), 0.0

  def __call__(self, done: int, total: int, name: str) -> None:
    now = time.perf_counter()
    if now - self.drawn < 0.1 and done < total:
      return
    self.drawn = now
    share = done / total if total else 1.0
    bar = "#" * int(30 * share)
    rate = done / 2**20 / max(now - self.start, 1e-9)
    sys.stderr.write(f"\r{self.verb} [{bar:<30}] {100 * share:5.1f}% {done / 2**20:,.1f} MiB {rate:,.0f} MiB/s "
                     f"{name[:40]:<40}")
    if done >= total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  source, target = _FROM.value, _TO.value
  try:
    if source.startswith(HF) == target.startswith(HF):
      raise ValueError(f"--from={source!r} --to={target!r}: exactly one side must be hf:/path")
    if source.startswith(HF):
      if _FAMILY.value or _STEP.value is not None or _DTYPE.value:
        raise ValueError("--family, --step and --dtype are for an export (--to=hf:/path)")
      summary = interop.import_to_workdir(source[len(HF):], target, tokenizer=_TOKENIZER.value,
                                          progress=ProgressBar("import"))
      where = f"{target} (step 0: runstate.load, upcycle --dense_workdir, train.init_from read it)"
    else:
      if _TOKENIZER.value:
        raise ValueError("--tokenizer is for an import (--from=hf:/path)")
      family = interop.family(_FAMILY.value).MODEL_TYPE if _FAMILY.value else None
      summary = interop.export_workdir(source, target[len(HF):], family=family, step=_STEP.value,
                                       dtype=_DTYPE.value, max_shard_bytes=_SHARD_MB.value * 10**6,
                                       progress=ProgressBar("export"))
      where = target[len(HF):]
  except (ValueError, FileNotFoundError) as error:
    print(f"cannot convert: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
  print(f"converted {summary.line()} -> {where}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["from", "to"])
  app.run(main)
