"""Input pipeline: TFRecord I/O, packing, sharding, determinism, resume, eval passes, loaders, errors."""

import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from MaxText import input_pipeline, prepare_data, startup
from MaxText.errors import ConfigError
from MaxText.input_pipeline import default_corpus, packing, tfrecord_files
from MaxText.input_pipeline.tokenizer import Tokenizer, train_sentencepiece

BASE_CONFIG = str(Path(__file__).resolve().parents[1] / "MaxText" / "configs" / "base_v2.yml")
VOCAB = 512
FIELDS = packing.FIELDS

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "import os\nprint(os.getcwd())\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "x = [n * n for n in range(100)]\ny = {k: v for k, v in zip('abc', x)}\n",
] * 3


# Token stores (the global shuffle's index) go to a folder of this test session, never to ~/.cache.
_STORES = tempfile.mkdtemp(prefix="maxtext-test-stores-")
atexit.register(shutil.rmtree, _STORES, ignore_errors=True)


def make_config(**overrides):
  values = dict(num_devices=1, per_device_batch_size=4, max_target_length=16, vocab_size=VOCAB,
                shuffle_buffer_size=64, dataset_cache_dir=_STORES)
  values.update(overrides)
  return startup.load_config([None, BASE_CONFIG], env={}, **values)


def random_docs(n, seed=0, first_id=10, max_len=40):
  """Documents whose tokens are unique across all documents, so a token pair pins down its place."""
  rng = np.random.default_rng(seed)
  docs, next_id = [], first_id
  for _ in range(n):
    length = int(rng.integers(1, max_len))
    docs.append(list(range(next_id, next_id + length)))
    next_id += length
  return docs


def write_split(folder, split, docs, num_files, feature="tokens"):
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(num_files):
    tfrecord_files.write_documents(str(folder / f"{split}-{i:05d}-of-{num_files:05d}.tfrecord"), docs[i::num_files], feature)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in FIELDS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def docs_of_rows(batches):
  """Each row's document (packing off): its inputs, plus the last target when that one is trained."""
  docs = []
  for b in batches:
    for r in range(len(b["inputs"])):
      n = int(np.count_nonzero(b["inputs_segmentation"][r]))
      if n:
        tail = [int(b["targets"][r, n - 1])] if b["targets_segmentation"][r, n - 1] else []
        docs.append(tuple(b["inputs"][r, :n].tolist() + tail))
  return docs


