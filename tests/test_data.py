"""Input pipeline invariants: splits, packing, shuffling, sharding, resumption, tokenizers, errors.

Most tests read a small text_dir corpus written here and prepared once into a temporary data_dir;
one test prepares the real stdlib corpus (about a second).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import grain
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_jax import data
from moe_jax.data import builders
from moe_jax.data import pipeline
from moe_jax.data import tokenizers

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "ε", "ζήτα", "日本語", "🙂", "naïve", "x", "yy", "\n", "\t", "  "]
NUM_FILES = 48


def write_corpus(root: pathlib.Path) -> dict[str, str]:
  """NUM_FILES text files of 20..1500 words in nested folders (plus files the glob must skip)."""
  rng = np.random.default_rng(0)
  texts = {}
  for i in range(NUM_FILES):
    rel = f"part{i % 3}/doc{i:03d}.txt" if i % 4 else f"doc{i:03d}.txt"
    n = int(rng.integers(20, 1500))
    texts[rel] = f"# document {i}\n" + " ".join(rng.choice(WORDS, size=n))
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(texts[rel], encoding="utf-8")
  (root / "README.md").write_text("not a .txt file", encoding="utf-8")
  return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, dict[str, str]]:
  root = tmp_path_factory.mktemp("corpus")
  return root, write_corpus(root)


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory):
  root, _ = corpus
  config = data.default_data_config()
  config.dataset = "text_dir"
  config.text_dir = str(root)
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.validation_fraction = 0.25  # several validation files from a small corpus
  return config


def split_texts(corpus, fraction: float) -> dict[str, list[str]]:
  _, texts = corpus
  return {split: [texts[p] for p in paths] for split, paths in builders.split_files(sorted(texts), fraction).items()}


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def token_stream(batches: list[dict[str, np.ndarray]], pad_id: int) -> np.ndarray:
  """The tokens of every row, row after row, padding removed: chunk = inputs[0] + targets."""
  rows = [np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1) for b in batches]  # [B, L + 1] each
  stream = np.concatenate(rows).reshape(-1)
  return stream[stream != pad_id]


def documents_of(stream: np.ndarray, tokenizer) -> list[str]:
  """Decoded documents of a packed stream: the pieces between EOS separators."""
  ends = np.flatnonzero(stream == tokenizer.eos_id)
  assert len(ends) and ends[-1] == len(stream) - 1, "every document, the last too, ends with EOS"
  return [tokenizer.decode(piece) for piece in np.split(stream, ends + 1)[:-1]]


# ---------------------------------------------------------------------------------------------
# Splits.


def test_split_is_a_deterministic_function_of_the_path():
  paths = [f"pkg{i % 7}/module_{i}.py" for i in range(2000)]
  split = builders.split_files(paths, 0.02)
  assert split == builders.split_files(list(reversed(paths)), 0.02)  # order does not matter
  assert set(split["train"]).isdisjoint(split["validation"])
  assert sorted(split["train"] + split["validation"]) == sorted(paths)
  assert 20 <= len(split["validation"]) <= 60  # ~2% of 2000
  # Raising the fraction only moves files into validation.
  assert set(split["validation"]) <= set(builders.split_files(paths, 0.1)["validation"])
  # Pinned: the split must not change across machines, Python versions or releases.
  assert builders.validation_bucket("os.py") == pytest.approx(0.850948727781281, abs=1e-12)
  assert builders.validation_bucket("asyncio/tasks.py") == pytest.approx(0.1464856074155942, abs=1e-12)
  assert builders.split_files(["copyreg.py", "os.py", "json/decoder.py"], 0.02)["validation"] == ["copyreg.py"]


def test_prepared_splits_are_disjoint_and_cover_the_files(cfg, corpus):
  _, texts = corpus
  seen = {}
  for split in builders.SPLITS:
    source, _ = pipeline.document_source(cfg, split)
    seen[split] = {source[i]["path"].decode() for i in range(len(source))}
  assert seen["train"].isdisjoint(seen["validation"])
  assert seen["train"] | seen["validation"] == set(texts)  # README.md is not matched by **/*.txt
  expected = builders.split_files(sorted(texts), cfg.validation_fraction)
  assert seen["validation"] == set(expected["validation"])


# ---------------------------------------------------------------------------------------------
# Packing and batches.


@pytest.mark.parametrize("num_streams", [1, 3])
def test_packer_fills_every_chunk_until_the_end(num_streams):
  rng = np.random.default_rng(1)
  docs = [rng.integers(3, 50, size=int(n)).astype(np.int32) for n in rng.integers(1, 40, size=25)]
  ds = grain.MapDataset.source(docs).map(lambda t: {"tokens": t})
  chunks = list(pipeline.PackedStreamsIterDataset(ds, length=7, num_streams=num_streams, pad_id=0))
  assert all(c["tokens"].shape == c["mask"].shape == (7,) for c in chunks)
  all_tokens = np.concatenate([c["tokens"][c["mask"]] for c in chunks])
  if num_streams == 1:
    np.testing.assert_array_equal(all_tokens, np.concatenate(docs))
  assert sorted(all_tokens.tolist()) == sorted(np.concatenate(docs).tolist())
  partial = [c for c in chunks if not c["mask"].all()]
  assert len(partial) <= num_streams  # at most one padded chunk per stream: its last
  assert all(c["mask"][: c["mask"].sum()].all() for c in chunks)  # padding only at the end of a chunk
  assert all((c["tokens"][~c["mask"]] == 0).all() for c in chunks)


def test_each_stream_is_the_concatenation_of_its_documents():
  rng = np.random.default_rng(2)
  docs = [np.full(int(n), i, dtype=np.int32) for i, n in enumerate(rng.integers(1, 30, size=30))]
  ds = grain.MapDataset.source(docs).map(lambda t: {"tokens": t})
  num_streams, length = 4, 5
  it = iter(pipeline.PackedStreamsIterDataset(ds, length=length, num_streams=num_streams, pad_id=-1))
  per_stream = {s: [] for s in range(num_streams)}
  while True:
    stream = it.get_state()["next_stream"]
    exhausted = [d >= len(docs) for d in it.get_state()["doc"]]
    while exhausted[stream]:  # a finished stream drops out of the turn
      stream = (stream + 1) % num_streams
      if all(exhausted):
        break
    try:
      chunk = next(it)
    except StopIteration:
      break
    per_stream[stream].append(chunk["tokens"][chunk["mask"]])
  for s in range(num_streams):
    np.testing.assert_array_equal(np.concatenate(per_stream[s]), np.concatenate(docs[s::num_streams]))


def test_eval_pass_is_the_split_packed_with_eos_separators(cfg, corpus):
  tokenizer = data.get_tokenizer(cfg)
  batches = list(data.create_iterator(cfg, split="validation", batch_size=4, seq_len=32, seed=0, repeat=False))
  weights = np.concatenate([b["weights"] for b in batches])   # [rows, L]
  real_rows = weights.sum(axis=1) > 0
  # Full-length rows (weight 1 everywhere) except at the very end of the pass.
  last_real = np.flatnonzero(real_rows)[-1]
  assert (weights[:last_real] == 1).all()
  assert (weights[last_real + 1:] == 0).all()
  docs = documents_of(token_stream(batches, tokenizer.pad_id), tokenizer)
  assert sorted(docs) == sorted(split_texts(corpus, cfg.validation_fraction)["validation"])
  for b in batches:
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 32)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32


def test_targets_are_inputs_shifted_by_one(cfg):
  for batch in take(data.create_iterator(cfg, split="train", batch_size=8, seq_len=16, seed=3), 20):
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["weights"] == 1).all()  # repeating: never padding


def test_training_rows_come_from_different_documents(cfg):
  tokenizer = data.get_tokenizer(cfg)
  batch = next(data.create_iterator(cfg, split="train", batch_size=8, seq_len=16, seed=0))
  # Row r starts stream r at its first document: 8 different documents begin "# document i".
  heads = [tokenizer.decode(row).split("\n")[0] for row in batch["inputs"]]
  assert all(h.startswith("# document ") for h in heads)
  assert len(set(heads)) == 8


def test_training_repeats_every_document_each_epoch(cfg, corpus):
  docs = pipeline.tokenized_documents(
      pipeline.document_source(cfg, "train")[0], text_key="text", tokenizer=tokenizers.ByteTokenizer(), seed=5)
  n = len(split_texts(corpus, cfg.validation_fraction)["train"])
  epoch0 = [bytes(docs[i]["tokens"]) for i in range(n)]
  epoch1 = [bytes(docs[i]["tokens"]) for i in range(n, 2 * n)]
  assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == n
  assert epoch0 != epoch1  # reshuffled


# ---------------------------------------------------------------------------------------------
# Order, shards, state.


def test_shuffle_is_a_pure_function_of_the_seed(cfg):
  def first(seed):
    return take(data.create_iterator(cfg, split="train", batch_size=4, seq_len=32, seed=seed), 5)

  assert_batches_equal(first(7), first(7))
  assert not np.array_equal(first(7)[0]["inputs"], first(8)[0]["inputs"])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_process_shards_are_disjoint_and_cover_the_split(cfg, corpus, split):
  tokenizer = data.get_tokenizer(cfg)
  shard_docs = []
  for shard_index in range(3):
    it = data.create_iterator(cfg, split=split, batch_size=2, seq_len=64, seed=11,
                              shard_index=shard_index, shard_count=3, repeat=False)
    shard_docs.append(documents_of(token_stream(list(it), tokenizer.pad_id), tokenizer))
  for i in range(3):
    for j in range(i + 1, 3):
      assert set(shard_docs[i]).isdisjoint(shard_docs[j])
  assert sorted(sum(shard_docs, [])) == sorted(split_texts(corpus, cfg.validation_fraction)[split])


@pytest.mark.parametrize("repeat,n,m", [(True, 7, 9), (False, 3, 100)])
def test_iterator_state_round_trip_resumes_exactly(cfg, repeat, n, m):
  def make():
    return data.create_iterator(cfg, split="train", batch_size=4, seq_len=48, seed=2, repeat=repeat)

  it = make()
  take(it, n)
  state = json.loads(json.dumps(it.get_state()))  # as grain's checkpoint handler stores it
  expected = take(it, m) if repeat else list(it)
  resumed = make()
  resumed.set_state(state)
  got = take(resumed, m) if repeat else list(resumed)
  assert_batches_equal(got, expected)
  assert repeat or len(got) > 0


def test_num_batches_limits_the_pass(cfg):
  it = data.create_iterator(cfg, split="train", batch_size=2, seq_len=8, seed=0, num_batches=5)
  assert len(list(it)) == 5


def test_num_batches_keeps_unequal_shards_in_lockstep(cfg):
  def shard(shard_index, num_batches=None):
    return list(data.create_iterator(cfg, split="validation", batch_size=2, seq_len=64, seed=0, repeat=False,
                                     shard_index=shard_index, shard_count=2, num_batches=num_batches))

  full = [shard(0), shard(1)]
  assert len(full[0]) != len(full[1])  # the shards really are unequal
  steps = max(map(len, full)) + 3
  for shard_index in range(2):
    padded = shard(shard_index, num_batches=steps)
    assert len(padded) == steps
    assert_batches_equal(padded[:len(full[shard_index])], full[shard_index])
    assert all((b["weights"] == 0).all() for b in padded[len(full[shard_index]):])  # after the shard ends


# ---------------------------------------------------------------------------------------------
# Tokenizers.


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
  tokenizer = tokenizers.ByteTokenizer()
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32
  assert ((ids >= tokenizers.BYTE_OFFSET) & (ids < tokenizer.vocab_size)).all()
  assert tokenizer.decode(ids) == text


def test_byte_tokenizer_id_layout():
  tokenizer = tokenizers.ByteTokenizer()
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id) == (259, 0, 1)
  assert tokenizer.encode("\x00A\xff").tolist() == [3, 65 + 3, 0xC3 + 3, 0xBF + 3]
  assert tokenizer.decode([0, 1, 2, 65 + 3, 1, 0]) == "A"  # specials are dropped
  assert isinstance(tokenizer, tokenizers.Tokenizer)


def test_sentencepiece_train_load_encode(cfg, corpus, tmp_path):
  script = importlib.util.spec_from_file_location("train_tokenizer", REPO / "experiments" / "train_tokenizer.py")
  train_tokenizer = importlib.util.module_from_spec(script)
  script.loader.exec_module(train_tokenizer)
  model = tmp_path / "tiny.model"
  train_tokenizer.main([
      "--dataset=text_dir", f"--text_dir={cfg.text_dir}", f"--data_dir={cfg.data_dir}",
      f"--validation_fraction={cfg.validation_fraction}", f"--output={model}", "--vocab_size=300",
      "--max_sentences=5000"])
  config = cfg.copy_and_resolve_references()
  config.tokenizer = str(model)
  tokenizer = data.get_tokenizer(config)
  assert isinstance(tokenizer, tokenizers.SentencePieceTokenizer)
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id) == (300, 0, 1)
  _, texts = corpus
  for text in list(texts.values())[:5]:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text.encode("utf-8")) / 2  # learned pieces compress
    assert tokenizer.decode(ids) == text
  unseen = "unseen: Ω≈ç√ 🚀\n\tindent   x"
  assert tokenizer.decode(tokenizer.encode(unseen)) == unseen  # byte fallback: lossless
  batch = next(data.create_iterator(config, split="train", batch_size=2, seq_len=16, seed=0))
  assert batch["inputs"].max() < 300


# ---------------------------------------------------------------------------------------------
# Registered datasets and errors.


@pytest.mark.parametrize("name", ["lm1b", "c4/en", "wiki40b/en"])
def test_missing_registered_dataset_fails_fast_with_a_clear_error(name, tmp_path):
  config = data.default_data_config()
  config.dataset = name
  config.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotPreparedError, match="download_and_prepare") as error:
    data.create_iterator(config, split="train", batch_size=2, seq_len=8, seed=0)
  assert not any(tmp_path.iterdir())  # refused before any download or preparation started
  assert isinstance(error.value, FileNotFoundError)
  assert "data.download=True" in str(error.value)


class _FakeC4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for a c4/en prepared on a pod: same name, config, version and text feature."""

  name = "c4"
  VERSION = tfds.core.Version("3.1.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "url": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 6), "validation": self._generate_examples(6, 8)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {"text": f"web page {i}: " + "lorem ipsum " * (i + 1), "url": f"https://example.com/{i}"}


def test_prepared_registered_dataset_is_read_without_its_builder_code(tmp_path):
  _FakeC4(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  config = data.default_data_config()
  config.dataset = "c4/en"
  config.data_dir = str(tmp_path)
  tokenizer = data.get_tokenizer(config)
  batches = list(data.create_iterator(config, split="validation", batch_size=2, seq_len=16, seed=0, repeat=False))
  docs = documents_of(token_stream(batches, tokenizer.pad_id), tokenizer)
  assert sorted(docs) == sorted(f"web page {i}: " + "lorem ipsum " * (i + 1) for i in (6, 7))


@pytest.mark.parametrize("field,value,message", [
    ("dataset", "foo", "data.dataset='foo' must be one of 'stdlib', 'text_dir', 'c4/en', 'lm1b', 'wiki40b/en'"),
    ("tokenizer", "/nonexistent/spm.model", "data.tokenizer='/nonexistent/spm.model'"),
    ("validation_fraction", 0.7, "data.validation_fraction=0.7"),
    ("validation_fraction", 0.0, "data.validation_fraction=0.0"),
    ("download", "yes", "data.download='yes'"),
])
def test_bad_config_raises_value_error_naming_the_field(field, value, message):
  config = data.default_data_config().to_dict()  # a plain dict: ConfigDict would refuse some values itself
  config[field] = value
  with pytest.raises(ValueError, match=message):
    data.validate_data_config(config)


def test_text_dir_must_exist_and_have_files(tmp_path):
  config = data.default_data_config()
  config.dataset = "text_dir"
  with pytest.raises(ValueError, match="data.text_dir=None"):
    data.validate_data_config(config)
  config.text_dir = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="data.text_dir=.*not an existing directory"):
    data.validate_data_config(config)
  config.text_dir = str(tmp_path)
  config.data_dir = str(tmp_path / "tfds")
  (tmp_path / "notes.md").write_text("no txt here")
  with pytest.raises(ValueError, match="no files matching data.text_glob='\\*\\*/\\*.txt'"):
    data.create_iterator(config, split="train", batch_size=1, seq_len=4, seed=0)


def test_defaults_validate_and_dataset_list_is_complete():
  config = data.default_data_config()
  data.validate_data_config(config)
  assert config.dataset == "stdlib" and config.tokenizer == "byte" and config.download is False
  assert data.DATASETS == ("stdlib", "text_dir", "c4/en", "lm1b", "wiki40b/en")


# ---------------------------------------------------------------------------------------------
# The real embedded corpus.


def test_stdlib_corpus_prepares_once_and_yields_python(tmp_path):
  config = data.default_data_config()
  config.data_dir = str(tmp_path)
  it = data.create_iterator(config, split="train", batch_size=4, seq_len=64, seed=0)
  batch = next(it)
  prepared = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
  next(data.create_iterator(config, split="train", batch_size=4, seq_len=64, seed=0))
  assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()} == prepared  # once
  files = builders.stdlib_config().relative_paths
  assert len(files) > 100 and "os.py" in files and not any("site-packages" in p for p in files)
  sizes = {split: len(pipeline.document_source(config, split)[0]) for split in builders.SPLITS}
  assert sizes["train"] + sizes["validation"] == len(files)
  assert 0.005 < sizes["validation"] / len(files) < 0.05
  text = data.get_tokenizer(config).decode(batch["inputs"].reshape(-1))
  assert "import" in text or "def " in text
  prepared = list(tmp_path.glob("moe_jax_stdlib/*/1.0.0/*.array_record*"))
  mtimes = [p.stat().st_mtime_ns for p in prepared]
  next(data.create_iterator(config, split="validation", batch_size=4, seq_len=64, seed=0, repeat=False))
  assert [p.stat().st_mtime_ns for p in prepared] == mtimes  # reused, not prepared again


def test_process_shards_of_training_rebuild_the_single_process_batch(cfg):
  """Two processes with B/2 rows each see exactly the rows of one process with B rows, in order."""
  def batches(shard_index, shard_count, batch_size):
    it = pipeline.create_iterator(cfg, split="train", batch_size=batch_size, seq_len=16, seed=3,
                                  shard_index=shard_index, shard_count=shard_count)
    return [next(it) for _ in range(5)]

  single = batches(0, 1, 4)
  halves = [batches(0, 2, 2), batches(1, 2, 2)]
  for step in range(5):
    for key in ("inputs", "targets", "weights"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), single[step][key])
