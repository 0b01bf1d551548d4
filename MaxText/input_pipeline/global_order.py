"""The global order: every process reads its part of the same global batches, whatever the process count.

The training stream is the split's rows (rows.py) epoch after epoch, each epoch in the order of a
seeded permutation of all its rows (permutation.py: O(1) memory); other splits are one pass in row
order. Global batch b holds stream rows [b * G, (b + 1) * G); process p of n takes its consecutive
slice of G / n of them, which is where `jax.make_array_from_process_local_data` puts them in the global
batch. The position is one number, the stream rows consumed, so a checkpoint saved by N processes
resumes on M (or with another global batch size) with no row repeated or skipped.
"""

from __future__ import annotations

import numpy as np

from MaxText.errors import DataError
from MaxText.input_pipeline.packing import empty_batch
from MaxText.input_pipeline.permutation import Permutation
from MaxText.input_pipeline.rows import Rows

STATE_VERSION = 2


class GlobalIterator:
  """Batches of one split for one process, in the global order (see the module docstring)."""

  def __init__(self, rows: Rows, *, name: str, global_rows: int, process_index: int, process_count: int,
               epochs: int | None, shuffle_seed: int | None, fingerprint: str):
    if rows.count == 0:
      raise DataError(f"split {name!r} ({rows.store.description}) has no tokens to train or evaluate on")
    self._rows, self._name = rows, name
    self._G = global_rows
    share = global_rows // process_count
    self._lo, self._hi = process_index * share, (process_index + 1) * share
    self._epochs = epochs  # None = repeat forever
    self._seed = shuffle_seed  # None = row order
    self._fingerprint = fingerprint
    self._orders: dict[int, Permutation] = {}
    self._next_row = 0  # stream rows consumed by all processes together
    self._consumed = 0

  @property
  def finite(self) -> bool:
    return self._epochs is not None

  @property
  def rows_per_epoch(self) -> int:
    return self._rows.count

  def _end(self) -> int | None:
    return None if self._epochs is None else self._epochs * self._rows.count

  def _row_ids(self, stream_N: np.ndarray) -> np.ndarray:
    """Stream positions -> row numbers: the epoch's permutation, or row order."""
    epoch_N, place_N = np.divmod(stream_N, self._rows.count)
    if self._seed is None:
      return place_N
    out_N = np.empty_like(place_N)
    for epoch in np.unique(epoch_N):  # a batch spans at most two epochs
      order = self._orders.get(int(epoch))
      if order is None:
        order = Permutation(self._rows.count, [self._seed, int(epoch)])
        self._orders = {int(epoch): order}
      here = epoch_N == epoch
      out_N[here] = order[place_N[here]]
    return out_N

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    end = self._end()
    if end is not None and self._next_row >= end:
      raise StopIteration
    stream_N = self._next_row + np.arange(self._lo, self._hi)
    if end is not None:
      stream_N = stream_N[stream_N < end]  # the last batch of a finite stream: padded with empty rows
    batch = empty_batch(self._hi - self._lo, self._rows.L)
    if len(stream_N):
      got = self._rows.gather(self._row_ids(stream_N))
      for k, v in got.items():
        batch[k][:len(stream_N)] = v
    self._next_row += self._G
    self._consumed += 1
    return batch

  def get_state(self) -> dict:
    end = self._end()
    done = end is not None and self._next_row >= end
    return {"version": STATE_VERSION, "batches_consumed": self._consumed, "fingerprint": self._fingerprint,
            "stream_rows": self._next_row, "position": None if done else "global"}

  def set_state(self, state: dict):
    """Continue the stream where `state` left it, whatever the process count or batch size that saved it.

    A state of other data (another fingerprint or an older format) continues after `batches_consumed`
    batches of this iterator's size, which is where replaying them would lead.
    """
    consumed = state.get("batches_consumed") if isinstance(state, dict) else None
    if not isinstance(consumed, int) or consumed < 0:
      raise ValueError(f"data iterator state needs a non-negative 'batches_consumed', got {state!r}")
    rows = state.get("stream_rows")
    same = state.get("version") == STATE_VERSION and state.get("fingerprint") == self._fingerprint
    if same and isinstance(rows, int) and rows >= 0:
      self._next_row = rows
    else:
      self._next_row = consumed * self._G
    self._consumed = consumed

  def count_batches(self) -> int:
    """How many batches the whole (finite) stream yields, the same on every process."""
    if not self.finite:
      raise TypeError(f"split {self._name!r} repeats forever; it has no batch count")
    return -(-self._end() // self._G)
