"""Checksums of a checkpoint's arrays (recorded at save, verified at restore) and short names for damage.

The checksum of an array is two 32-bit words computed over its bytes read as 32-bit words (8- and 16-bit
elements widened to one word each, 64-bit elements split in two): their sum modulo 2**32 and their XOR.
Neither depends on the order of the words, so a sharded array's checksum combines its shards' in any
order: it is the same on every mesh, and a checkpoint written on 8 devices verifies on 1. Any one changed
word changes both; a zeroed or garbled region goes unnoticed only if its words happen to keep both the sum
and the XOR (about one chance in 2**64 for random damage). Swapping whole values is not detected; that is
not how storage fails.

Where it runs: on CPU the arrays (this process's shards) already live in host memory, and numpy reads them in place
(about 3 ms per 100 MB, far cheaper than XLA's integer reductions on CPU); elsewhere a jitted reduction runs
on each shard's own device (no collective: all-reduces offer no XOR), only the 8-byte results cross to the
host, and with several processes the per-process results are gathered and combined.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils


def leaf_name(path) -> str:
  """'params/layers/mlp/wo' for a key path, with namedtuple fields, dict keys and list indices alike."""
  def name(key):
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return "/".join(name(k) for k in path)


def _host_words(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x).reshape(-1)
  size = x.dtype.itemsize
  if size in (4, 8):
    return x.view(np.uint32)
  if size == 2:
    return x.view(np.uint16).astype(np.uint32)
  return x.view(np.uint8).astype(np.uint32)


def _host_checksum(x: jax.Array) -> tuple[int, int]:
  total, xor = np.uint32(0), np.uint32(0)
  for shard in x.addressable_shards:
    if shard.replica_id:  # a replica holds the same words as replica 0
      continue
    words = _host_words(np.asarray(shard.data))
    total = np.uint32((int(total) + int(np.add.reduce(words, dtype=np.uint32))) & 0xFFFFFFFF)
    xor = np.uint32(int(xor) ^ int(np.bitwise_xor.reduce(words, initial=np.uint32(0))))
  return int(total), int(xor)


def _device_words(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte elements gain a trailing axis of 2 words
  if size == 2:
    return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)


@jax.jit
def _shard_checksum(x: jax.Array) -> jax.Array:
  """[sum, xor] of one shard's words, on the shard's own device (no collective: XOR is not a reduction
  that cross-device all-reduces offer)."""
  words = _device_words(x)
  axes = tuple(range(words.ndim))
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), lax.reduce(words, jnp.uint32(0), lax.bitwise_xor, axes)])


def _device_checksum_pairs(leaves) -> np.ndarray:
  """[leaf, (sum, xor)] over this process's shards (replica 0 of each), combined on the host."""
  with jax.set_mesh(None):  # each shard's computation runs on its own device, not on the run's mesh
    parts = [[_shard_checksum(shard.data) for shard in x.addressable_shards if not shard.replica_id] for x in leaves]
  out = np.zeros((len(leaves), 2), np.uint32)
  for i, pairs in enumerate(jax.device_get(parts)):
    total, xor = 0, 0
    for pair in pairs:
      total = (total + int(pair[0])) & 0xFFFFFFFF
      xor ^= int(pair[1])
    out[i] = (total, xor)
  return out


def _combine_processes(pairs: np.ndarray) -> np.ndarray:
  """The per-process [leaf, (sum, xor)] of every process, combined (each process holds different shards)."""
  if jax.process_count() == 1:
    return pairs

  every = np.asarray(multihost_utils.process_allgather(pairs)).astype(np.uint64)  # [process, leaf, 2]
  total = (every[..., 0].sum(axis=0) & 0xFFFFFFFF).astype(np.uint32)
  xor = np.bitwise_xor.reduce(every[..., 1].astype(np.uint32), axis=0)
  return np.stack([total, xor], axis=-1)


def _on_host(leaves) -> bool:
  return all(d.platform == "cpu" for x in leaves for d in x.sharding.device_set)


def checksums(tree: Any) -> dict[str, list[int]]:
  """{leaf path: [sum, xor]} of every array in `tree` (jax.Arrays; waits for them to be computed). With
  several processes every process must call it (the per-process parts are gathered)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = [leaf_name(path) for path, _ in flat]
  leaves = [jnp.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf for _, leaf in flat]
  if _on_host(leaves):
    pairs = np.asarray([_host_checksum(x) for x in leaves], np.uint32).reshape(len(leaves), 2)
  else:
    pairs = _device_checksum_pairs(leaves)
  values = [tuple(int(v) for v in pair) for pair in _combine_processes(pairs)]
  return {name: [total, xor] for name, (total, xor) in zip(names, values)}


def mismatches(recorded: dict, tree: Any, prefix: str = "") -> list[str]:
  """Paths of `tree` (those under `prefix` if given) whose checksum differs from the recorded one.
  Arrays the record lacks (a checkpoint written before checksums) are not compared."""
  computed = checksums(tree)
  return [name for name, value in computed.items()
          if name in recorded and list(recorded[name]) != value and (not prefix or name.startswith(prefix))]


_OS_ERROR = re.compile(r"OS error \d+: ([^\]\"]+)|: ([^:\[\]]+?) \[os_error_code=")
_TS_READ = re.compile(r'Error (?:reading|opening) "([^"]+)".*?: (.+?)(?:; at |\[tensorstore_spec|$)')


def describe(error: BaseException, limit: int = 200) -> str:
  """One line for what a restore library raised: the innermost cause, without TensorStore's JSON specs."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in reversed(chain):  # the OS's own words, when an OS call failed: "No space left on device"
    if isinstance(e, OSError) and e.strerror:
      return _cut(f"{e.strerror}: {e.filename}" if e.filename else e.strerror, limit)
    match = _OS_ERROR.search(" ".join(str(e).split()))
    if match:
      return _cut((match.group(1) or match.group(2)).strip(), limit)
  for e in reversed(chain):  # the innermost error says what is wrong; outer ones say where Orbax was
    text = " ".join(str(e).split())
    match = _TS_READ.search(text)
    if match:
      return _cut(f"{match.group(1)}: {match.group(2).strip().rstrip('.')}", limit)
  for e in reversed(chain):
    text = " ".join(str(e).split())
    if text:
      return _cut(text.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0], limit)
  return type(chain[0]).__name__ if chain else "unknown error"


def _cut(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."
