"""Hugging Face datasets as a document source (`dataset_type: hf`), offline.

`hf_path` is, in this order of checks:
- a folder written by `save_to_disk` (a Dataset or a DatasetDict): read memory-mapped, as saved;
- local data files: a folder (searched recursively), a glob or a comma-separated list of .json/.jsonl,
  .parquet, .csv/.tsv, .txt or .arrow files (compressed too: .json.gz). A file belongs to split S when S
  is a word of its path below hf_path ("validation-0001.jsonl", "test/part-1.parquet",
  "c4-train.00000-of-01024.json.gz"); files named after no configured split are training files. A .txt
  file is cut into documents at blank lines;
- otherwise a dataset name (`allenai/c4`, with `hf_name` its configuration) that a previous online
  `datasets.load_dataset` left in the local Hugging Face cache (HF_HOME / HF_DATASETS_CACHE).
Nothing is downloaded: the library runs in offline mode, and a name that is not cached is a one-line
error. `hf_data_column` holds text (tokenized on the fly) or token ids (a list of ints per row).

Indexed (the default), the split is read once in order into a token store and shuffled globally; with
`hf_streaming: true` documents are read as a stream on every epoch, process i of n taking every n-th
one, shuffled in a window of `shuffle_buffer_size` documents. A dataset without the evaluation split
holds out its last 1% of training documents (at least one) for evaluation, unless `hf_eval_split` names
a split (then a missing one is an error); that needs the index, so a stream must name a split.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from MaxText.errors import ConfigError, DataError
from MaxText.input_pipeline.sources import SOURCES, Location, Source
from MaxText.input_pipeline.token_store import file_fingerprint
from MaxText.input_pipeline.tokenizer import default_file as tokenizer_file

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
             ".txt": "text", ".text": "text", ".arrow": "arrow"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_BATCH_DOCS = 256
HOLDOUT_FRACTION = 0.01


def import_datasets():
  """The `datasets` library in offline mode: nothing is ever downloaded at run time."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import datasets  # noqa: PLC0415 (slow import, only for this dataset type)
  except ImportError as e:
    raise ConfigError(f"dataset_type=hf needs the `datasets` package ({e}); pip install -r requirements.txt") from None
  datasets.config.HF_HUB_OFFLINE = True
  datasets.utils.logging.disable_progress_bar()
  datasets.utils.logging.set_verbosity_error()
  return datasets


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:300] if text else type(e).__name__


def _is_saved(path: str) -> bool:
  return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_dict.json", "state.json"))


def _data_files(spec: str) -> list[tuple[str, str]] | None:
  """(file, name relative to its root) of every data file `spec` names; None when it names no local file."""
  found, any_local = [], False
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    entry = os.path.expanduser(entry)
    if os.path.isdir(entry):
      any_local = True
      for root, dirs, names in os.walk(entry):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
          if _suffix(name) in _BUILDERS and not name.startswith("."):
            path = os.path.join(root, name)
            found.append((path, os.path.relpath(path, entry)))
    elif globlib.has_magic(entry) or os.path.isfile(entry):
      any_local = any_local or os.path.isfile(entry) or bool(globlib.glob(entry))
      for path in sorted(p for p in globlib.glob(entry, recursive=True) if os.path.isfile(p)):
        found.append((path, os.path.basename(path)))
  return found if any_local else None


def _named_after(relative: str, split: str) -> bool:
  """Whether `split` is a word of a file's path below hf_path: "validation-00001.jsonl", "test/a.csv",
  "c4-train.00000-of-01024.json.gz" (but not "trainer.jsonl" or "latest.csv")."""
  return re.search(rf"(^|[^A-Za-z]){re.escape(split)}([^A-Za-z]|$)", relative) is not None


