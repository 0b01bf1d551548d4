"""The `tfrecord` data source: a split's TFRecord files (or the embedded default corpus) read as documents."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from MaxText.errors import ConfigError, DataError
from MaxText.fs import import_tf
from MaxText.input_pipeline import default_corpus
from MaxText.input_pipeline.sources import SOURCES, Location, Source
from MaxText.input_pipeline.tfrecord_files import (
  CHUNK_DOCS,
  TEXT,
  TOKENS,
  default_tokenizer_path,
  detect_feature,
  find_bad_file,
  parser,
  split_files,
  tf_error_line,
  tokenize_texts,
)
from MaxText.input_pipeline.token_store import file_fingerprint
from MaxText.input_pipeline.tokenizer import default_file as tokenizer_file


@SOURCES.register("tfrecord")
class TFRecordSource(Source):
  """The documents of one split on one process, as chunks, with a per-epoch deterministic shuffle.

  Process i of n reads files i::n when there are at least n files, else every n-th record of all files,
  so the processes see disjoint documents whose union is the split. With no dataset_path, the embedded
  default corpus is prepared (once per machine) and read.
  """

  @classmethod
  def locate(cls, config) -> Location:
    if not config.dataset_path:
      if config.tokenizer_type != "sentencepiece":
        raise ConfigError(f"tokenizer_type={config.tokenizer_type} needs dataset_path (the default corpus is "
                          f"SentencePiece-tokenized); prepare one with: python MaxText/prepare_data.py "
                          f"--tokenizer {config.tokenizer_type} --input ... --output_dir ...")
      folder = default_corpus.ensure_default_corpus(
          cache_dir=config.dataset_cache_dir, vocab_size=config.vocab_size, tokenizer_path=config.tokenizer_path)
      return Location(str(folder), str(folder / "tokenizer.model"))
    found = default_tokenizer_path(config.dataset_path, tokenizer_file(config.tokenizer_type))
    return Location(config.dataset_path, config.tokenizer_path or found or "")

  @classmethod
  def open(cls, config, split: str, *, location: Location, train: bool, tokenizer, process_index: int,
           process_count: int) -> TFRecordSource:
    return cls(split_files(location.dataset, split), tokenizer=tokenizer, process_index=process_index,
               process_count=process_count, shuffle=train, seed=config.data_shuffle_seed,
               shuffle_buffer_size=config.shuffle_buffer_size)

  def __init__(self, files: Sequence[str], *, tokenizer=None, process_index: int = 0,
               process_count: int = 1, shuffle: bool = False, seed: int = 0, shuffle_buffer_size: int = 1024):
    self.files = list(files)
    self.feature = detect_feature(self.files)
    if self.feature == TEXT and tokenizer is None:
      raise ConfigError(f"{self.files[0]} holds raw text (feature 'text') but no tokenizer was found; "
                        f"set tokenizer_path")
    self.tokenizer = tokenizer
    self.shard_by_file = len(self.files) >= process_count
    self.local_files = self.files[process_index::process_count] if self.shard_by_file else self.files
    self.process_index, self.process_count = process_index, process_count
    self.shuffle, self.seed, self.buffer = shuffle, seed, max(1, shuffle_buffer_size)

  def fingerprint(self) -> str:
    tokenizer = f"|tokenizer={self.tokenizer.fingerprint}" if self.feature == TEXT else ""
    return f"tfrecord|{self.feature}|{file_fingerprint(self.files)}{tokenizer}"

  @property
  def description(self) -> str:
    return f"{len(self.files)} TFRecord files starting with {self.files[0]}"

  def labelled_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every document, file by file in order, labelled with its file (one pipeline: parsing is traced once)."""
    tf = import_tf()
    parse = parser(self.feature)
    ds = tf.data.Dataset.from_tensor_slices(self.files).flat_map(
        lambda path: tf.data.TFRecordDataset(path).batch(CHUNK_DOCS).map(lambda docs: (path, parse(docs))))
    options = tf.data.Options()
    options.deterministic = True
    it = ds.prefetch(2).with_options(options).as_numpy_iterator()
    while True:
      try:
        path, item = next(it)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        bad = find_bad_file(self.files, self.feature)
        where = f"{bad[0]}: corrupt or unreadable TFRecord data ({bad[1]})" if bad else \
            f"reading {self.description} failed: {tf_error_line(e.message)}"
        raise DataError(where) from None
      path = path.decode("utf-8")
      yield (path, *(item if self.feature == TOKENS else tokenize_texts(self.tokenizer, item)))

  def _dataset(self, epoch: int, skip: int):
    tf = import_tf()
    files = list(self.local_files)
    if self.shuffle:
      # The same permutation on every process, so record sharding stays disjoint.
      order = np.random.default_rng([self.seed, epoch]).permutation(len(files))
      files = [files[i] for i in order]
    ds = tf.data.Dataset.from_tensor_slices(files)
    if self.shuffle and len(files) > 1:
      ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16), block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
      ds = ds.flat_map(tf.data.TFRecordDataset)
    if not self.shard_by_file:
      ds = ds.shard(self.process_count, self.process_index)
    if self.shuffle:
      seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
      ds = ds.shuffle(self.buffer, seed=seed, reshuffle_each_iteration=False)
    if skip:
      ds = ds.skip(skip)
    ds = ds.batch(CHUNK_DOCS).map(parser(self.feature), num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens_T int32, lengths_D int64) per chunk of documents, from document `skip` of the epoch on."""
    tf = import_tf()
    it = self._dataset(epoch, skip).as_numpy_iterator()
    while True:
      try:
        item = next(it)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        bad = find_bad_file(self.local_files, self.feature)
        if bad:
          raise DataError(f"{bad[0]}: corrupt or unreadable TFRecord data ({bad[1]})") from None
        raise DataError(f"reading {len(self.local_files)} TFRecord files starting with {self.local_files[0]} "
                        f"failed: {tf_error_line(e.message)}") from None
      if self.feature == TOKENS:
        yield item
      else:
        yield tokenize_texts(self.tokenizer, item)
