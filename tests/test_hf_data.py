"""Hugging Face data and tokenizers: every kind of hf_path, training end to end, the global shuffle over
them, exact and elastic resume, and each kind of bad data as a one-line error before the first step."""

import json
from pathlib import Path

import numpy as np
import pytest

from MaxText import input_pipeline, train
from MaxText.errors import ConfigError, DataError
from MaxText.input_pipeline import hf_datasets, packing
from MaxText.input_pipeline.hf_tokenizer import HFTokenizer, train_bpe

datasets = pytest.importorskip("datasets")
FIELDS = packing.FIELDS

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum and the river keeps "
         "flowing past old stone bridges under grey autumn skies").split()


def make_texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [f"{i}: " + " ".join(rng.choice(WORDS, int(rng.integers(5, 40)))) + ("\n" if i % 3 else "  \ttail\n")
          for i in range(n)]


TEXTS = make_texts(120)


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
  """The datasets library's cache (locks, prepared sets) goes to the test's folder, not ~/.cache."""
  hf_datasets.import_datasets()
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  return train_bpe(iter(TEXTS * 2), path, vocab_size=300)


def write_jsonl(folder, name, rows):
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / name, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def hf_keys(bpe, path, **more):
  return dict(dataset_type="hf", hf_path=str(path), tokenizer_type="hf", tokenizer_path=bpe.path, vocab_size=320,
              **more)


def decoded_docs(batches, tok):
  """The text of each document piece seen in the batches (packing off: one document per row)."""
  out = []
  for b in batches:
    for r in range(len(b["inputs"])):
      n = int(np.count_nonzero(b["inputs_segmentation"][r]))
      if n:
        ids = b["inputs"][r, :n].tolist() + [int(b["targets"][r, n - 1])]
        out.append(tok.decode(ids))
  return out


# --- The tokenizer ---

def test_a_bpe_trained_here_round_trips_text_and_counts_bytes(bpe):
  assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2, 3) and bpe.vocab_size == 300
  lengths = bpe.byte_lengths()
  for text in TEXTS[:10] + ["  odd   spacing\n\n\ttabs ünïcödé 12345 \U0001F600\n"]:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert min(ids) > 3 and max(ids) < bpe.vocab_size
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))  # bits per byte is exact
  assert bpe.decode([2] + bpe.encode("a b") + [3, 0]) == "a b"
  assert len(bpe.encode(TEXTS[0])) < 0.75 * len(TEXTS[0])  # it learned merges (40 of them)
  folder_tok = HFTokenizer(Path(bpe.path).parent)  # a folder holding tokenizer.json loads the same
  assert folder_tok.encode(TEXTS[1]) == bpe.encode(TEXTS[1]) and folder_tok.fingerprint == bpe.fingerprint


def test_special_tokens_come_from_the_tokenizer_config(tmp_path, bpe):
  folder = tmp_path / "t5like"
  folder.mkdir()
  (folder / "tokenizer.json").write_text(Path(bpe.path).read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                             "bos_token": None}))
  tok = HFTokenizer(folder)
  assert tok.eos_id == 3 and tok.pad_id == 0
  assert tok.bos_id == 2  # not declared: found by its usual name
  (folder / "tokenizer.json").write_text(Path(bpe.path).read_text().replace('"<s>"', '"<notbos>"'))
  assert HFTokenizer(folder).bos_id is None  # a tokenizer without one adds none


# --- Every kind of hf_path ---