def _suffix(path: str) -> str:
  """The data kind's extension, under a compression one: "a.json.gz" -> ".json"."""
  suffixes = [s.lower() for s in Path(path).suffixes]
  while suffixes and suffixes[-1] in _COMPRESSED:
    suffixes.pop()
  return suffixes[-1] if suffixes else ""


def split_files(files: list[tuple[str, str]], split: str, train_split: str, split_names: set[str]) -> list[str]:
  """The files of `split`: those named after it; for the training split also those named after no split."""
  named = [path for path, rel in files if _named_after(rel, split)]
  if split == train_split:
    named += [path for path, rel in files if not any(_named_after(rel, s) for s in split_names)]
  return sorted(set(named), key=[p for p, _ in files].index)


def _builder(files: list[str], where: str) -> str:
  unknown = [f for f in files if _suffix(f) not in _BUILDERS]
  if unknown:
    raise ConfigError(f"{where}: {unknown[0]} is no data file kind the hf source reads "
                      f"({', '.join(sorted(_BUILDERS))})")
  kinds = {_BUILDERS[_suffix(f)] for f in files}
  if len(kinds) > 1:
    raise ConfigError(f"{where} mixes file kinds ({', '.join(sorted(kinds))}); keep one kind per dataset")
  return kinds.pop()