def token_docs(n, seed, max_len=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, VOCAB, int(rng.integers(1, max_len))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_sentencepiece(iter(TEXTS), path, vocab_size=400)
  return path


@pytest.fixture(scope="module")
def token_dataset(tmp_path_factory):
  """train: 4 files of 60 documents; validation: 1 file of 23 documents."""
  folder = tmp_path_factory.mktemp("tokens")
  write_split(folder, "train", token_docs(60, seed=1), 4)
  write_split(folder, "validation", token_docs(23, seed=2, max_len=30), 1)
  return folder


# --- TFRecord and tokenizer ---

def test_tfrecord_round_trip_tokens_and_text(tmp_path):
  docs = [[5, 6, 7], [], [2 ** 40, 1]]
  assert tfrecord_files.write_documents(str(tmp_path / "a.tfrecord"), docs) == 3
  assert list(tfrecord_files.read_documents(str(tmp_path / "a.tfrecord"))) == docs
  texts = ["héllo\n  world\t", "", "x" * 1000]
  tfrecord_files.write_documents(str(tmp_path / "b.tfrecord"), texts, feature="text")
  assert list(tfrecord_files.read_documents(str(tmp_path / "b.tfrecord"))) == texts
  assert tfrecord_files.detect_feature([str(tmp_path / "b.tfrecord")]) == "text"


def test_tokenizer_keeps_whitespace_and_special_ids(tokenizer_path):
  tok = Tokenizer(tokenizer_path)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  for text in TEXTS[:6] + ["  odd   spacing\n\n\ttabs ünïcödé 12345\n"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert min(ids) > 3 and max(ids) < tok.vocab_size
  assert tok.decode([2] + tok.encode("a b") + [3, 0, 0]) == "a b"


def test_text_records_are_tokenized_by_the_loader(tmp_path, tokenizer_path):
  write_split(tmp_path, "train", TEXTS, 2, feature="text")
  (tmp_path / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
  config = make_config(dataset_path=str(tmp_path), packing=False, max_target_length=64, num_epochs=1)
  assert input_pipeline.resolve_dataset(config) == (str(tmp_path), str(tmp_path / "tokenizer.model"))
  tok = input_pipeline.get_tokenizer(config)
  rows = docs_of_rows(list(input_pipeline.create_iterator(config, "train")))
  expected = {tuple(([tok.bos_id] + tok.encode(t) + [tok.eos_id])[:65]) for t in TEXTS}
  assert set(rows) == expected


# --- Packing ---

def chunks_of(docs, per_chunk=7):
  for i in range(0, len(docs), per_chunk):
    part = docs[i:i + per_chunk]
    lengths = np.array([len(d) for d in part], np.int64)
    tokens = np.array([t for d in part for t in d], np.int32)
    yield packing.Chunk(tokens, lengths, epoch=0, first_doc=i)


def test_add_special_tokens():
  tokens, lengths = packing.add_special_tokens(np.array([7, 8, 9], np.int32), np.array([2, 0, 1]), 2, 3)
  assert tokens.tolist() == [2, 7, 8, 3, 2, 3, 2, 9, 3]
  assert lengths.tolist() == [4, 2, 3]
  tokens, lengths = packing.add_special_tokens(np.array([7, 8, 9], np.int32), np.array([2, 1]), None, 3)
  assert tokens.tolist() == [7, 8, 3, 9, 3]


def test_packing_trains_every_pair_inside_a_document_exactly_once():
  R, L = 3, 8
  docs = random_docs(50, seed=3, max_len=30)
  batches = []
  packer = packing.Packer(chunks_of(docs), R, L, (0, 0, 0))
  while (batch := packer.next_batch()) is not None:
    batches.append(batch)
  assert packer.next_batch() is None and packer.position() is None
  rows = {k: np.concatenate([b[k] for b in batches]) for k in FIELDS}
  for k in FIELDS:
    assert rows[k].dtype == np.int32 and rows[k].shape[1] == L
  real = rows["inputs_segmentation"] > 0
  # Targets are the inputs shifted by one, and consecutive rows overlap by one token.
  np.testing.assert_array_equal(rows["targets"][:, :-1][real[:, 1:]], rows["inputs"][:, 1:][real[:, 1:]])
  full = real.all(axis=1)
  np.testing.assert_array_equal(rows["inputs"][1:, 0][full[1:]], rows["targets"][:-1, -1][full[1:]])

  trained = rows["targets_segmentation"] > 0
  pairs = list(zip(rows["inputs"][trained].tolist(), rows["targets"][trained].tolist()))
  expected = [(a, b) for d in docs for a, b in zip(d[:-1], d[1:])]
  assert sorted(pairs) == sorted(expected)  # each once: none lost, none twice, none across documents

  doc_of = {t: i for i, d in enumerate(docs) for t in d}
  first_of = {d[0] for d in docs}
  for r in range(len(rows["inputs"])):
    seg, pos, tok = rows["inputs_segmentation"][r], rows["inputs_position"][r], rows["inputs"][r]
    n = int(real[r].sum())
    assert not seg[n:].any() and not rows["targets_segmentation"][r][n:].any()
    assert seg[0] == 1 and pos[0] == 0
    for i in range(1, n):
      new_piece = tok[i] in first_of
      assert seg[i] == seg[i - 1] + new_piece
      assert pos[i] == (0 if new_piece else pos[i - 1] + 1)
      assert (doc_of[tok[i]] == doc_of[tok[i - 1]]) == (not new_piece)


def test_packing_pads_the_last_batch_with_empty_rows():
  packer = packing.Packer(chunks_of([[10, 11, 12, 13, 14]]), 4, 3, (0, 0, 0))
  batch = packer.next_batch()
  assert batch["inputs"].tolist() == [[10, 11, 12], [13, 14, 0], [0, 0, 0], [0, 0, 0]]
  assert batch["targets"].tolist() == [[11, 12, 13], [14, 0, 0], [0, 0, 0], [0, 0, 0]]
  assert batch["inputs_segmentation"].tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]]
  assert batch["targets_segmentation"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
  assert packer.next_batch() is None


def test_no_packing_one_document_per_row():
  docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [40, 41]]
  batcher = packing.RowPerDocument(chunks_of(docs, 2), 2, 4, (0, 0, 0))
  b1, b2 = batcher.next_batch(), batcher.next_batch()
  assert batcher.next_batch() is None
  assert b1["inputs"].tolist() == [[10, 11, 12, 0], [30, 31, 32, 33]]  # [20] has no next-token pair
  assert b1["targets"].tolist() == [[11, 12, 0, 0], [31, 32, 33, 34]]  # truncated to L + 1 tokens
  assert b1["inputs_segmentation"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
  assert b1["targets_segmentation"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
  assert b1["inputs_position"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
  assert b2["inputs"].tolist() == [[40, 41, 0, 0], [0, 0, 0, 0]]
  assert b2["targets_segmentation"].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


# --- Iterators over TFRecords ---

def test_batches_have_the_promised_shapes_and_bos_eos(token_dataset):
  config = make_config(dataset_path=str(token_dataset), data_shuffle="window", packed_shuffle_buffer_size=0)
  assert input_pipeline.resolve_dataset(config) == (str(token_dataset), "")
  batch = next(input_pipeline.create_iterator(config, "train"))
  assert set(batch) == set(FIELDS)
  for k in FIELDS:
    assert batch[k].shape == (4, 16) and batch[k].dtype == np.int32
  assert batch["inputs"][0, 0] == 2  # the first document starts with BOS
  eos = batch["inputs"] == 3
  assert eos.any() and (batch["targets"][eos] == 2).all()
  assert not batch["targets_segmentation"][eos].any()  # EOS -> the next BOS is never trained


@pytest.mark.parametrize("split,num_files_expected", [("train", 4), ("validation", 1)])
def test_processes_see_disjoint_documents_that_cover_the_split(token_dataset, split, num_files_expected):
  # The streaming path: each process reads its own documents (the global order is tested in test_hf_data).
  config = make_config(dataset_path=str(token_dataset), packing=False, max_target_length=48, num_epochs=1,
                       add_bos=False, add_eos=False, data_shuffle="window")
  seen = []
  for p in range(2):
    it = input_pipeline.create_iterator(config, split, process_index=p, process_count=2)
    assert it._source.shard_by_file == (num_files_expected >= 2)  # both sharding paths are covered
    seen.append(docs_of_rows(list(it)))
  all_docs = [tuple(d) for f in sorted(token_dataset.glob(f"{split}-*")) for d in tfrecord_files.read_documents(str(f))]
  expected = [d for d in all_docs if len(d) >= 2]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(expected)


def test_same_seed_same_batches_other_seed_other_order(token_dataset):
  def first(seed, n=12):
    return take(input_pipeline.create_iterator(make_config(dataset_path=str(token_dataset), data_shuffle_seed=seed),
                                                "train"), n)
  a, b, c = first(0), first(0), first(1)
  assert_batches_equal(a, b)
  assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))


def test_each_epoch_is_shuffled_differently(token_dataset):
  config = make_config(dataset_path=str(token_dataset), packing=False, max_target_length=48, num_epochs=2,
                       add_bos=False, add_eos=False, packed_shuffle_buffer_size=0)
  rows = docs_of_rows(list(input_pipeline.create_iterator(config, "train")))
  half = len(rows) // 2
  assert sorted(rows[:half]) == sorted(rows[half:]) and rows[:half] != rows[half:]


@pytest.mark.parametrize("shuffle", ["global", "window"])
@pytest.mark.parametrize("packing_on", [True, False])
def test_resume_continues_the_uninterrupted_stream(token_dataset, packing_on, shuffle):
  config = make_config(dataset_path=str(token_dataset), packing=packing_on, per_device_batch_size=3,
                       max_target_length=11, data_shuffle=shuffle)
  reference = take(input_pipeline.create_iterator(config, "train"), 70)  # crosses epoch boundaries
  for cut in (1, 17, 45):
    it = input_pipeline.create_iterator(config, "train")
    take(it, cut)
    state = json.loads(json.dumps(it.get_state()))
    assert state["batches_consumed"] == cut
    resumed = input_pipeline.create_iterator(config, "train")
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 70 - cut), reference[cut:])
    replayed = input_pipeline.create_iterator(config, "train")
    replayed.set_state({"batches_consumed": cut})  # e.g. a state saved by another process
    assert_batches_equal(take(replayed, 5), reference[cut:cut + 5])