def test_each_kind_of_hf_path_reads_its_documents_in_order(tmp_path, make_config, bpe):
  texts = TEXTS[:30]
  write_jsonl(tmp_path / "jsonl", "part-0.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[:20])])
  write_jsonl(tmp_path / "jsonl", "part-1.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[20:])])
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.csv  # noqa: PLC0415, F401
  import pyarrow.parquet as pq  # noqa: PLC0415

  (tmp_path / "pq").mkdir()
  pq.write_table(pa.table({"text": texts}), tmp_path / "pq" / "train.parquet")
  (tmp_path / "csv").mkdir()
  pa.csv.write_csv(pa.table({"text": texts}), tmp_path / "csv" / "train.csv")
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "saved"))
  # A dataset name in the local cache, laid out as a previous online load_dataset leaves it.
  from datasets.packaged_modules.json.json import Json  # noqa: PLC0415

  builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="tiny", config_name="en",
                 data_files={"train": [str(tmp_path / "jsonl" / f"part-{i}.jsonl") for i in range(2)]})
  builder.download_and_prepare()
  cached = tmp_path / "hf_cache" / "someone___tiny" / "en" / "0.0.0"
  cached.mkdir(parents=True)
  Path(builder.cache_dir).rename(cached / "0123abcd")

  paths = {"jsonl folder": tmp_path / "jsonl", "glob": tmp_path / "jsonl" / "part-*.jsonl",
           "list": f"{tmp_path / 'jsonl' / 'part-0.jsonl'},{tmp_path / 'jsonl' / 'part-1.jsonl'}",
           "parquet": tmp_path / "pq" / "train.parquet", "csv": tmp_path / "csv", "saved": tmp_path / "saved",
           "cached name": "someone/tiny"}
  for what, path in paths.items():
    config = make_config(**hf_keys(bpe, path, hf_name="en" if what == "cached name" else ""), packing=False,
                         max_target_length=256, per_device_batch_size=4.0, num_epochs=1, hf_eval_split="train")
    docs = decoded_docs(input_pipeline.create_iterator(config, "validation"), bpe)  # row order: file order
    assert docs == texts, what
  with pytest.raises(ConfigError, match=r"hf_path='someone/absent' is no local folder.*not a dataset in the local"):
    input_pipeline.create_iterator(make_config(**hf_keys(bpe, "someone/absent")), "train")
  with pytest.raises(ConfigError, match=r"Couldn't find cache for someone/tiny for config 'fr'"):
    input_pipeline.create_iterator(make_config(**hf_keys(bpe, "someone/tiny", hf_name="fr")), "train")


def test_c4_style_compressed_files_find_their_splits_by_name(tmp_path, make_config):
  import gzip  # noqa: PLC0415

  folder = tmp_path / "c4" / "en"
  folder.mkdir(parents=True)
  for name, texts in (("c4-train.00000-of-00002", TEXTS[:5]), ("c4-train.00001-of-00002", TEXTS[5:9]),
                      ("c4-validation.00000-of-00001", TEXTS[9:11])):
    with gzip.open(folder / f"{name}.json.gz", "wt") as f:
      for t in texts:
        f.write(json.dumps({"text": t, "url": "x"}) + "\n")
  keys = dict(dataset_type="hf", hf_path=str(tmp_path / "c4" / "en"), tokenizer_type="byte", vocab_size=260,
              packing=False, max_target_length=256, num_epochs=1, per_device_batch_size=4.0)
  byte = input_pipeline.ByteTokenizer()
  assert decoded_docs(input_pipeline.create_iterator(make_config(**keys), "validation"), byte) == TEXTS[9:11]
  assert sorted(decoded_docs(input_pipeline.create_iterator(make_config(**keys), "train"), byte)) == sorted(TEXTS[:9])


def test_text_files_are_cut_into_documents_at_blank_lines(tmp_path, make_config):
  (tmp_path / "train.txt").write_text("first para\nline two\n\nsecond para\n\n\nthird\n")
  config = make_config(dataset_type="hf", hf_path=str(tmp_path / "train.txt"), tokenizer_type="byte", vocab_size=260,
                       packing=False, max_target_length=64, num_epochs=1, hf_eval_split="train",
                       per_device_batch_size=4.0)
  docs = decoded_docs(input_pipeline.create_iterator(config, "validation"), input_pipeline.ByteTokenizer())
  assert [d.strip() for d in docs] == ["first para\nline two", "second para", "third"]


# --- Training and the global shuffle ---

