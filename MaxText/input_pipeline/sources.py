"""Data sources: where a split's documents come from. `dataset_type` names one registered in SOURCES.

A source is one class in one module of this package:

    @SOURCES.register("mine")
    class MySource(Source):
      @classmethod
      def open(cls, config, split, *, location, train, tokenizer, process_index, process_count):
        return cls(...)                       # the documents of `split` seen by this process
      def fingerprint(self):                  # what identifies the split's documents (files, sizes,
        ...                                   #    times, column, tokenizer): the token store's name
      def labelled_chunks(self):              # -> (where, tokens_T int32, lengths_D int64): every document
        ...                                   #    of the split in a fixed order, `where` naming its file
      def epoch_chunks(self, epoch, skip=0):  # -> (tokens_T, lengths_D) chunks, from document `skip` (of
        ...                                   #    this process) of `epoch` on: the streaming path

Everything after the documents is shared (input_pipeline/__init__.py, token_store.py, rows.py,
global_order.py, packing.py): BOS/EOS, packing into rows with segment ids, the shuffle, per-process
batches and the resumable position. With `data_shuffle: global` (the default) an indexed source is
opened once as process 0 of 1 without shuffling, its `labelled_chunks` are written to a token store,
and the rows of that store are permuted globally. A source that cannot be indexed (`indexed(config)`
false: generated or streamed data) is read through `epoch_chunks`, where it shuffles its documents per
epoch when `train` is true, deterministically from `data_shuffle_seed`, and gives process i of n a
disjoint part of the split (the parts together are the split).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from MaxText.registry import Registry


def _import_sources() -> None:
  """Every module of this package, so each registers its sources (found by listing, never by a list)."""
  for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    importlib.import_module(f"{__package__}.{module.name}")


SOURCES: Registry[type[Source]] = Registry("dataset_type", "data source", load=_import_sources)


@dataclasses.dataclass(frozen=True)
class Location:
  """What a source reads: `dataset` (files, a dataset name; "" for generated data) and the tokenizer
  file that comes with it ("" when there is none)."""

  dataset: str
  tokenizer: str


class Source:
  """The documents of one split on one process (see the module docstring)."""

  # True for a source that makes up its token ids: it has no tokenizer and no text.
  generated: bool = False

  @classmethod
  def locate(cls, config) -> Location:
    """Where this source's data and tokenizer are, for this config."""
    return Location(config.dataset_path, config.tokenizer_path)

  @classmethod
  def open(cls, config, split: str, *, location: Location, train: bool, tokenizer, process_index: int,
           process_count: int) -> Source:
    raise NotImplementedError

  @classmethod
  def indexed(cls, config) -> bool:
    """Whether this config's data is written to a token store (and shuffled globally); else it streams."""
    del config
    return not cls.generated

  def fingerprint(self) -> str:
    raise NotImplementedError

  def labelled_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    raise NotImplementedError

  def document_range(self, num_documents: int) -> tuple[int, int]:
    """The documents [first, end) of the store that are this split (all of them unless a source holds some
    out, e.g. a Hugging Face dataset without an evaluation split)."""
    return 0, num_documents

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError
