"""The input pipeline: config -> iterator of fixed-shape numpy batches for this process.

    it = create_iterator(config, config.train_split, process_index=i, process_count=n)
    batch = next(it)  # inputs, targets, inputs_position, inputs_segmentation, targets_segmentation: [B, L] int32
    state = it.get_state()  # JSON; it.set_state(state) on a fresh iterator continues with the next batch

Two paths share the packing code (packing.py):
- The global order (`data_shuffle: global`, any source that can be indexed): the split is written once
  to a token store (token_store.py), cut into rows (rows.py), and read as global batches of which each
  process takes its slice (global_order.py). The training split repeats (`num_epochs`, -1 = forever),
  every epoch in a new seeded permutation of all its rows; other splits are one pass in row order whose
  last batch is padded with empty rows. The position is global: resume works on any process count.
- The stream (`data_shuffle: window`, generated data, `hf_streaming`): each process reads its own
  documents through `Source.epoch_chunks` (shuffled per epoch in a window of `shuffle_buffer_size`
  documents), packs them and shuffles the rows in a window of `packed_shuffle_buffer_size` (DataIterator
  below); its position is per process, so resume needs the same process count.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np

from MaxText.errors import ConfigError, DataError
from MaxText.input_pipeline import packing, token_store
from MaxText.input_pipeline.global_order import GlobalIterator
from MaxText.input_pipeline.rows import Rows
from MaxText.input_pipeline.sources import SOURCES, Location, Source
from MaxText.input_pipeline.tokenizer import BOS_ID, EOS_ID, TOKENIZERS, ByteTokenizer, Tokenizer

__all__ = [
  "SOURCES",
  "TOKENIZERS",
  "ByteTokenizer",
  "DataError",
  "DataIterator",
  "GlobalIterator",
  "Location",
  "Source",
  "Tokenizer",
  "create_iterator",
  "get_tokenizer",
  "resolve_dataset",
  "token_byte_lengths",
]

_STATE_VERSION = 1


class DataIterator:
  """Batches of one split on one process, read as a stream; see the module docstring.

  The state records the stream position of the next row, so `set_state` rebuilds the source there
  (skipping documents inside tf.data, not in Python) instead of replaying every batch. A state taken
  on another process or with another batch shape falls back to replaying `batches_consumed` batches.
  """

  def __init__(self, source, *, name: str, rows: int, length: int, packing_on: bool, epochs: int | None,
               bos_id: int | None, eos_id: int | None, vocab_size: int, shard: tuple[int, int] = (0, 1),
               row_shuffle: tuple[int, int] | None = None):
    self._source, self._name = source, name
    self._rows, self._length, self._packing = rows, length, packing_on
    self._epochs = epochs  # None = repeat forever
    self._bos_id, self._eos_id, self._vocab_size = bos_id, eos_id, vocab_size
    self._row_shuffle = row_shuffle  # (buffer rows, seed) or None
    self._fingerprint = (f"{name}|process={shard[0]}/{shard[1]}|{rows}x{length}|packing={packing_on}"
                         f"|bos={bos_id}|eos={eos_id}|row_shuffle={row_shuffle}")
    self._batch_count: int | None = None
    self._restart((0, 0, 0), consumed=0)

  @property
  def finite(self) -> bool:
    return self._epochs is not None

  def _restart(self, start: tuple[int, int, int] | None, consumed: int):
    self._batcher = None
    self._consumed = consumed
    if start is None:
      return  # the state of an exhausted stream
    batcher = packing.Packer if self._packing else packing.RowPerDocument
    self._batcher = batcher(self._chunks(*start), self._rows, self._length, start)
    if self._row_shuffle is not None:
      self._batcher = packing.RowShuffler(self._batcher, self._rows, *self._row_shuffle)

  def _chunks(self, epoch: int, doc: int, offset: int) -> Iterator[packing.Chunk]:
    while self._epochs is None or epoch < self._epochs:
      index, tokens_seen = doc, 0
      for tokens_T, lengths_D in self._source.epoch_chunks(epoch, doc):
        tokens_T, lengths_D = packing.add_special_tokens(tokens_T, lengths_D, self._bos_id, self._eos_id)
        first_offset = offset
        if offset:
          tokens_T, lengths_D = tokens_T[offset:], lengths_D.copy()
          lengths_D[0] -= offset
          offset = 0
        tokens_seen += len(tokens_T)
        yield packing.Chunk(tokens_T, lengths_D, epoch, index, first_offset)
        index += len(lengths_D)
      if self._epochs is None and doc == 0 and tokens_seen == 0:
        raise DataError(f"split {self._name!r} has no documents for this process, so it cannot repeat")
      epoch, doc = epoch + 1, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._batcher.next_batch() if self._batcher is not None else None
    if batch is None:
      self._batcher = None
      raise StopIteration
    self._consumed += 1
    top = int(batch["inputs"].max(initial=0)), int(batch["targets"].max(initial=0))
    if max(top) >= self._vocab_size:
      raise DataError(f"split {self._name!r} holds token id {max(top)} but vocab_size={self._vocab_size}; "
                      f"the data was tokenized with a larger vocabulary")
    low = min(int(batch["inputs"].min(initial=0)), int(batch["targets"].min(initial=0)))
    if low < 0:
      raise DataError(f"split {self._name!r} holds the negative token id {low}")
    return batch

  def get_state(self) -> dict:
    position = self._batcher.position() if self._batcher is not None else None
    if isinstance(position, tuple):
      position = list(position)
    return {"version": _STATE_VERSION, "batches_consumed": self._consumed, "fingerprint": self._fingerprint,
            "position": position}

  def set_state(self, state: dict):
    """Continue as an uninterrupted iterator would after `state["batches_consumed"]` batches."""
    consumed = state.get("batches_consumed") if isinstance(state, dict) else None
    if not isinstance(consumed, int) or consumed < 0:
      raise ValueError(f"data iterator state needs a non-negative 'batches_consumed', got {state!r}")
    position = state.get("position", ())
    # A row-shuffled stream records "replay": its buffer is not a stream position, so it is rebuilt.
    exact = position is None or (isinstance(position, (list, tuple)) and len(position) == 3)
    if exact and state.get("version") == _STATE_VERSION and state.get("fingerprint") == self._fingerprint:
      self._restart(tuple(int(x) for x in position) if position is not None else None, consumed)
      return
    self._restart((0, 0, 0), consumed=0)
    for _ in range(consumed):
      if self._batcher.next_batch(build=False) is None:
        self._batcher = None
        break
    self._consumed = consumed

  def count_batches(self) -> int:
    """How many batches the whole (finite) stream yields on this process, counted without batching."""
    if not self.finite:
      raise TypeError(f"split {self._name!r} repeats forever; it has no batch count")
    if self._batch_count is None:
      extra = (self._bos_id is not None) + (self._eos_id is not None)
      tokens = rows = 0
      for epoch in range(self._epochs):
        for _, lengths_D in self._source.epoch_chunks(epoch, 0):
          tokens += int(lengths_D.sum()) + extra * len(lengths_D)
          rows += int(np.count_nonzero(lengths_D + extra >= 2))
      if self._packing:
        rows = -(-(tokens - 1) // self._length) if tokens >= 2 else 0
      self._batch_count = -(-rows // self._rows)
    return self._batch_count


def resolve_dataset(config) -> tuple[str, str]:
  """(dataset, tokenizer path) the config's data comes from, preparing the default corpus if needed.

  The tokenizer path is "" when there is none (generated data; pre-tokenized files without a model).
  """
  location = SOURCES.get(config.dataset_type).locate(config)
  return location.dataset, location.tokenizer


@functools.lru_cache(maxsize=8)
def _load_tokenizer(tokenizer_type: str, path: str):
  return TOKENIZERS.get(tokenizer_type)(path)


def _tokenizer(config, location: Location):
  """The tokenizer of `tokenizer_type` at the location's path, checked against vocab_size; None when the
  type needs a file and there is none."""
  tokenizer = _load_tokenizer(config.tokenizer_type, location.tokenizer)
  if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
    raise ConfigError(f"tokenizer_type={config.tokenizer_type} ({tokenizer.path}) has {tokenizer.vocab_size} tokens "
                      f"but vocab_size={config.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
  return tokenizer


def get_tokenizer(config):
  """The tokenizer of the config's data, checked against vocab_size. Generated data (dataset_type=synthetic)
  has none: this raises a ConfigError that says so. A tokenizer_path given is the tokenizer, and no data is
  located for it (a converted checkpoint's config names its tokenizer and decodes without any data)."""
  source = SOURCES.get(config.dataset_type)
  if source.generated:
    raise ConfigError(f"dataset_type={config.dataset_type} has no tokenizer (its documents are generated token ids)")
  location = Location(config.dataset_path, config.tokenizer_path) if config.tokenizer_path else source.locate(config)
  tokenizer = _tokenizer(config, location)
  if tokenizer is None:
    raise ConfigError(f"no tokenizer for dataset_type={config.dataset_type} data {location.dataset!r}: "
                      f"tokenizer_type={config.tokenizer_type} needs a file; set tokenizer_path (or put "
                      f"tokenizer.model next to the data)")
  return tokenizer


def token_byte_lengths(config) -> np.ndarray | None:
  """[vocab_size] UTF-8 bytes each token id stands for, for bits per byte; None when the data has no tokenizer."""
  source = SOURCES.get(config.dataset_type)
  if source.generated:
    return None
  tokenizer = _tokenizer(config, source.locate(config))
  if tokenizer is None:
    return None  # pre-tokenized data without its tokenizer model
  lengths = tokenizer.byte_lengths()
  return np.pad(lengths, (0, config.vocab_size - len(lengths)))


def store_root(config) -> str:
  """Where token stores are indexed: <dataset_cache_dir>/token_stores."""
  return os.path.join(os.path.expanduser(config.dataset_cache_dir or token_store.DEFAULT_CACHE_DIR), "token_stores")


def create_iterator(config, split: str, *, process_index: int = 0, process_count: int = 1):
  """The batches of `split` seen by process `process_index` of `process_count` (see the module docstring)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
  train = split == config.train_split
  total, key = ((config.global_batch_size_to_train_on, "global_batch_size_to_train_on") if train
                else (config.eval_batch_size, "eval_batch_size"))
  if total % process_count:
    raise ConfigError(f"{key}={total} sequences do not split evenly over {process_count} processes")
  epochs = (None if config.num_epochs == -1 else config.num_epochs) if train else 1
  source_class = SOURCES.get(config.dataset_type)
  location = source_class.locate(config)
  tokenizer = None if source_class.generated else _tokenizer(config, location)
  bos_id = (tokenizer.bos_id if tokenizer else BOS_ID) if config.add_bos else None
  eos_id = (tokenizer.eos_id if tokenizer else EOS_ID) if config.add_eos else None
  if config.data_shuffle == "global" and source_class.indexed(config):
    # Every process indexes (or finds) the whole split in file order; the order is applied to its rows.
    source = source_class.open(config, split, location=location, train=False, tokenizer=tokenizer,
                               process_index=0, process_count=1)
    store = token_store.ensure(store_root(config), source.fingerprint(), source.labelled_chunks,
                               f"split {split!r} of {source.description}", progress=process_index == 0)
    store.check_vocab(config.vocab_size, split)
    rows = Rows(store, config.max_target_length, packing=config.packing, bos_id=bos_id, eos_id=eos_id,
                documents=source.document_range(store.num_documents))
    seed = config.data_shuffle_seed if train else None
    return GlobalIterator(
        rows, name=split, global_rows=total, process_index=process_index, process_count=process_count,
        epochs=epochs, shuffle_seed=seed,
        fingerprint=(f"{store.key}|{source.document_range(store.num_documents)}|{rows.L}|packing={rows.packing}"
                     f"|bos={bos_id}|eos={eos_id}|seed={seed}"))
  source = source_class.open(config, split, location=location, train=train, tokenizer=tokenizer,
                             process_index=process_index, process_count=process_count)
  return DataIterator(
      source, name=split, rows=total // process_count, length=config.max_target_length, packing_on=config.packing,
      epochs=epochs, bos_id=bos_id, eos_id=eos_id, vocab_size=config.vocab_size, shard=(process_index, process_count),
      row_shuffle=((config.packed_shuffle_buffer_size, config.data_shuffle_seed)
                   if train and config.packed_shuffle_buffer_size > 0 else None))