@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_dataset_written_here_trains_end_to_end_with_only_the_hf_keys(tmp_path, make_config, bpe, kind):
  folder = tmp_path / "data"
  if kind == "jsonl":
    for i in range(3):
      write_jsonl(folder, f"shard-{i}.jsonl", [{"text": t} for t in TEXTS[i::3]])
  else:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    folder.mkdir()
    for i in range(2):
      pq.write_table(pa.table({"text": TEXTS[i::2]}), folder / f"shard-{i}.parquet")
  # No evaluation split in the files: 1% of the training documents is held out for it.
  config = make_config(**hf_keys(bpe, folder), steps=12, eval_interval=12, eval_steps=2, per_device_batch_size=4.0,
                       max_target_length=32)
  result = train.train_and_evaluate(config, progress=False)
  assert result["step"] == 12 and np.isfinite(result["eval_loss"]) and result["eval_bits_per_byte"] > 0
  rows = [json.loads(x) for x in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses


def test_one_epoch_holds_every_row_once_in_an_order_unrelated_to_the_files(tmp_path, make_config, bpe):
  write_jsonl(tmp_path / "d", "a.jsonl", [{"text": t} for t in TEXTS])
  keys = hf_keys(bpe, tmp_path / "d", max_target_length=16, per_device_batch_size=4.0, hf_eval_split="train")
  ordered = list(input_pipeline.create_iterator(make_config(**keys, num_epochs=1), "validation"))
  shuffled = list(input_pipeline.create_iterator(make_config(**keys, num_epochs=1), "train"))

  def row_keys(batches):
    return [tuple(b["inputs"][r]) + tuple(b["targets"][r]) for b in batches for r in range(len(b["inputs"]))
            if b["inputs_segmentation"][r].any()]

  file_order, train_order = row_keys(ordered), row_keys(shuffled)
  assert len(file_order) > 300 and sorted(train_order) == sorted(file_order)  # every row exactly once
  place = {k: i for i, k in enumerate(file_order)}
  ranks = np.array([place[k] for k in train_order], float)
  assert abs(np.corrcoef(np.arange(len(ranks)), ranks)[0, 1]) < 0.15
  assert np.median(np.abs(np.diff(ranks))) > len(ranks) / 8  # neighbours in a batch come from far apart


def test_resume_is_exact_for_the_hf_source(tmp_path, make_config, bpe):
  write_jsonl(tmp_path / "d", "a.jsonl", [{"text": t} for t in TEXTS])
  common = dict(**hf_keys(bpe, tmp_path / "d"), per_device_batch_size=4.0, max_target_length=32, log_period=1,
                learning_rate_schedule_steps=6)

  def losses(run_name, **more):
    config = make_config(**common, run_name=run_name, **more)
    train.train_and_evaluate(config, progress=False)
    rows = [json.loads(x) for x in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

  straight = losses("straight", steps=6)
  first = losses("resumed", steps=3, enable_checkpointing=True, checkpoint_period=3)
  second = losses("resumed", steps=6, enable_checkpointing=True, checkpoint_period=3)
  assert sorted(first) == [1, 2, 3] and 6 in second and 4 in second
  np.testing.assert_allclose([first[s] for s in (1, 2, 3)] + [second[s] for s in (4, 5, 6)],
                             [straight[s] for s in range(1, 7)], rtol=1e-6)


def test_two_processes_then_one_continue_the_same_global_stream(tmp_path, make_config, bpe):
  write_jsonl(tmp_path / "d", "a.jsonl", [{"text": t} for t in TEXTS])
  config = make_config(**hf_keys(bpe, tmp_path / "d"), per_device_batch_size=4.0, num_devices=2,
                       max_target_length=16)
  one = input_pipeline.create_iterator(config, "train")
  reference = [next(one) for _ in range(20)]
  two = [input_pipeline.create_iterator(config, "train", process_index=p, process_count=2) for p in range(2)]
  for step in range(7):
    parts = [next(it) for it in two]
    for k in FIELDS:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), reference[step][k])
  state = json.loads(json.dumps(two[1].get_state()))  # any process's state: they are the same
  resumed = input_pipeline.create_iterator(config, "train")
  resumed.set_state(state)
  for step in range(7, 20):
    batch = next(resumed)
    for k in FIELDS:
      np.testing.assert_array_equal(batch[k], reference[step][k])