@pytest.mark.parametrize("packing_on", [True, False])
def test_eval_split_is_one_padded_pass_with_a_batch_count(token_dataset, packing_on):
  config = make_config(dataset_path=str(token_dataset), packing=packing_on, eval_per_device_batch_size=5)
  it = input_pipeline.create_iterator(config, "validation")
  batches = list(it)
  assert len(batches) == it.count_batches() > 1
  assert list(it) == [] and it.get_state()["position"] is None
  docs = list(tfrecord_files.read_documents(str(next(token_dataset.glob("validation-*")))))
  tokens = sum(len(d) + 2 for d in docs)  # with BOS and EOS
  rows = -(-(tokens - 1) // 16) if packing_on else len(docs)
  assert len(batches) == -(-rows // 5)
  real_rows = [bool(b["inputs_segmentation"][r].any()) for b in batches for r in range(5)]
  assert real_rows == [True] * rows + [False] * (5 * len(batches) - rows)  # the last batch is padded
  assert all(b["inputs"].shape == (5, 16) for b in batches)
  again = list(input_pipeline.create_iterator(config, "validation"))
  assert_batches_equal(batches, again)  # no shuffle outside the training split
  if packing_on:  # every token is an input exactly once
    assert sum(int((b["inputs_segmentation"] > 0).sum()) for b in batches) in (tokens, tokens - 1)


def test_finished_state_restores_to_an_empty_iterator(token_dataset):
  config = make_config(dataset_path=str(token_dataset))
  it = input_pipeline.create_iterator(config, "validation")
  n = len(list(it))
  resumed = input_pipeline.create_iterator(config, "validation")
  resumed.set_state(it.get_state())
  assert list(resumed) == [] and resumed.get_state()["batches_consumed"] == n


# --- Synthetic and TFDS ---

def test_synthetic_is_deterministic_learnable_and_sharded():
  config = make_config(dataset_type="synthetic", vocab_size=100)
  a = take(input_pipeline.create_iterator(config, "train"), 5)
  assert_batches_equal(a, take(input_pipeline.create_iterator(config, "train"), 5))
  other = take(input_pipeline.create_iterator(make_config(dataset_type="synthetic", vocab_size=100,
                                                          data_shuffle_seed=3), "train"), 5)
  assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, other))
  for b in a:
    assert b["inputs"].max() < 100 and b["inputs_segmentation"].all()
    # Inside a document the step between tokens is constant: the structure a model can learn.
    body = (b["targets_segmentation"] > 0) & (b["inputs"] > 3) & (b["targets"] > 3)
    steps = (b["targets"] - b["inputs"]) % 96
    for r in range(len(steps)):
      for s in np.unique(b["inputs_segmentation"][r][body[r]]):
        assert len(np.unique(steps[r][body[r] & (b["inputs_segmentation"][r] == s)])) == 1
  with pytest.raises(ConfigError, match="synthetic"):
    input_pipeline.get_tokenizer(config)
  assert input_pipeline.resolve_dataset(config) == ("", "")
  one = make_config(dataset_type="synthetic", vocab_size=100, packing=False, max_target_length=256,
                    add_bos=False, add_eos=False)
  whole = docs_of_rows(list(input_pipeline.create_iterator(one, "validation")))
  parts = [docs_of_rows(list(input_pipeline.create_iterator(one, "validation", process_index=p, process_count=2)))
           for p in range(2)]
  assert sorted(parts[0] + parts[1]) == sorted(whole)  # as multisets: disjoint, and all of them


