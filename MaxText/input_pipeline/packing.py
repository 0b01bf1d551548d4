"""Documents -> fixed-shape batches of rows, in numpy.

A document stream arrives as `Chunk`s (flat tokens plus per-document lengths). Two batchers turn it
into batches of shape [R, L]:
- `Packer` concatenates the documents into one token stream and cuts rows of L+1 tokens with a stride of
  L, so consecutive rows share one token and every next-token pair of a document is trained exactly once.
- `RowPerDocument` puts one document per row, truncated to L+1 tokens and padded.
Both report the stream position of the next row (epoch, document, offset), which is what makes a
resumed iterator continue exactly where the old one stopped without replaying the stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

FIELDS = ("inputs", "targets", "inputs_position", "inputs_segmentation", "targets_segmentation")


@dataclasses.dataclass
class Chunk:
  """Consecutive documents of one epoch. The first one may be a tail (it starts `first_offset` tokens in)."""
  tokens: np.ndarray  # [T] int32, BOS/EOS already added
  lengths: np.ndarray  # [D] int64
  epoch: int
  first_doc: int  # index of the first document within the epoch (of this process)
  first_offset: int = 0


def add_special_tokens(tokens_T: np.ndarray, lengths_D: np.ndarray, bos_id: int | None,
                       eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Prepend BOS and/or append EOS to every document (None = do not add)."""
  extra = (bos_id is not None) + (eos_id is not None)
  lengths_D = np.asarray(lengths_D, np.int64)
  if not extra:
    return np.asarray(tokens_T, np.int32), lengths_D
  new_lengths_D = lengths_D + extra
  new_starts_D = np.cumsum(new_lengths_D) - new_lengths_D
  old_starts_D = np.cumsum(lengths_D) - lengths_D
  out_T = np.empty(int(new_lengths_D.sum()), np.int32)
  if bos_id is not None:
    out_T[new_starts_D] = bos_id
  if eos_id is not None:
    out_T[new_starts_D + new_lengths_D - 1] = eos_id
  shift_D = new_starts_D + (bos_id is not None) - old_starts_D
  out_T[np.repeat(shift_D, lengths_D) + np.arange(len(tokens_T))] = tokens_T
  return out_T, new_lengths_D


def empty_batch(rows: int, length: int) -> dict[str, np.ndarray]:
  """All-padding rows: segmentation 0 everywhere, so they add nothing to a loss."""
  return {name: np.zeros((rows, length), np.int32) for name in FIELDS}