def test_streaming_resumes_exactly_and_splits_documents_between_processes(tmp_path, make_config, bpe):
  write_jsonl(tmp_path / "d", "train.jsonl", [{"text": t} for t in TEXTS])
  write_jsonl(tmp_path / "d", "validation.jsonl", [{"text": t} for t in TEXTS[:9]])
  keys = dict(**hf_keys(bpe, tmp_path / "d"), hf_streaming=True, per_device_batch_size=4.0)
  reference = [next(it) for it in [input_pipeline.create_iterator(make_config(**keys, max_target_length=16), "train")]
               for _ in range(40)]
  it = input_pipeline.create_iterator(make_config(**keys, max_target_length=16), "train")
  for _ in range(13):
    next(it)
  resumed = input_pipeline.create_iterator(make_config(**keys, max_target_length=16), "train")
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  for b, want in zip([next(resumed) for _ in range(27)], reference[13:]):
    for k in FIELDS:
      np.testing.assert_array_equal(b[k], want[k])
  parts = [decoded_docs(input_pipeline.create_iterator(make_config(**keys, packing=False, max_target_length=256),
                                                       "validation", process_index=p, process_count=2), bpe)
           for p in range(2)]
  assert sorted(parts[0] + parts[1]) == sorted(TEXTS[:9]) and not set(parts[0]) & set(parts[1])
  with pytest.raises(ConfigError, match="a stream cannot hold documents out"):
    input_pipeline.create_iterator(make_config(**keys, eval_split="dev"), "dev")


# --- Bad data: one line, before the first step ---

def test_each_kind_of_bad_data_is_one_line_before_the_first_step(tmp_path, make_config, bpe):
  def fails(error, pattern, config, split=None):
    with pytest.raises(error, match=pattern) as e:
      if split is None:
        train.train_and_evaluate(config, progress=False)
      else:
        input_pipeline.create_iterator(config, split)
    assert "\n" not in str(e.value)
    if split is None:
      assert not (Path(config.run_dir) / "metrics.jsonl").exists(), "no step was taken"

  ids = tmp_path / "ids"
  write_jsonl(ids, "train-0.jsonl", [{"ids": [5, 6, 7]}, {"ids": [8, 9]}])
  write_jsonl(ids, "train-1.jsonl", [{"ids": [5, 6]}, {"ids": [7, -3, 9]}])
  tokens = dict(dataset_type="hf", tokenizer_type="byte", vocab_size=260, hf_data_column="ids", eval_interval=0)
  fails(DataError, r"train-1.jsonl: document 1 holds the negative token id -3", make_config(**tokens, hf_path=str(ids)))
  write_jsonl(ids, "train-1.jsonl", [{"ids": [5, 6]}, {"ids": [7, 300, 9]}])
  fails(DataError, r"train-1.jsonl holds token id 300 but vocab_size=260", make_config(**tokens, hf_path=str(ids)))
  write_jsonl(ids, "train-1.jsonl", [{"ids": [5, 6]}])
  fails(DataError, r"column hf_data_column='text'.*columns: ids",
        make_config(**{**tokens, "hf_data_column": "text"}, hf_path=str(ids)))

  empty = tmp_path / "empty"
  write_jsonl(empty, "train.jsonl", [{"text": ""}, {"text": ""}])
  fails(DataError, r"split 'train'.*has no tokens", make_config(**hf_keys(bpe, empty), add_bos=False, add_eos=False,
                                                                 eval_interval=0))
  good = tmp_path / "good"
  write_jsonl(good, "train.jsonl", [{"text": t} for t in TEXTS[:20]])
  fails(ConfigError, r"has no split 'dev'; splits: train", make_config(**hf_keys(bpe, good), hf_eval_split="dev",
                                                                       eval_interval=5))
  fails(ConfigError, r"has no split 'dev'; splits: train", make_config(**hf_keys(bpe, good), eval_split="dev",
                                                                       hf_eval_split="dev"), "dev")
  fails(ConfigError, r"tokenizer_type=hf \(.*tokenizer.json\) has 300 tokens but vocab_size=299",
        make_config(**{**hf_keys(bpe, good), "vocab_size": 299}))
  fails(ConfigError, r"tokenizer_path: .*not a Hugging Face tokenizer.json",
        make_config(**{**hf_keys(bpe, good), "tokenizer_path": str(good / "train.jsonl")}))
  fails(ConfigError, r"dataset_type=hf needs hf_path", make_config(**hf_keys(bpe, "")))
