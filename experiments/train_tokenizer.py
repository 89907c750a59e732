"""Train a SentencePiece tokenizer on the train split of a corpus, then use it with --config.data.tokenizer.

  python experiments/train_tokenizer.py --output=/tmp/stdlib_8k.model --vocab_size=8000
  python experiments/train_tokenizer.py --dataset=text_dir --text_dir=~/books --text_glob='**/*.txt' \\
      --output=/tmp/books_16k.model --vocab_size=16000 --max_sentences=2000000

Sentences are the non-empty lines of the documents in a seeded shuffled document order, so the
lines read (at most 10 x --max_sentences, of which SentencePiece samples --max_sentences) come from
the whole corpus rather than its first files. The model uses the byte tokenizer's id layout (pad=0, eos=1, unk=2) and byte
fallback, so every text round-trips; see `moe_jax.data.tokenizers.train_sentencepiece`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import grain

from moe_jax import data
from moe_jax.data import pipeline
from moe_jax.data import tokenizers


def corpus_lines(cfg, *, seed: int) -> Iterator[str]:
  """Non-empty lines of the train split's documents, document order shuffled by `seed`."""
  source, text_key = pipeline.document_source(cfg, "train")
  docs = grain.MapDataset.source(source).shuffle(seed=seed)
  for record in docs:
    text = record[text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    for line in text.split("\n"):
      if line.strip():
        yield line


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default="stdlib", choices=data.DATASETS)
  parser.add_argument("--data_dir", default=None, help="TFDS cache (default: ~/.cache/moe_jax/tfds)")
  parser.add_argument("--text_dir", default=None, help="directory of text files, for --dataset=text_dir")
  parser.add_argument("--text_glob", default="**/*.txt")
  parser.add_argument("--validation_fraction", type=float, default=0.02,
                      help="stdlib/text_dir: files held out (and not trained on), as in data.validation_fraction")
  parser.add_argument("--download", action="store_true", help="registered datasets: allow downloading")
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
  parser.add_argument("--max_sentences", type=int, default=1_000_000,
                      help="lines SentencePiece samples for training (its input_sentence_size)")
  parser.add_argument("--seed", type=int, default=0, help="document order the lines are drawn in")
  args = parser.parse_args(argv)

  cfg = data.default_data_config()
  cfg.dataset = args.dataset
  cfg.data_dir = args.data_dir
  cfg.text_dir = args.text_dir
  cfg.text_glob = args.text_glob
  cfg.download = args.download
  cfg.validation_fraction = args.validation_fraction
  data.validate_data_config(cfg)

  start = time.perf_counter()
  tokenizer = tokenizers.train_sentencepiece(
      corpus_lines(cfg, seed=args.seed), model_path=args.output, vocab_size=args.vocab_size,
      model_type=args.model_type, max_sentences=args.max_sentences)
  sample = "def main(argv):\n    return 0\n"
  print(f"wrote {args.output}: vocab_size={tokenizer.vocab_size}, pad={tokenizer.pad_id}, "
        f"eos={tokenizer.eos_id}, {time.perf_counter() - start:.1f} s; "
        f"{len(sample.encode())} bytes of sample -> {len(tokenizer.encode(sample))} tokens")


if __name__ == "__main__":
  main()
