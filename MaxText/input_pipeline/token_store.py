"""A split's documents as one flat token array on disk, memory-mapped: what makes a global shuffle possible.

    store = token_store.ensure(cache_root, source.fingerprint(), source.labelled_chunks, description)
    store.tokens[i]      # uint16 or uint32 memmap, no BOS/EOS
    store.offsets[d]     # int64 memmap [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]

A source that can list its documents in a fixed order (files, a saved Hugging Face dataset, a TFDS
split) is read once, in that order, and written here; from then on any row of the split is a few
slices away, so the pipeline can permute all rows of an epoch and give every process its part of any
global batch. The folder's name is a hash of the source's fingerprint (files, sizes and modification
times, column, tokenizer), so changed data gets a new store and an unchanged one is reused by every
later run. Writing streams chunk by chunk into a temporary folder that is renamed into place, under a
file lock, so processes that start together build it once and a crash leaves nothing half-written.

Memory: building holds one chunk of documents; reading holds the pages the OS maps in (evictable page
cache, not process memory). Disk: 2 bytes per token (4 when an id exceeds 65535) + 8 bytes per document.
Every token id is checked while writing (negative ids name their file and document); the largest id
and where it is are kept, so a vocab_size too small for the data fails when the split is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from MaxText import fs
from MaxText.errors import ConfigError, DataError

FORMAT_VERSION = 1
# Where the default corpus is prepared and token stores are indexed when dataset_cache_dir is "".
DEFAULT_CACHE_DIR = "~/.cache/maxtext_research"
META_FILE = "store.json"
_CONVERT_TOKENS = 1 << 24  # tokens per step when narrowing the token file to uint16


def store_key(fingerprint: str) -> str:
  return hashlib.sha256(f"token-store-v{FORMAT_VERSION}|{fingerprint}".encode()).hexdigest()[:20]


class TokenStore:
  """A built store, opened read-only (see the module docstring)."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = Path(folder)
    meta = json.loads((self.folder / META_FILE).read_text())
    self.meta = meta
    self.key = meta["key"]
    self.description = meta["description"]
    self.num_documents, self.num_tokens = int(meta["documents"]), int(meta["tokens"])
    self.max_id, self.max_id_where = int(meta["max_id"]), meta["max_id_where"]
    self.offsets = np.memmap(self.folder / "offsets.bin", np.int64, "r", shape=(self.num_documents + 1,))
    # A zero-length memmap is an error in numpy; an empty split has no tokens to map.
    self.tokens = (np.memmap(self.folder / "tokens.bin", meta["dtype"], "r", shape=(self.num_tokens,))
                   if self.num_tokens else np.zeros(0, meta["dtype"]))

  def document(self, d: int) -> np.ndarray:
    return np.asarray(self.tokens[int(self.offsets[d]):int(self.offsets[d + 1])])

  def check_vocab(self, vocab_size: int, split: str):
    if self.max_id >= vocab_size:
      raise DataError(f"split {split!r}: {self.max_id_where} holds token id {self.max_id} but vocab_size={vocab_size}; "
                      f"the data was tokenized with a larger vocabulary")


def _write(folder: Path, chunks: Iterator[tuple[str, np.ndarray, np.ndarray]], key: str, description: str,
           progress: bool) -> dict:
  documents = tokens = 0
  max_id, max_where = -1, ""
  last_report = time.monotonic()
  with open(folder / "tokens.bin", "wb") as tok_f, open(folder / "offsets.bin", "wb") as off_f:
    off_f.write(np.zeros(1, np.int64).tobytes())
    for where, tokens_T, lengths_D in chunks:
      tokens_T = np.asarray(tokens_T)
      lengths_D = np.asarray(lengths_D, np.int64)
      if int(lengths_D.sum()) != len(tokens_T) or (lengths_D < 0).any():
        raise DataError(f"{where}: a chunk's document lengths do not add up to its tokens")
      if len(tokens_T):
        low = int(tokens_T.min())
        if low < 0:
          first = int(np.argmax(tokens_T < 0))
          doc = int(np.searchsorted(np.cumsum(lengths_D), first, "right"))
          raise DataError(f"{where}: document {doc} holds the negative token id {low}")
        high = int(tokens_T.max())
        if high >= 1 << 32:
          raise DataError(f"{where}: token id {high} does not fit 32 bits")
        if high > max_id:
          max_id, max_where = high, where
      tok_f.write(tokens_T.astype(np.uint32).tobytes())
      off_f.write((tokens + np.cumsum(lengths_D)).astype(np.int64).tobytes())
      documents += len(lengths_D)
      tokens += len(tokens_T)
      if progress and time.monotonic() - last_report > 10:
        last_report = time.monotonic()
        print(f"  ... {documents:,} documents, {tokens:,} tokens", file=sys.stderr, flush=True)
  dtype = "uint32"
  if 0 <= max_id < 1 << 16 and tokens:  # half the disk and page cache for every vocabulary below 65536
    wide = np.memmap(folder / "tokens.bin", np.uint32, "r", shape=(tokens,))
    with open(folder / "tokens16.bin", "wb") as f:
      for start in range(0, tokens, _CONVERT_TOKENS):
        f.write(np.asarray(wide[start:start + _CONVERT_TOKENS]).astype(np.uint16).tobytes())
    del wide
    os.replace(folder / "tokens16.bin", folder / "tokens.bin")
    dtype = "uint16"
  return {"format_version": FORMAT_VERSION, "key": key, "description": description, "documents": documents,
          "tokens": tokens, "dtype": dtype, "max_id": max_id, "max_id_where": max_where}


def ensure(cache_root: str | os.PathLike, fingerprint: str,
           chunks: Callable[[], Iterator[tuple[str, np.ndarray, np.ndarray]]], description: str,
           progress: bool = True) -> TokenStore:
  """The store for `fingerprint` under `cache_root`, built from `chunks()` first if no process has yet.

  `chunks()` yields (where, tokens_T, lengths_D): every document of the split in a fixed order, `where`
  naming the file (or column, split) the chunk came from, for error messages.
  """
  key = store_key(fingerprint)
  root = Path(os.path.expanduser(str(cache_root)))
  folder = root / key
  if (folder / META_FILE).is_file():
    return TokenStore(folder)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"dataset_cache_dir: cannot create {str(root)!r}: {e.strerror}") from None
  with fs.file_lock(root / f".{key}.lock"):
    if (folder / META_FILE).is_file():
      return TokenStore(folder)  # another process built it while this one waited
    if progress:
      print(f"indexing {description} into {folder} (once; later runs reuse it)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
      meta = _write(tmp, chunks(), key, description, progress)
      (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
      os.replace(tmp, folder)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return TokenStore(folder)


def file_fingerprint(paths) -> str:
  """Paths with their sizes and modification times: changes when a file is rewritten."""
  parts = []
  for path in paths:
    try:
      st = os.stat(path)
      parts.append(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
      parts.append(str(path))  # a remote path: its name must do
  return "|".join(parts)
