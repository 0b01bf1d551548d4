"""TensorFlow Datasets as a document source: one text feature, tokenized with SentencePiece on the fly."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from MaxText.errors import ConfigError, DataError
from MaxText.input_pipeline import tfrecord
from MaxText.input_pipeline.sources import SOURCES, Location, Source

_CHUNK_DOCS = 128


@SOURCES.register("tfds")
class TfdsSource(Source):
  """The documents of one TFDS split on one process (every n-th example on process i of n)."""

  @classmethod
  def locate(cls, config) -> Location:
    return Location(config.tfds_name, config.tokenizer_path)

  @classmethod
  def open(cls, config, split: str, *, location: Location, train: bool, tokenizer, process_index: int,
           process_count: int) -> "TfdsSource":
    if tokenizer is None:
      raise ConfigError("dataset_type=tfds needs tokenizer_path (a SentencePiece model) or tokenizer_type=byte")
    return cls(location.dataset, split, data_dir=config.tfds_data_dir, text_key=config.tfds_text_key,
               tokenizer=tokenizer, process_index=process_index, process_count=process_count, shuffle=train,
               seed=config.data_shuffle_seed, shuffle_buffer_size=config.shuffle_buffer_size)

  def __init__(self, name: str, split: str, *, data_dir: str, text_key: str, tokenizer,
               process_index: int = 0, process_count: int = 1, shuffle: bool = False, seed: int = 0,
               shuffle_buffer_size: int = 1024):
    if not name:
      raise ConfigError("dataset_type=tfds needs tfds_name (e.g. tfds_name=lm1b)")
    tfrecord.import_tf()
    import tensorflow_datasets as tfds  # noqa: PLC0415 (slow import, only for this dataset type)

    where = f"tfds_name={name!r} split={split!r}" + (f" tfds_data_dir={data_dir!r}" if data_dir else "")
    try:
      self._ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
    except tfds.core.registered.DatasetNotFoundError:
      raise ConfigError(f"TFDS has no dataset {where}") from None
    except (ValueError, KeyError, AssertionError, OSError) as e:
      raise ConfigError(f"cannot load {where}: {str(e).strip().splitlines()[0]}") from None
    features = self._ds.element_spec
    if not isinstance(features, dict) or text_key not in features:
      found = sorted(features) if isinstance(features, dict) else type(features).__name__
      raise ConfigError(f"{where} has no feature tfds_text_key={text_key!r}; features: {found}")
    self.text_key, self.tokenizer, self.where = text_key, tokenizer, where
    self.process_index, self.process_count = process_index, process_count
    self.shuffle, self.seed, self.buffer = shuffle, seed, max(1, shuffle_buffer_size)

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    tf = tfrecord.import_tf()
    key = self.text_key
    ds = self._ds.map(lambda example: example[key]).shard(self.process_count, self.process_index)
    if self.shuffle:
      seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
      ds = ds.shuffle(self.buffer, seed=seed, reshuffle_each_iteration=False)
    if skip:
      ds = ds.skip(skip)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.batch(_CHUNK_DOCS).prefetch(tf.data.AUTOTUNE).with_options(options)
    try:
      for texts_D in ds.as_numpy_iterator():
        yield tfrecord.tokenize_texts(self.tokenizer, texts_D)
    except tf.errors.OpError as e:
      raise DataError(f"reading {self.where} failed: {e.message.strip().splitlines()[0]}") from None
