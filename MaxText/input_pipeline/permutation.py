"""A seeded permutation of [0, n) evaluated index by index, in O(1) memory: the global shuffle's order.

    order = Permutation(n, seed=[data_shuffle_seed, epoch])
    order[np.arange(i, j)]  # the rows at shuffled places i..j-1

A balanced Feistel network over the smallest even number of bits that covers n is a bijection of
[0, 2^bits); "cycle walking" (apply it again while the value is >= n) restricts it to a bijection of
[0, n), and since 2^bits < 4n a value needs fewer than 4 walks on average. Nothing of size n is ever
held, so a corpus of 10^10 rows costs what a corpus of 10 rows costs. The round function is splitmix64's
finaliser keyed per round, which is enough to make consecutive indices land far apart (tests check the
rank correlation with file order).
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x_N: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective scramble of 64-bit words (numpy wraps uint64 products)."""
  x_N = (x_N ^ (x_N >> np.uint64(30))) * _M1
  x_N = (x_N ^ (x_N >> np.uint64(27))) * _M2
  return x_N ^ (x_N >> np.uint64(31))


class Permutation:
  """A bijection of [0, n) chosen by `seed` (an int or a list of ints); index it with an int array."""

  def __init__(self, n: int, seed):
    if n < 0:
      raise ValueError(f"cannot permute {n} items")
    self.n = int(n)
    bits = max(2, int(self.n - 1).bit_length() if self.n > 1 else 2)
    self._half = (bits + 1) // 2
    self._mask = np.uint64((1 << self._half) - 1)
    words = np.random.SeedSequence(seed).generate_state(_ROUNDS, np.uint64)
    self._keys = [np.uint64(k) for k in words]

  def _feistel(self, x_N: np.ndarray) -> np.ndarray:
    half, mask = np.uint64(self._half), self._mask
    left, right = x_N >> half, x_N & mask
    with np.errstate(over="ignore"):
      for key in self._keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << half) | right

  def __getitem__(self, index) -> np.ndarray:
    i_N = np.asarray(index, np.int64)
    if i_N.size and (i_N.min() < 0 or i_N.max() >= self.n):
      raise IndexError(f"permutation of {self.n} items indexed outside [0, {self.n})")
    x_N = self._feistel(i_N.astype(np.uint64).ravel())
    walking = x_N >= np.uint64(self.n)
    while walking.any():
      x_N[walking] = self._feistel(x_N[walking])
      walking = x_N >= np.uint64(self.n)
    return x_N.astype(np.int64).reshape(i_N.shape)