def _build_tiny_tfds(data_dir):
  """A TFDS dataset built on disk by its own builder, as a user would have it in their data_dir."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyMaxtextText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": TEXTS[i % len(TEXTS)]}

  TinyMaxtextText(data_dir=str(data_dir)).download_and_prepare()
  return "tiny_maxtext_text"


def test_tfds_reads_a_prepared_dataset_offline(tokenizer_path, tmp_path):
  name = _build_tiny_tfds(tmp_path / "tfds")
  tfds_keys = dict(dataset_type="tfds", tfds_name=name, tfds_data_dir=str(tmp_path / "tfds"),
                   tokenizer_path=str(tokenizer_path), num_epochs=1)
  for shuffle in ("global", "window"):
    config = make_config(data_shuffle=shuffle, **tfds_keys)
    batches = list(input_pipeline.create_iterator(config, "train"))
    assert batches and all(b["inputs"].max() < Tokenizer(tokenizer_path).vocab_size for b in batches)
    assert sum(int((b["inputs"] == 2).sum()) for b in batches) == 12  # one BOS per example
    ev = input_pipeline.create_iterator(config, "test")
    assert len(list(ev)) == ev.count_batches() >= 1
  with pytest.raises(ConfigError, match="tfds_text_key"):
    input_pipeline.create_iterator(make_config(**{**tfds_keys, "tfds_text_key": "nope"}), "train")
  with pytest.raises(ConfigError, match=r"no such split; splits: test, train"):
    input_pipeline.create_iterator(make_config(**tfds_keys), "validation")
  with pytest.raises(ConfigError, match="tokenizer_path"):
    input_pipeline.get_tokenizer(make_config(dataset_type="tfds", tfds_name=name))


def test_a_tfds_dataset_that_is_not_there_is_one_line_and_downloads_nothing(tmp_path):
  """Before: a 69-line traceback (No module named 'importlib_resources') from TFDS's lm1b builder code."""
  result = subprocess.run(
      [sys.executable, "MaxText/train.py", BASE_CONFIG, "run_name=t", f"base_output_directory={tmp_path}",
       "dataset_type=tfds", "tfds_name=lm1b", f"tfds_data_dir={tmp_path / 'none'}", "tokenizer_type=byte",
       "vocab_size=260", "steps=1"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
      timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("M_")})
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "tfds_name='lm1b' is not prepared in tfds_data_dir=" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


