"""TFRecord files of tf.train.Example: finding a split's files, writing them, and reading them as documents.

A record is one document, with feature `tokens` (int64 list, no BOS/EOS) or `text` (bytes). Reading
yields chunks of documents as (tokens_T, lengths_D) numpy pairs, so Python works per chunk, never per token.
The data source that trains on them is `tfrecord.py`; `prepare.py` writes them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from MaxText import fs
from MaxText.errors import ConfigError, DataError
from MaxText.fs import import_tf

TOKENS, TEXT = "tokens", "text"
# Documents per parsed chunk: large enough to amortise Python overhead, small enough to start quickly.
CHUNK_DOCS = 128


# --- Finding files ---

def _expand(entry: str) -> list[str]:
  """The files one dataset_path entry names: a folder's files, a glob's matches, or the file itself."""
  entry = fs.expand(entry)
  if fs.isdir(entry):
    return [fs.join(entry, n) for n in fs.listdir(entry, files_only=True)]
  return [p for p in fs.glob(entry) if fs.is_remote(p) or os.path.isfile(p)]


def entries(dataset_path: str) -> list[str]:
  return [e.strip() for e in dataset_path.split(",") if e.strip()]


def dataset_files(dataset_path: str) -> list[str]:
  seen, files = set(), []
  for entry in entries(dataset_path):
    for f in _expand(entry):
      if f not in seen:
        seen.add(f)
        files.append(f)
  return files


def is_split_file(path: str, split: str) -> bool:
  # "train-00000-of-00004.tfrecord" is a train file; "trainer.tfrecord" is not.
  name = os.path.basename(path.rstrip("/"))
  return name.startswith(split) and (len(name) == len(split) or not name[len(split)].isalnum())


def split_files(dataset_path: str, split: str) -> list[str]:
  files = [f for f in dataset_files(dataset_path) if is_split_file(f, split)]
  if not files:
    raise ConfigError(f"no TFRecord files for split {split!r} under dataset_path={dataset_path!r} "
                      f"(expected file names starting with '{split}-')")
  return files


def default_tokenizer_path(dataset_path: str, file_name: str | None = "tokenizer.model") -> str | None:
  """`file_name` in the dataset's folder: the first entry if it is a folder, else its first file's folder."""
  names = entries(dataset_path)
  if not names or not file_name:
    return None
  first = fs.expand(names[0])
  folder = first if fs.isdir(first) else fs.dirname((_expand(first) or [first])[0])
  path = fs.join(folder, file_name)
  return path if fs.isfile(path) else None


# --- Writing ---

class ExampleWriter:
  """Writes one tf.train.Example per document to a TFRecord file (a context manager)."""

  def __init__(self, path: str):
    tf = import_tf()
    self._tf = tf
    self._writer = tf.io.TFRecordWriter(path)
    self.documents = 0

  def write_tokens(self, ids: Sequence[int]):
    feature = self._tf.train.Feature(int64_list=self._tf.train.Int64List(value=ids))
    self._write({TOKENS: feature})

  def write_text(self, text: str):
    feature = self._tf.train.Feature(bytes_list=self._tf.train.BytesList(value=[text.encode("utf-8")]))
    self._write({TEXT: feature})

  def _write(self, features):
    example = self._tf.train.Example(features=self._tf.train.Features(feature=features))
    self._writer.write(example.SerializeToString())
    self.documents += 1

  def close(self):
    self._writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_documents(path: str, documents: Iterable, feature: str = TOKENS) -> int:
  """Write token lists (feature="tokens") or strings (feature="text"), one record each; returns the count."""
  with ExampleWriter(path) as writer:
    for doc in documents:
      writer.write_tokens(doc) if feature == TOKENS else writer.write_text(doc)
  return writer.documents


# --- Reading ---

def read_documents(path: str) -> Iterator[list[int] | str]:
  """Every record of one file as a token list or a string, in file order (for tools and tests)."""
  tf = import_tf()
  for raw in tf.data.TFRecordDataset([path]).as_numpy_iterator():
    features = tf.train.Example.FromString(raw).features.feature
    if TOKENS in features:
      yield list(features[TOKENS].int64_list.value)
    elif TEXT in features:
      yield features[TEXT].bytes_list.value[0].decode("utf-8", "replace")
    else:
      raise DataError(f"{path}: record has neither a {TOKENS!r} nor a {TEXT!r} feature")


def detect_feature(files: Sequence[str]) -> str:
  """Which of `tokens` / `text` the first record of the first non-empty file carries."""
  tf = import_tf()
  for path in files:
    try:
      raw = next(iter(tf.data.TFRecordDataset([path]).take(1).as_numpy_iterator()), None)
    except tf.errors.OpError as e:
      raise DataError(f"{path}: unreadable TFRecord file ({tf_error_line(e.message)})") from None
    if raw is None:
      continue
    try:
      features = tf.train.Example.FromString(raw).features.feature
    except Exception:  # noqa: BLE001 (protobuf's DecodeError differs between its backends)
      raise DataError(f"{path}: record is not a tf.train.Example") from None
    for name in (TOKENS, TEXT):
      if name in features:
        return name
    raise DataError(f"{path}: records need a {TOKENS!r} (int64) or {TEXT!r} (bytes) feature, "
                    f"found {sorted(features)}")
  return TOKENS  # every file is empty: there is nothing to parse either way


def tf_error_line(message: str) -> str:
  # TF wraps the reason in its own plumbing: "{{function_node ...}} corrupted record at 681 [Op:...]".
  text = re.sub(r"\{\{function_node [^}]*\}\}|\s*\[Op:[^\]]*\].*$", "", (message or "").strip().splitlines()[0]
                if (message or "").strip() else "", flags=re.DOTALL).strip()
  return text or "unknown error"


def parser(feature: str):
  tf = import_tf()
  if feature == TOKENS:
    spec = {TOKENS: tf.io.RaggedFeature(tf.int64)}

    def parse(serialized_D):
      ragged = tf.io.parse_example(serialized_D, spec)[TOKENS]
      return tf.cast(ragged.flat_values, tf.int32), ragged.row_lengths()
  else:
    spec = {TEXT: tf.io.FixedLenFeature([], tf.string)}

    def parse(serialized_D):
      return tf.io.parse_example(serialized_D, spec)[TEXT]
  return parse


def find_bad_file(files: Sequence[str], feature: str) -> tuple[str, str] | None:
  """(file, reason) of the first file that fails to read or parse; the error of a pipeline names none."""
  tf = import_tf()
  parse = parser(feature)
  for path in files:
    try:
      for _ in tf.data.TFRecordDataset([path]).batch(1024).map(parse):
        pass
    except tf.errors.OpError as e:
      return path, tf_error_line(e.message)
  return None


def tokenize_texts(tokenizer, texts_D) -> tuple[np.ndarray, np.ndarray]:
  """Byte strings or strings -> (tokens_T int32, lengths_D int64)."""
  texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts_D]
  ids = tokenizer.encode_batch(texts)
  lengths_D = np.fromiter(map(len, ids), np.int64, count=len(ids))
  if not ids:
    return np.zeros(0, np.int32), lengths_D
  return np.concatenate([np.asarray(doc, np.int32) for doc in ids]), lengths_D
