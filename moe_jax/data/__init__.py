"""Input pipeline: TFDS builders (no TensorFlow), tokenizers, packed grain batches.

  builders.py    where documents come from: stdlib / text_dir builders, registered TFDS datasets
  tokenizers.py  text <-> ids: byte-level (default), SentencePiece, Hugging Face tokenizer.json
  pipeline.py    shard -> shuffle -> tokenize -> pack -> batch, checkpointable
  config.py      the `data` config section and its validation

Entry points for the training loop:
  cfg = default_data_config(); validate_data_config(cfg)
  tokenizer = get_tokenizer(cfg)        # tokenizer.vocab_size sizes the embedding
  it = create_iterator(cfg, split='train', batch_size=B, seq_len=L, seed=0,
                       shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)                      # {'inputs', 'targets': int32 [B, L], 'weights': float32 [B, L]}
  state = it.get_state(); it.set_state(state)   # JSON-safe; resumes exactly
"""

import importlib

# name -> the submodule that defines it. Imported on first use (PEP 562), so that `import moe_jax.data.config`
# or `moe_jax.data.span_corruption` (which config validation needs) does not pull in the grain pipeline and,
# through it, orbax.
_EXPORTS = {
    "DatasetNotPreparedError": "builders",
    "DATASETS": "config",
    "default_data_config": "config",
    "validate_data_config": "config",
    "create_iterator": "pipeline",
    "get_tokenizer": "pipeline",
    "ByteTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers",
    "HuggingFaceTokenizer": "tokenizers",
    "Tokenizer": "tokenizers",
}

_SUBMODULES = ("builders", "config", "pipeline", "span_corruption", "tokenizers")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _SUBMODULES:  # `data_lib.pipeline` works before anything imported the submodule
    return importlib.import_module(f"moe_jax.data.{name}")
  if name not in _EXPORTS:
    raise AttributeError(f"module 'moe_jax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(f"moe_jax.data.{_EXPORTS[name]}"), name)