class Packer:
  """Packs the chunk stream into batches of `rows` rows of `length` tokens."""

  def __init__(self, chunks: Iterator[Chunk], rows: int, length: int, start: tuple[int, int, int]):
    self._chunks, self._R, self._L = chunks, rows, length
    self._tokens = np.zeros(0, np.int32)
    self._doc_start = np.zeros(0, bool)  # True on the first token of a document
    # Where each document (or document tail) begins in the buffer, and which document it is.
    self._doc_pos = np.zeros(0, np.int64)
    self._doc_epoch = np.zeros(0, np.int64)
    self._doc_index = np.zeros(0, np.int64)
    self._doc_offset = np.zeros(0, np.int64)
    self._cursor = 0  # buffer index of the next row's first token
    self._stream_done = False
    self._finished = False
    self._start = start

  def _append(self, chunk: Chunk):
    keep = self._cursor
    if keep >= len(self._tokens):
      self._tokens, self._doc_start = self._tokens[:0], self._doc_start[:0]
      self._doc_pos = self._doc_epoch = self._doc_index = self._doc_offset = np.zeros(0, np.int64)
    else:
      first = int(np.searchsorted(self._doc_pos, keep, "right")) - 1
      self._doc_offset = self._doc_offset[first:].copy()
      self._doc_offset[0] += keep - self._doc_pos[first]
      self._doc_pos = self._doc_pos[first:] - keep
      self._doc_pos[0] = 0
      self._doc_epoch, self._doc_index = self._doc_epoch[first:], self._doc_index[first:]
      self._tokens, self._doc_start = self._tokens[keep:], self._doc_start[keep:]
    self._cursor = 0

    base = len(self._tokens)
    nonempty_D = chunk.lengths > 0
    starts_D = (base + np.cumsum(chunk.lengths) - chunk.lengths)[nonempty_D]
    index_D = (chunk.first_doc + np.arange(len(chunk.lengths)))[nonempty_D]
    offset_D = np.zeros(len(starts_D), np.int64)
    if len(offset_D) and nonempty_D[0]:
      offset_D[0] = chunk.first_offset
    doc_start_T = np.zeros(len(chunk.tokens), bool)
    doc_start_T[starts_D[offset_D == 0] - base] = True
    self._tokens = np.concatenate([self._tokens, chunk.tokens])
    self._doc_start = np.concatenate([self._doc_start, doc_start_T])
    self._doc_pos = np.concatenate([self._doc_pos, starts_D])
    self._doc_epoch = np.concatenate([self._doc_epoch, np.full(len(starts_D), chunk.epoch, np.int64)])
    self._doc_index = np.concatenate([self._doc_index, index_D])
    self._doc_offset = np.concatenate([self._doc_offset, offset_D])

  def position(self) -> tuple[int, int, int] | None:
    """(epoch, document, offset) of the next row's first token; None once the stream is exhausted."""
    if self._finished:
      return None
    if self._cursor >= len(self._tokens):
      return self._start if not len(self._tokens) else None
    k = int(np.searchsorted(self._doc_pos, self._cursor, "right")) - 1
    return (int(self._doc_epoch[k]), int(self._doc_index[k]),
            int(self._doc_offset[k] + self._cursor - self._doc_pos[k]))

  def next_batch(self, build: bool = True) -> dict[str, np.ndarray] | None:
    """The next batch, or None at the end of a finite stream. `build=False` only advances (returns {})."""
    if self._finished:
      return None
    R, L = self._R, self._L
    need = R * L + 1
    while len(self._tokens) - self._cursor < need and not self._stream_done:
      chunk = next(self._chunks, None)
      if chunk is None:
        self._stream_done = True
      else:
        self._append(chunk)
    available = len(self._tokens) - self._cursor
    if available >= need:
      rows = R
    elif available >= 2:
      rows = -(-(available - 1) // L)  # the tail: as many rows as hold at least one next-token pair
    else:
      self._finished = True
      return None
    batch = self._build(rows) if build else {}
    self._cursor += rows * L
    if rows < R or (self._stream_done and len(self._tokens) - self._cursor < 2):
      self._finished = True
    return batch

  def _build(self, rows: int) -> dict[str, np.ndarray]:
    L, n = self._L, len(self._tokens)
    idx_RK = self._cursor + (np.arange(rows) * L)[:, None] + np.arange(L + 1)[None, :]  # K = L + 1
    valid_RK = idx_RK < n
    idx_RK = np.minimum(idx_RK, n - 1)
    tokens_RK = np.where(valid_RK, self._tokens[idx_RK], 0)
    return _pad_rows(rows_from_windows(tokens_RK, self._doc_start[idx_RK], valid_RK), self._R)


def rows_from_windows(tokens_RK: np.ndarray, start_RK: np.ndarray, valid_RK: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of L + 1 token windows -> the batch fields. `start_RK` marks the first token of a document,
  `valid_RK` the tokens that exist (the rest is padding)."""
  L = tokens_RK.shape[1] - 1
  tokens_RK = np.where(valid_RK, tokens_RK, 0)
  start_RK = start_RK & valid_RK
  # A row always opens a new piece, whether or not a document starts there.
  start_RK[:, 0] = False
  segment_RK = ((1 + np.cumsum(start_RK, axis=1)) * valid_RK).astype(np.int32)
  k_K = np.arange(L + 1)
  piece_start_RK = np.maximum.accumulate(np.where(start_RK, k_K, 0), axis=1)
  position_RK = ((k_K - piece_start_RK) * valid_RK).astype(np.int32)
  inputs_segmentation = segment_RK[:, :L]
  # A target that is the first token of the next document (or padding) teaches nothing: mask it.
  crosses_RL = start_RK[:, 1:] | ~valid_RK[:, 1:]
  return {
      "inputs": tokens_RK[:, :L].astype(np.int32),
      "targets": tokens_RK[:, 1:].astype(np.int32),
      "inputs_position": position_RK[:, :L],
      "inputs_segmentation": inputs_segmentation,
      "targets_segmentation": np.where(crosses_RL, 0, inputs_segmentation).astype(np.int32),
  }


class RowShuffler:
  """Shuffles the rows of a batcher through a buffer, so a training batch mixes many documents.

  A long document fills many consecutive rows; without this, a batch (and its neighbours) would come
  from one or two documents, and the loss would jump with the document at hand. Deterministic for a
  seed. Its stream position is not a document offset, so a resumed iterator replays the rows instead.
  """

  def __init__(self, inner, rows: int, buffer_rows: int, seed: int):
    self._inner, self._R, self._size = inner, rows, max(buffer_rows, rows)
    self._rng = np.random.default_rng([seed, 0x5EED])
    self._buffer: dict[str, np.ndarray] | None = None
    self._inner_done = False

  def position(self):
    return None if self._finished() else "replay"

  def _count(self) -> int:
    return 0 if self._buffer is None else len(self._buffer["inputs"])

  def _finished(self) -> bool:
    return self._inner_done and self._count() == 0

  def _fill(self):
    while not self._inner_done and self._count() < self._size + self._R:
      batch = self._inner.next_batch()
      if batch is None:
        self._inner_done = True
        break
      real_R = batch["inputs_segmentation"].any(axis=1)  # drop the padding rows of a tail batch
      batch = {k: v[real_R] for k, v in batch.items()}
      self._buffer = batch if self._buffer is None else {
          k: np.concatenate([self._buffer[k], batch[k]]) for k in FIELDS}

  def next_batch(self, build: bool = True) -> dict[str, np.ndarray] | None:
    self._fill()
    count = self._count()
    if count == 0:
      return None
    pick = self._rng.choice(count, size=min(self._R, count), replace=False)
    keep = np.ones(count, bool)
    keep[pick] = False
    batch = {k: v[pick] for k, v in self._buffer.items()} if build else {}
    self._buffer = {k: v[keep] for k, v in self._buffer.items()}
    return _pad_rows(batch, self._R) if build else {}


class RowPerDocument:
  """One document per row (packing off): truncated to L+1 tokens, padded with 0 and segmentation 0.

  Documents shorter than 2 tokens hold no next-token pair and are skipped.
  """

  def __init__(self, chunks: Iterator[Chunk], rows: int, length: int, start: tuple[int, int, int]):
    self._chunks, self._R, self._L = chunks, rows, length
    self._chunk: Chunk | None = None
    self._starts = np.zeros(0, np.int64)
    self._next = 0  # index into the current chunk's documents
    self._finished = False
    self._start = start

  def _next_document(self) -> np.ndarray | None:
    while True:
      if self._chunk is not None and self._next < len(self._chunk.lengths):
        j = self._next
        self._next += 1
        n = int(self._chunk.lengths[j])
        if n >= 2:
          return self._chunk.tokens[self._starts[j]:self._starts[j] + min(n, self._L + 1)]
        continue
      chunk = next(self._chunks, None)
      if chunk is None:
        return None
      self._chunk, self._next = chunk, 0
      self._starts = np.cumsum(chunk.lengths) - chunk.lengths

  def position(self) -> tuple[int, int, int] | None:
    if self._finished:
      return None
    if self._chunk is None:
      return self._start
    return (self._chunk.epoch, self._chunk.first_doc + self._next, 0)

  def next_batch(self, build: bool = True) -> dict[str, np.ndarray] | None:
    if self._finished:
      return None
    R, L = self._R, self._L
    docs = []
    while len(docs) < R:
      doc = self._next_document()
      if doc is None:
        self._finished = True
        break
      docs.append(doc)
    if not docs:
      return None
    if not build:
      return {}
    batch = empty_batch(R, L)
    for r, doc in enumerate(docs):
      n = len(doc)
      batch["inputs"][r, :min(n, L)] = doc[:L]
      batch["targets"][r, :n - 1] = doc[1:]
      batch["inputs_position"][r, :min(n, L)] = np.arange(min(n, L))
      batch["inputs_segmentation"][r, :min(n, L)] = 1
      batch["targets_segmentation"][r, :n - 1] = 1
    return batch


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  have = next(iter(batch.values())).shape[0]
  if have == rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - have, v.shape[1]), v.dtype)]) for k, v in batch.items()}
