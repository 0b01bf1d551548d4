"""TensorFlow Datasets as a document source, offline: a dataset already built (or copied) into a data_dir.

The dataset is read from its files (`builder_from_files`), without its builder code and without any
download; a name that is not there is a one-line error saying where it was looked for. The feature
`tfds_text_key` holds text (tokenized on the fly) or token ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from MaxText.errors import ConfigError, DataError
from MaxText.input_pipeline import tfrecord_files
from MaxText.input_pipeline.sources import SOURCES, Location, Source
from MaxText.input_pipeline.token_store import file_fingerprint

_CHUNK_DOCS = 128


def _reason(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def load_builder(name: str, data_dir: str):
  """The read-only builder of a prepared dataset `name` (`name/config:version` also works) in data_dir."""
  tfrecord_files.import_tf()
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 (needs TensorFlow, 4 s to import: only for dataset_type=tfds)
    from tensorflow_datasets.core import read_only_builder  # noqa: PLC0415 (the same)
  except ImportError as e:
    raise ConfigError(f"dataset_type=tfds needs tensorflow-datasets, which does not import ({_reason(e)})") from None
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  try:
    return read_only_builder.builder_from_files(name, data_dir=where)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"tfds_name={name!r} is not prepared in tfds_data_dir={where!r} (nothing is downloaded at run "
                      f"time: build or copy it there first, e.g. `tfds build {name} --data_dir {where}`)") from None
  except Exception as e:  # noqa: BLE001 (TFDS raises many kinds for damaged metadata)
    raise ConfigError(f"cannot read tfds_name={name!r} in tfds_data_dir={where!r}: {_reason(e)}") from None


@SOURCES.register("tfds")
class TfdsSource(Source):
  """The documents of one TFDS split on one process (every n-th example on process i of n)."""

  @classmethod
  def locate(cls, config) -> Location:
    return Location(config.tfds_name, config.tokenizer_path)

  @classmethod
  def open(cls, config, split: str, *, location: Location, train: bool, tokenizer, process_index: int,
           process_count: int) -> TfdsSource:
    return cls(location.dataset, split, data_dir=config.tfds_data_dir, text_key=config.tfds_text_key,
               tokenizer=tokenizer, process_index=process_index, process_count=process_count, shuffle=train,
               seed=config.data_shuffle_seed, shuffle_buffer_size=config.shuffle_buffer_size)

  def __init__(self, name: str, split: str, *, data_dir: str, text_key: str, tokenizer,
               process_index: int = 0, process_count: int = 1, shuffle: bool = False, seed: int = 0,
               shuffle_buffer_size: int = 1024):
    if not name:
      raise ConfigError("dataset_type=tfds needs tfds_name (e.g. tfds_name=lm1b)")
    builder = load_builder(name, data_dir)
    self.where = f"tfds_name={name!r} split={split!r}"
    splits = builder.info.splits
    if split.split("[")[0] not in splits:
      raise ConfigError(f"{self.where}: the dataset has no such split; splits: {', '.join(sorted(splits))}")
    if not splits[split.split("[")[0]].num_examples:
      raise DataError(f"{self.where}: the split is empty")
    features = builder.info.features
    if text_key not in features:
      raise ConfigError(f"{self.where} has no feature tfds_text_key={text_key!r}; features: {sorted(features)}")
    self.is_text = np.dtype(features[text_key].np_dtype).kind in "OSU"
    if self.is_text and tokenizer is None:
      raise ConfigError("dataset_type=tfds needs tokenizer_path (a SentencePiece model or tokenizer.json) or "
                        "tokenizer_type=byte")
    self._ds = builder.as_dataset(split=split, shuffle_files=False)
    self._files = sorted(str(f) for f in builder.data_path.iterdir()) if builder.data_path.exists() else []
    self.name, self.split, self.text_key, self.tokenizer = name, split, text_key, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.shuffle, self.seed, self.buffer = shuffle, seed, max(1, shuffle_buffer_size)

  @property
  def description(self) -> str:
    return self.where

  def fingerprint(self) -> str:
    tok = self.tokenizer.fingerprint if self.is_text else ""
    return f"tfds|{self.name}|{self.split}|{self.text_key}|{file_fingerprint(self._files)}|{tok}"

  def _chunks(self, ds) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    tf = tfrecord_files.import_tf()
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.batch(_CHUNK_DOCS) if self.is_text else ds.ragged_batch(_CHUNK_DOCS)
    try:
      for item in ds.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator():
        if self.is_text:
          yield tfrecord_files.tokenize_texts(self.tokenizer, item)
        else:
          lengths_D = np.asarray(item.row_lengths(), np.int64) if hasattr(item, "row_lengths") else \
              np.fromiter((len(x) for x in item), np.int64)
          flat = item.flat_values if hasattr(item, "flat_values") else np.concatenate(list(item) or [[]])
          yield np.asarray(flat, np.int64), lengths_D
    except tf.errors.OpError as e:
      raise DataError(f"reading {self.where} failed: {tfrecord_files.tf_error_line(e.message)}") from None

  def labelled_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    key = self.text_key
    for tokens_T, lengths_D in self._chunks(self._ds.map(lambda example: example[key])):
      yield self.where, tokens_T, lengths_D

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    key = self.text_key
    ds = self._ds.map(lambda example: example[key]).shard(self.process_count, self.process_index)
    if self.shuffle:
      seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
      ds = ds.shuffle(self.buffer, seed=seed, reshuffle_each_iteration=False)
    if skip:
      ds = ds.skip(skip)
    for tokens_T, lengths_D in self._chunks(ds):
      yield tokens_T.astype(np.int32), lengths_D
