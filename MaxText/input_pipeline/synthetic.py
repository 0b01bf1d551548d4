"""Generated documents a model can learn: arithmetic progressions modulo the vocabulary.

Each document has a random start, a small random step and a random length; once a model has seen two
tokens of a document it can predict the rest, so a smoke test sees the loss fall far below log(V).
Tokens avoid the ids 0-3 (pad, unk, bos, eos). Documents are a pure function of (split, seed, epoch,
global index), so any process count splits the same documents and a resumed stream regenerates them.
Synthetic data has no tokenizer (`get_tokenizer` raises a ConfigError saying so).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from MaxText.errors import ConfigError
from MaxText.input_pipeline.sources import SOURCES, Location, Source

_FIRST_ID = 4  # the ids below are pad, unk, bos, eos
_BLOCK = 256  # documents generated per numpy call
_MAX_STEP = 7
TRAIN_DOCS_PER_EPOCH = 1 << 16
EVAL_DOCS = 256


@SOURCES.register("synthetic")
class SyntheticSource(Source):
  """Synthetic documents of one split on one process (documents i::n of the split on process i of n)."""

  generated = True

  @classmethod
  def locate(cls, config) -> Location:
    return Location("", "")

  @classmethod
  def open(cls, config, split: str, *, location: Location, train: bool, tokenizer, process_index: int,
           process_count: int) -> SyntheticSource:
    del location, tokenizer
    return cls(split, vocab_size=config.vocab_size, length=config.max_target_length, train=train,
               seed=config.data_shuffle_seed, process_index=process_index, process_count=process_count)

  def __init__(self, split: str, *, vocab_size: int, length: int, train: bool, seed: int,
               process_index: int = 0, process_count: int = 1):
    if vocab_size <= _FIRST_ID + 1:
      raise ConfigError(f"synthetic data needs vocab_size > {_FIRST_ID + 1}, got {vocab_size}")
    self.modulus = vocab_size - _FIRST_ID
    self.min_length, self.max_length = max(2, length // 8), 2 * length
    self.docs_per_epoch = TRAIN_DOCS_PER_EPOCH if train else EVAL_DOCS
    # The evaluation documents must not move when the training shuffle seed changes.
    self.key = [zlib.crc32(split.encode()), seed] if train else [zlib.crc32(split.encode())]
    self.process_index, self.process_count = process_index, process_count

  def _local_in_block(self, block: int) -> np.ndarray:
    g = np.arange(block * _BLOCK, min((block + 1) * _BLOCK, self.docs_per_epoch))
    return g[g % self.process_count == self.process_index] - block * _BLOCK

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    blocks = -(-self.docs_per_epoch // _BLOCK)
    for block in range(blocks):
      local = self._local_in_block(block)
      if skip >= len(local):
        skip -= len(local)
        continue
      rng = np.random.default_rng([*self.key, epoch, block])
      lengths_G = rng.integers(self.min_length, self.max_length + 1, _BLOCK)
      starts_G = rng.integers(0, self.modulus, _BLOCK)
      steps_G = rng.integers(1, _MAX_STEP + 1, _BLOCK)
      pick = local[skip:]
      skip = 0
      lengths_D = lengths_G[pick]
      within_T = np.arange(lengths_D.sum()) - np.repeat(np.cumsum(lengths_D) - lengths_D, lengths_D)
      values_T = np.repeat(starts_G[pick], lengths_D) + np.repeat(steps_G[pick], lengths_D) * within_T
      yield (_FIRST_ID + values_T % self.modulus).astype(np.int32), lengths_D.astype(np.int64)