@SOURCES.register("hf")
class HFSource(Source):
  """The documents of one split of a Hugging Face dataset (see the module docstring)."""

  @classmethod
  def locate(cls, config) -> Location:
    if not config.hf_path:
      raise ConfigError("dataset_type=hf needs hf_path: a save_to_disk folder, data files (folder, glob, list) "
                        "or a dataset name in the local Hugging Face cache")
    tokenizer = config.tokenizer_path
    first = os.path.expanduser(config.hf_path.split(",")[0].strip())
    name = tokenizer_file(config.tokenizer_type)
    if not tokenizer and name:
      folder = first if os.path.isdir(first) else os.path.dirname(first)
      if folder and os.path.isfile(os.path.join(folder, name)):
        tokenizer = os.path.join(folder, name)
    return Location(config.hf_path, tokenizer)

  @classmethod
  def indexed(cls, config) -> bool:
    return not config.hf_streaming

  @classmethod
  def open(cls, config, split: str, *, location: Location, train: bool, tokenizer, process_index: int,
           process_count: int) -> HFSource:
    names = {config.train_split: config.hf_train_split, config.eval_split: config.hf_eval_split}
    hf_split = names.get(split) or split
    # A dataset without the evaluation split holds some training documents out for it (module docstring).
    eval_split = None if config.hf_eval_split else config.eval_split
    return cls(location.dataset, config.hf_name, hf_split, column=config.hf_data_column, tokenizer=tokenizer,
               train_split=config.hf_train_split or config.train_split, eval_split=eval_split,
               split_names={config.train_split, config.eval_split, config.test_split, config.hf_train_split,
                            config.hf_eval_split} - {""},
               streaming=config.hf_streaming, process_index=process_index, process_count=process_count,
               shuffle=train, seed=config.data_shuffle_seed, shuffle_buffer_size=config.shuffle_buffer_size)

  def __init__(self, path: str, name: str, split: str, *, column: str, tokenizer, train_split: str = "train",
               eval_split: str | None = None, split_names: set[str] = frozenset(), streaming: bool = False,
               process_index: int = 0, process_count: int = 1, shuffle: bool = False, seed: int = 0,
               shuffle_buffer_size: int = 1024):
    self.path, self.name, self.split, self.column, self.tokenizer = path, name, split, column, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.shuffle, self.seed, self.buffer = shuffle, seed, max(1, shuffle_buffer_size)
    self.streaming = streaming
    self.where = f"hf_path={path!r}" + (f" hf_name={name!r}" if name else "")
    available, read = self._open_dataset(train_split, set(split_names) | {split})
    # "train": the training split minus its held-out tail; "eval": only that tail (see document_range).
    self.held_out: str | None = None
    if split not in available and split == eval_split and train_split in available:
      if streaming:
        raise ConfigError(f"{self.where} has no split {split!r} (splits: {', '.join(sorted(available))}); a stream "
                          f"cannot hold documents out for evaluation: set hf_eval_split, or eval_interval=0")
      self.held_out, self.split = "eval", train_split
    elif split == train_split and eval_split and eval_split not in available and not streaming:
      self.held_out = "train"
    if self.split not in available:
      raise ConfigError(f"{self.where} has no split {split!r}; splits: {', '.join(sorted(available)) or 'none'}")
    self._parts = read(self.split)
    self.where_split = f"{self.where} split {self.split!r}" + (" (held-out part)" if self.held_out == "eval" else "")

  def _open_dataset(self, train_split: str, split_names: set[str]):
    """(available split names, split -> [(where, dataset)] whose documents in order are the split)."""
    datasets = import_datasets()
    path = os.path.expanduser(self.path)
    if _is_saved(path):
      try:
        loaded = datasets.load_from_disk(path)
      except Exception as e:  # noqa: BLE001 (datasets raises many kinds for a damaged folder)
        raise DataError(f"{self.where}: cannot read the saved dataset ({_reason(e)})") from None
      splits = loaded if isinstance(loaded, datasets.DatasetDict) else {train_split: loaded}
      self._identity = "saved|" + "|".join(f"{k}:{v._fingerprint}" for k, v in sorted(splits.items()))
      return set(splits), lambda s: [(f"{self.where} split {s!r}", splits[s])]
    files = _data_files(self.path)
    if files is not None:
      if not files:
        raise ConfigError(f"{self.where} holds no data files ({', '.join(sorted(_BUILDERS))})")
      found = {s for s in split_names if any(_named_after(rel, s) for _, rel in files)}
      if any(not any(_named_after(rel, s) for s in split_names) for _, rel in files):
        found.add(train_split)

      def read(split):
        chosen = split_files(files, split, train_split, split_names)
        builder = _builder(chosen, self.where)
        self._identity = f"files|{builder}|{file_fingerprint(chosen)}"
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        parts = []
        for f in chosen:
          try:
            parts.append((f, datasets.load_dataset(builder, data_files={"train": [f]}, split="train", streaming=True,
                                                   **kwargs)))
          except Exception as e:  # noqa: BLE001
            raise DataError(f"{f}: cannot read it as {builder} ({_reason(e)})") from None
        return parts

      return found, read
    try:
      loaded = datasets.load_dataset(self.path, self.name or None)
    except ConnectionError:
      cache = datasets.config.HF_DATASETS_CACHE
      raise ConfigError(f"hf_path={self.path!r} is no local folder, file or glob, and not a dataset in the local "
                        f"Hugging Face cache ({cache}); nothing is downloaded at run time: load it once online "
                        f"with datasets.load_dataset (see docs/data.md)") from None
    except Exception as e:  # noqa: BLE001 (a missing configuration, a damaged cache, ...)
      raise ConfigError(f"{self.where}: {_reason(e)}") from None
    self._identity = "cache|" + "|".join(f"{k}:{v._fingerprint}" for k, v in sorted(loaded.items()))
    return set(loaded), lambda s: [(f"{self.where} split {s!r}", loaded[s])]

  # --- reading ---

  @property
  def description(self) -> str:
    return self.where_split

  def fingerprint(self) -> str:
    tok = self.tokenizer.fingerprint if self.tokenizer is not None else ""
    return f"hf|{self._identity}|{self.split}|{self.column}|{tok}"

  def document_range(self, num_documents: int) -> tuple[int, int]:
    if self.held_out is None:
      return 0, num_documents
    if num_documents < 2:
      raise DataError(f"{self.where_split} has {num_documents} document(s): too few to hold any out for evaluation; "
                      f"set hf_eval_split or eval_interval=0")
    cut = num_documents - max(1, int(num_documents * HOLDOUT_FRACTION))
    return (0, cut) if self.held_out == "train" else (cut, num_documents)

  def _column_chunks(self, where: str, dataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    names = getattr(dataset, "column_names", None)
    if names is not None and self.column not in names:
      raise DataError(f"{where} has no column hf_data_column={self.column!r}; columns: {', '.join(names)}")
    try:
      for batch in dataset.iter(batch_size=_BATCH_DOCS):
        if self.column not in batch:
          raise DataError(f"{where} has no column hf_data_column={self.column!r}; columns: {', '.join(batch)}")
        yield self._encode(where, batch[self.column])
    except (DataError, ConfigError):
      raise
    except Exception as e:  # noqa: BLE001 (pyarrow and the builders raise many kinds for bad files)
      raise DataError(f"{where}: cannot read it ({_reason(e)})") from None

  def _encode(self, where: str, values: list) -> tuple[np.ndarray, np.ndarray]:
    first = next((v for v in values if v is not None), "")
    if isinstance(first, str):
      if self.tokenizer is None:
        raise ConfigError(f"{where} column {self.column!r} holds text but no tokenizer was found; set tokenizer_path")
      ids = self.tokenizer.encode_batch([v or "" for v in values])
      lengths_D = np.fromiter(map(len, ids), np.int64, count=len(ids))
      flat = np.concatenate([np.asarray(x, np.int64) for x in ids]) if ids else np.zeros(0, np.int64)
      return flat, lengths_D
    if isinstance(first, (list, tuple, np.ndarray)):
      try:
        docs = [np.asarray(v if v is not None else [], np.int64) for v in values]
      except (TypeError, ValueError):
        raise DataError(f"{where} column {self.column!r} holds lists that are not token ids") from None
      if any(d.ndim != 1 for d in docs):
        raise DataError(f"{where} column {self.column!r} holds nested lists, not one list of token ids per row")
      lengths_D = np.fromiter(map(len, docs), np.int64, count=len(docs))
      return (np.concatenate(docs) if docs else np.zeros(0, np.int64)), lengths_D
    raise DataError(f"{where} column {self.column!r} holds {type(first).__name__} values, not text or token ids")

  def labelled_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for where, dataset in self._parts:
      for tokens_T, lengths_D in self._column_chunks(where, dataset):
        yield where, tokens_T, lengths_D

  def epoch_chunks(self, epoch: int, skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The stream (hf_streaming): this process's documents, window-shuffled per epoch when training."""
    rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
    docs = self._documents()
    if rng is not None:
      docs = _window_shuffle(docs, self.buffer, rng)
    out: list[np.ndarray] = []
    for doc in docs:
      if skip:
        skip -= 1
        continue
      if doc.size and doc.min() < 0:
        raise DataError(f"{self.where_split} holds the negative token id {int(doc.min())}")
      out.append(doc)
      if len(out) == _BATCH_DOCS:
        yield _chunk(out)
        out = []
    if out:
      yield _chunk(out)

  def _documents(self) -> Iterator[np.ndarray]:
    index = 0
    for _, tokens_T, lengths_D in self.labelled_chunks():
      starts = np.cumsum(lengths_D) - lengths_D
      for start, n in zip(starts, lengths_D):
        if index % self.process_count == self.process_index:
          yield tokens_T[start:start + n].astype(np.int32)
        index += 1


def _window_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
  """Items in a seeded random order drawn from a buffer of `size` (exact for a seed: resumable by skipping)."""
  buffer = []
  for item in items:
    if len(buffer) < size:
      buffer.append(item)
      continue
    i = int(rng.integers(size))
    buffer[i], item = item, buffer[i]
    yield item
  order = rng.permutation(len(buffer))
  for i in order:
    yield buffer[i]


def _chunk(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  return np.concatenate(docs).astype(np.int32), np.fromiter(map(len, docs), np.int64, count=len(docs))