# --- Errors ---

def test_config_errors_name_the_culprit(token_dataset, tmp_path, tokenizer_path):
  config = make_config(dataset_path=str(token_dataset))
  with pytest.raises(ConfigError, match=r"split 'test'.*dataset_path=.*tokens"):
    input_pipeline.create_iterator(config, "test")
  write_split(tmp_path, "train", [[5, 6, 7]], 1)
  (tmp_path / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
  size = Tokenizer(tokenizer_path).vocab_size
  small = make_config(dataset_path=str(tmp_path), vocab_size=size - 1)
  with pytest.raises(ConfigError, match=rf"has {size} tokens but vocab_size={size - 1}"):
    input_pipeline.create_iterator(small, "train")
  with pytest.raises(ConfigError, match=rf"{size}.*{size - 1}"):
    input_pipeline.get_tokenizer(small)
  with pytest.raises(ConfigError, match="no tokenizer"):
    input_pipeline.get_tokenizer(make_config(dataset_path=str(token_dataset)))
  with pytest.raises(input_pipeline.DataError,
                     match=r"validation-00000-of-00001.tfrecord holds token id \d+ but vocab_size=50"):
    input_pipeline.create_iterator(make_config(dataset_path=str(token_dataset), vocab_size=50), "validation")
  it = input_pipeline.create_iterator(make_config(dataset_path=str(token_dataset), vocab_size=50,
                                                  data_shuffle="window"), "validation")
  with pytest.raises(input_pipeline.DataError, match="vocab_size=50"):
    list(it)  # the streaming path finds it batch by batch


def test_corrupt_record_names_the_file(tmp_path):
  write_split(tmp_path, "train", token_docs(40, seed=4), 2)
  bad = tmp_path / "train-00001-of-00002.tfrecord"
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0xFF
  bad.write_bytes(bytes(data))
  # Indexing for the global shuffle reads every record before the first batch.
  with pytest.raises(input_pipeline.DataError, match="train-00001-of-00002.tfrecord: corrupt") as e:
    input_pipeline.create_iterator(make_config(dataset_path=str(tmp_path)), "train")
  assert "\n" not in str(e.value) and "function_node" not in str(e.value)
  it = input_pipeline.create_iterator(make_config(dataset_path=str(tmp_path), data_shuffle="window"), "train")
  with pytest.raises(input_pipeline.DataError, match="train-00001-of-00002") as e:
    take(it, 50)
  assert "\n" not in str(e.value)
  (tmp_path / "train-00000-of-00002.tfrecord").write_bytes(b"not a tfrecord at all")
  with pytest.raises(input_pipeline.DataError, match="train-00000-of-00002"):
    input_pipeline.create_iterator(make_config(dataset_path=str(tmp_path)), "train")


# --- Default corpus ---

def test_default_corpus_is_prepared_once_and_reused(tmp_path, monkeypatch):
  source = tmp_path / "src"
  for i, text in enumerate(TEXTS):
    (source / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
    (source / f"pkg{i % 3}" / f"m{i}.py").write_text(text * (1 + i % 4))
  (source / "site-packages").mkdir()
  (source / "site-packages" / "skip.py").write_text("SKIPPED = 1\n")
  cache = tmp_path / "cache"
  folder = default_corpus.ensure_default_corpus(str(cache), vocab_size=VOCAB, source_dir=source, progress=False)
  assert folder.parent == cache and f"v{VOCAB}" in folder.name and f"f{default_corpus.FORMAT_VERSION}" in folder.name
  info = json.loads((folder / "dataset_info.json").read_text())
  assert info["splits"]["train"]["documents"] + info["splits"]["validation"]["documents"] + \
      info["splits"]["test"]["documents"] == len(TEXTS)
  assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [folder.name]

  def fail(*args, **kwargs):
    raise AssertionError("prepared twice")

  monkeypatch.setattr(prepare_data, "prepare", fail)
  assert default_corpus.ensure_default_corpus(str(cache), vocab_size=VOCAB, source_dir=source) == folder

  # resolve_dataset() goes through the same function; point it at the prepared folder.
  monkeypatch.setattr(default_corpus, "ensure_default_corpus", lambda **kw: folder)
  config = make_config(dataset_cache_dir=str(cache))
  assert input_pipeline.resolve_dataset(config) == (str(folder), str(folder / "tokenizer.model"))
  assert input_pipeline.get_tokenizer(config).vocab_size <= VOCAB
  assert next(input_pipeline.create_iterator(config, "train"))["inputs"].shape == (4, 16)


def test_default_corpus_dir_name_encodes_python_vocab_and_format():
  name = default_corpus.corpus_dir("/x", 8192).name
  assert platform.python_version() in name and "v8192" in name and "f1" in name
  assert default_corpus.stdlib_dir().is_dir()
  assert os.path.isfile(default_corpus.stdlib_dir() / "os.py")


def test_default_corpus_is_safe_when_processes_start_together(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  for i, text in enumerate(TEXTS):
    (source / f"m{i}.py").write_text(text)
  code = ("import sys; from MaxText.input_pipeline import default_corpus; "
          "print(default_corpus.ensure_default_corpus(sys.argv[1], 512, source_dir=sys.argv[2], progress=False))")
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache"), str(source)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
  assert [r[2] for r in results] == [0, 0], results
  assert results[0][0] == results[1][0]
  assert sum(r[1].count("preparing the default corpus") for r in results) == 1
  folder = Path(results[0][0].strip())
  assert (folder / "dataset_info.json").is_file() and len(list(folder.glob("train-*.tfrecord"))) >= 1


def row_keys(batches):
  return [tuple(b["inputs"][r]) + tuple(b["targets"][r]) for b in batches for r in range(len(b["inputs"]))
          if b["inputs_segmentation"][r].any()]


def test_the_row_shuffle_mixes_documents_and_is_a_seeded_permutation(tmp_path):
  # Documents far longer than a batch: in stream order a batch holds one document.
  rng = np.random.default_rng(3)
  write_split(tmp_path, "train", [rng.integers(4, VOCAB, int(rng.integers(400, 600))).tolist() for _ in range(6)], 1)
  plain = make_config(dataset_path=str(tmp_path), num_epochs=1, packed_shuffle_buffer_size=0, add_bos=False,
                      data_shuffle="window")
  mixed = make_config(dataset_path=str(tmp_path), num_epochs=1, packed_shuffle_buffer_size=64, add_bos=False,
                      data_shuffle="window")
  ordered = list(input_pipeline.create_iterator(plain, "train"))
  shuffled = list(input_pipeline.create_iterator(mixed, "train"))
  assert sorted(row_keys(shuffled)) == sorted(row_keys(ordered)), "every row exactly once"
  assert row_keys(shuffled) != row_keys(ordered)
  again = list(input_pipeline.create_iterator(mixed, "train"))
  assert row_keys(again) == row_keys(shuffled), "deterministic for a seed"
  other = list(input_pipeline.create_iterator(
      make_config(dataset_path=str(tmp_path), num_epochs=1, packed_shuffle_buffer_size=64, add_bos=False,
                  data_shuffle_seed=5, data_shuffle="window"), "train"))
  assert row_keys(other) != row_keys(shuffled)

  # Rows of one document continue each other: row r+1 starts with row r's last target.
  contiguous = sum(int(np.array_equal(b["inputs"][1:, 0], b["targets"][:-1, -1])) for b in ordered[:10])
  assert contiguous >= 8, "without the row shuffle, rows of a batch continue one another"
  contiguous = sum(int(np.array_equal(b["inputs"][1:, 0], b["targets"][:-1, -1])) for b in shuffled[:10])
  assert contiguous <= 1, "with it, they do not"
