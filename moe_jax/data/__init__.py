"""Input pipeline: TFDS builders (no TensorFlow), tokenizers, packed grain batches.

  builders.py    where documents come from: stdlib / text_dir builders, registered TFDS datasets
  tokenizers.py  text <-> ids: byte-level (default) and SentencePiece
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

from moe_jax.data.builders import DatasetNotPreparedError
from moe_jax.data.config import DATASETS
from moe_jax.data.config import default_data_config
from moe_jax.data.config import validate_data_config
from moe_jax.data.pipeline import create_iterator
from moe_jax.data.pipeline import get_tokenizer
from moe_jax.data.tokenizers import ByteTokenizer
from moe_jax.data.tokenizers import SentencePieceTokenizer
from moe_jax.data.tokenizers import Tokenizer

__all__ = [
    "DATASETS", "DatasetNotPreparedError", "ByteTokenizer", "SentencePieceTokenizer", "Tokenizer",
    "create_iterator", "default_data_config", "get_tokenizer", "validate_data_config",
]
