"""Data sources: where a split's documents come from. `dataset_type` names one registered in SOURCES.

A source is one class in one module of this package:

    @SOURCES.register("mine")
    class MySource(Source):
      @classmethod
      def open(cls, config, split, *, location, train, tokenizer, process_index, process_count):
        return cls(...)                       # the documents of `split` seen by this process
      def epoch_chunks(self, epoch, skip=0):  # -> (tokens_T int32, lengths_D int64) chunks of documents,
        ...                                   #    from document `skip` (of this process) of `epoch` on

Everything after the documents is shared (input_pipeline/__init__.py, packing.py): BOS/EOS, packing
into rows with segment ids, the row shuffle, per-process batches and the resumable position. A source
shuffles its documents per epoch when `train` is true, deterministically from `data_shuffle_seed`, and
gives process i of n a disjoint part of the split (the parts together are the split).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Iterator

import numpy as np

from MaxText.registry import Registry


def _import_sources() -> None:
  import MaxText.input_pipeline as package  # noqa: PLC0415

  for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"{package.__name__}.{module.name}")


SOURCES: Registry[type["Source"]] = Registry("dataset_type", "data source", load=_import_sources)


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
           process_count: int) -> "Source":
    raise NotImplementedError

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError
