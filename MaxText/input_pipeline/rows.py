"""The rows of a split held in a token store, numbered and gathered by number (for the global shuffle).

With packing, the split's documents (in store order, BOS/EOS added) are one token stream and row r is
its tokens [r * L, r * L + L + 1): the rows `packing.Packer` cuts from the same stream on one process,
so consecutive rows share a token and every next-token pair inside a document is trained exactly once.
Without packing, row r is document r truncated to L + 1 tokens (a document of fewer than 2 tokens gives
an all-padding row). Gathering any set of rows is vectorised: a binary search over the document offsets
for the row starts, then one gather of their tokens.
"""

from __future__ import annotations

import numpy as np

from MaxText.input_pipeline.packing import rows_from_windows
from MaxText.input_pipeline.token_store import TokenStore


class Rows:
  """Row numbers -> batch fields of one split (see the module docstring)."""

  def __init__(self, store: TokenStore, length: int, *, packing: bool, bos_id: int | None, eos_id: int | None,
               documents: tuple[int, int] | None = None):
    self.store, self.L, self.packing = store, length, packing
    self.bos_id, self.eos_id = bos_id, eos_id
    # The store's documents [first, end) are this split's (a held-out evaluation split is a tail).
    self._first, end = documents if documents is not None else (0, store.num_documents)
    self.num_documents = end - self._first
    self._base = int(store.offsets[self._first])
    self.num_tokens = int(store.offsets[end]) - self._base
    self.extra = (bos_id is not None) + (eos_id is not None)
    self.total = self.num_tokens + self.extra * self.num_documents  # tokens of the stream with BOS/EOS
    if packing:
      self.count = -(-(self.total - 1) // length) if self.total >= 2 else 0
    else:
      self.count = self.num_documents

  def _offset(self, d_N: np.ndarray) -> np.ndarray:
    """Where document d of the split starts in the store's token array."""
    return np.asarray(self.store.offsets[self._first + d_N], np.int64)

  def _aug_start(self, d_N: np.ndarray) -> np.ndarray:
    """Where document d starts in the split's stream with BOS/EOS added."""
    return self._offset(d_N) - self._base + self.extra * d_N

  def _document_at(self, p_N: np.ndarray) -> np.ndarray:
    """The document holding stream position p: a vectorised binary search (the offsets stay on disk)."""
    lo = np.zeros(p_N.shape, np.int64)
    hi = np.full(p_N.shape, self.num_documents, np.int64)  # invariant: aug_start(lo) <= p < aug_start(hi)
    while True:
      open_N = hi - lo > 1
      if not open_N.any():
        return lo
      mid = (lo + hi) // 2
      right = open_N & (self._aug_start(mid) <= p_N)
      lo = np.where(right, mid, lo)
      hi = np.where(open_N & ~right, mid, hi)

  def _tokens(self, d_RK: np.ndarray, within_RK: np.ndarray, aug_len_RK: np.ndarray) -> np.ndarray:
    bos = self.bos_id is not None
    raw = self._offset(d_RK) + within_RK - bos
    raw = np.clip(raw, 0, max(self.store.num_tokens - 1, 0))
    tokens_RK = (np.asarray(self.store.tokens[raw], np.int64) if self.store.num_tokens
                 else np.zeros(raw.shape, np.int64))
    if bos:
      tokens_RK = np.where(within_RK == 0, self.bos_id, tokens_RK)
    if self.eos_id is not None:
      tokens_RK = np.where(within_RK == aug_len_RK - 1, self.eos_id, tokens_RK)
    return tokens_RK

  def gather(self, row_R: np.ndarray) -> dict[str, np.ndarray]:
    """The batch fields ([R, L] int32 each) of rows `row_R`, in that order."""
    row_R = np.asarray(row_R, np.int64)
    k_K = np.arange(self.L + 1)
    if self.packing:
      p_RK = row_R[:, None] * self.L + k_K[None, :]
      valid_RK = p_RK < self.total
      first_R = self._document_at(p_RK[:, 0])
      last_R = self._document_at(np.minimum(p_RK[:, -1], self.total - 1))
      # The documents a row touches are consecutive: count the document starts up to each token.
      span = int((last_R - first_R).max(initial=0))
      if span:
        j_J = np.arange(1, span + 1)
        later_RJ = j_J[None, :] <= (last_R - first_R)[:, None]
        d_RJ = np.minimum(first_R[:, None] + j_J[None, :], self.num_documents - 1)
        rel_RJ = self._aug_start(d_RJ) - p_RK[:, :1]
        r_RJ = np.broadcast_to(np.arange(len(row_R))[:, None], rel_RJ.shape)
        marks = np.bincount((r_RJ * (self.L + 1) + rel_RJ)[later_RJ], minlength=len(row_R) * (self.L + 1))
        d_RK = first_R[:, None] + np.cumsum(marks.reshape(len(row_R), self.L + 1), axis=1)
      else:
        d_RK = np.broadcast_to(first_R[:, None], p_RK.shape)
      within_RK = p_RK - self._aug_start(d_RK)
    else:
      d_RK = np.broadcast_to(row_R[:, None], (len(row_R), self.L + 1))
      within_RK = np.broadcast_to(k_K[None, :], d_RK.shape)
    aug_len_RK = self._offset(d_RK + 1) - self._offset(d_RK) + self.extra
    if not self.packing:
      valid_RK = (within_RK < aug_len_RK) & (aug_len_RK >= 2)
    tokens_RK = self._tokens(d_RK, within_RK, aug_len_RK)
    return rows_from_windows(tokens_RK, within_RK == 0, valid_RK)
