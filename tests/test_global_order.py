"""The global order: the permutation, rows gathered by number, global batches, elastic resume."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from MaxText import input_pipeline
from MaxText.input_pipeline import packing, token_store
from MaxText.input_pipeline.global_order import GlobalIterator
from MaxText.input_pipeline.permutation import Permutation
from MaxText.input_pipeline.rows import Rows

FIELDS = packing.FIELDS


def labelled(docs, per_chunk=5):
  for i in range(0, len(docs), per_chunk):
    part = docs[i:i + per_chunk]
    yield (f"part{i}", np.array([t for d in part for t in d], np.int64), np.array([len(d) for d in part], np.int64))


def make_store(tmp_path, docs, name="s"):
  return token_store.ensure(tmp_path / "stores", name, lambda: labelled(docs), name, progress=False)


def random_docs(n, seed, max_len=30, first_id=4):
  rng = np.random.default_rng(seed)
  return [rng.integers(first_id, 500, int(rng.integers(0, max_len))).tolist() for _ in range(n)]


def packer_rows(docs, L, bos, eos, rows_per_batch=3):
  def chunks():
    for _, tokens, lengths in labelled(docs):
      t, n = packing.add_special_tokens(tokens, lengths, bos, eos)
      yield packing.Chunk(t, n, 0, 0)

  p, out = packing.Packer(chunks(), rows_per_batch, L, (0, 0, 0)), []
  while (b := p.next_batch()) is not None:
    out.append(b)
  cat = {k: np.concatenate([b[k] for b in out]) for k in FIELDS}
  real = cat["inputs_segmentation"].any(axis=1)
  return {k: v[real] for k, v in cat.items()}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_the_permutation_is_a_bijection_chosen_by_the_seed(n):
  a = Permutation(n, [0, 0])[np.arange(n)]
  assert sorted(a.tolist()) == list(range(n))
  if n >= 64:
    assert (a != Permutation(n, [0, 1])[np.arange(n)]).mean() > 0.9
    np.testing.assert_array_equal(a[5:17], Permutation(n, [0, 0])[np.arange(5, 17)])  # index by index


def test_the_permutation_is_uncorrelated_with_the_order():
  n = 20000
  order = Permutation(n, [3, 1])[np.arange(n)]
  ranks = order.astype(float)
  assert abs(np.corrcoef(np.arange(n), ranks)[0, 1]) < 0.03
  assert abs(np.corrcoef(ranks[:-1], ranks[1:])[0, 1]) < 0.03
  # Neighbours in file order land far apart: the median distance is about n / 3, as for a random order.
  assert np.median(np.abs(np.diff(order))) > n / 5


@pytest.mark.parametrize("bos,eos", [(2, 3), (None, 3), (None, None)])
def test_rows_by_number_are_the_packers_rows(tmp_path, bos, eos):
  docs = random_docs(60, seed=1) + [[7] * 90]  # empty documents, and one longer than several rows
  store = make_store(tmp_path, docs, f"{bos}{eos}")
  assert store.num_documents == 61 and store.tokens.dtype == np.uint16
  for L in (5, 8):
    rows = Rows(store, L, packing=True, bos_id=bos, eos_id=eos)
    expected = packer_rows(docs, L, bos, eos)
    assert rows.count == len(expected["inputs"])
    got = rows.gather(np.arange(rows.count))
    for k in FIELDS:
      np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{k} L={L}")
    pick = np.array([rows.count - 1, 0, 3, 3])
    for k in FIELDS:
      np.testing.assert_array_equal(rows.gather(pick)[k], expected[k][pick])


def test_a_document_range_is_the_rows_of_those_documents_alone(tmp_path):
  docs = random_docs(40, seed=2)
  store = make_store(tmp_path, docs)
  part = Rows(store, 6, packing=True, bos_id=2, eos_id=3, documents=(30, 40))
  alone = Rows(make_store(tmp_path, docs[30:], "tail"), 6, packing=True, bos_id=2, eos_id=3)
  assert part.count == alone.count
  for k in FIELDS:
    np.testing.assert_array_equal(part.gather(np.arange(part.count))[k], alone.gather(np.arange(alone.count))[k])


def test_rows_without_packing_are_documents(tmp_path):
  docs = [[10, 11, 12], [], [30, 31, 32, 33, 34, 35, 36], [40]]
  rows = Rows(make_store(tmp_path, docs), 4, packing=False, bos_id=None, eos_id=None)
  b = rows.gather(np.arange(4))
  assert b["inputs"].tolist() == [[10, 11, 12, 0], [0, 0, 0, 0], [30, 31, 32, 33], [0, 0, 0, 0]]
  assert b["targets"].tolist()[2] == [31, 32, 33, 34]
  assert b["targets_segmentation"].tolist() == [[1, 1, 0, 0], [0] * 4, [1] * 4, [0] * 4]


def make_iter(rows, G, p=0, n=1, epochs=None, seed=0):
  return GlobalIterator(rows, name="train", global_rows=G, process_index=p, process_count=n, epochs=epochs,
                        shuffle_seed=seed, fingerprint="f")


def test_every_row_once_per_epoch_and_processes_share_each_global_batch(tmp_path):
  rows = Rows(make_store(tmp_path, random_docs(80, seed=3)), 8, packing=True, bos_id=2, eos_id=3)
  G = 4
  one = make_iter(rows, G, epochs=2)
  batches = list(one)
  assert len(batches) == one.count_batches() == -(-2 * rows.count // G)
  keys = [tuple(b["inputs"][r]) + tuple(b["targets"][r]) for b in batches for r in range(G)
          if b["inputs_segmentation"][r].any()]
  everything = rows.gather(np.arange(rows.count))
  once = sorted(tuple(everything["inputs"][r]) + tuple(everything["targets"][r]) for r in range(rows.count))
  assert sorted(keys[:rows.count]) == once and sorted(keys[rows.count:]) == once
  assert keys[:rows.count] != keys[rows.count:]  # each epoch its own order
  for n in (2, 4):
    parts = [list(make_iter(rows, G, p, n, epochs=2)) for p in range(n)]
    for b, pieces in zip(batches, zip(*parts)):
      for k in FIELDS:
        np.testing.assert_array_equal(np.concatenate([x[k] for x in pieces]), b[k])


def test_a_state_saved_by_two_processes_resumes_on_one_and_on_four(tmp_path):
  rows = Rows(make_store(tmp_path, random_docs(80, seed=4)), 8, packing=True, bos_id=2, eos_id=3)
  G = 4
  reference = [next(it) for it in [make_iter(rows, G)] for _ in range(30)]
  two = [make_iter(rows, G, p, 2) for p in range(2)]
  for _ in range(11):
    for it in two:
      next(it)
  state = json.loads(json.dumps(two[0].get_state()))
  assert state == two[1].get_state()  # a global position: every process saves the same
  for n in (1, 4):
    resumed = [make_iter(rows, G, p, n) for p in range(n)]
    for it in resumed:
      it.set_state(state)
    for b in reference[11:30]:
      got = [next(it) for it in resumed]
      for k in FIELDS:
        np.testing.assert_array_equal(np.concatenate([x[k] for x in got]), b[k])
  # Another global batch size continues the same stream of rows.
  half = make_iter(rows, 2)
  half.set_state(state)
  flat = np.concatenate([b["inputs"] for b in reference[11:14]])
  np.testing.assert_array_equal(np.concatenate([next(half)["inputs"] for _ in range(6)]), flat)


def test_an_empty_split_and_a_small_vocabulary_fail_when_opened(tmp_path):
  store = make_store(tmp_path, [[], []], "empty")
  with pytest.raises(input_pipeline.DataError, match="split 'train'.*no tokens"):
    make_iter(Rows(store, 8, packing=True, bos_id=None, eos_id=None), 4)
  big = make_store(tmp_path, [[5, 6], [7, 900]], "big")
  with pytest.raises(input_pipeline.DataError, match=r"part0 holds token id 900 but vocab_size=512"):
    big.check_vocab(512, "train")
  with pytest.raises(input_pipeline.DataError, match=r"part0: document 1 holds the negative token id -4"):
    make_store(tmp_path, [[5, 6], [7, -4]], "negative")
  assert not list((tmp_path / "stores").glob(".*tmp*")), "a failed build leaves nothing behind"


def test_a_single_document_trains_as_well_with_the_default_as_with_a_whole_epoch_buffer(tmp_path, make_config):
  """The issue's nanoGPT case in small: one long text prepared with --contiguous (byte level), where a
  1024-row window reads the book almost in order. Same steps; final evaluation within noise (measured
  spread across seeds at this size: about 0.15 nats)."""
  from MaxText import train  # noqa: PLC0415
  from MaxText.input_pipeline import preparation  # noqa: PLC0415

  source = Path(argparse.__file__)  # a long text every machine has
  data = tmp_path / "data"
  preparation.prepare(str(source), str(data), tokenizer="byte", contiguous=True, validation_fraction=0.1,
                       test_fraction=0.0, progress=False)
  assert json.loads((data / "dataset_info.json").read_text())["splits"]["train"]["documents"] == 1
  common = dict(dataset_type="tfrecord", dataset_path=str(data), tokenizer_type="byte", vocab_size=260, steps=300,
                per_device_batch_size=8.0, max_target_length=32, eval_interval=300, eval_steps=-1, log_period=300)
  default = train.train_and_evaluate(make_config(**common, run_name="default"), progress=False)
  whole = train.train_and_evaluate(make_config(**common, run_name="whole", data_shuffle="window",
                                               packed_shuffle_buffer_size=20000), progress=False)
  assert default["eval_loss"] < np.log(260) - 3.0  # it learned
  assert default["eval_loss"] <= whole["eval_loss"] + 0.2, (default["eval_loss"], whole["eval_loss"])
