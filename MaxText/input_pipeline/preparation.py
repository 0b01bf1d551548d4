"""Text files -> tokenizer + TFRecord shards of pre-tokenized documents (the library behind
`MaxText/prepare_data.py`, whose docstring describes the output folder; the default corpus uses it too)."""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from MaxText import fs
from MaxText.errors import PrepareError, StorageError
from MaxText.input_pipeline import tfrecord_files
from MaxText.input_pipeline.hf_tokenizer import HFTokenizer, train_bpe
from MaxText.input_pipeline.tokenizer import ByteTokenizer, Tokenizer, train_sentencepiece

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts",
                      ".go", ".rs", ".sh", ".json", ".yaml", ".yml", ".toml", ".html", ".css", ".tex")
INFO_FILE = "dataset_info.json"
TOKENIZERS = ("sentencepiece", "byte", "hf")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}
_DOC_TARGET_CHARS, _DOC_LIMIT_CHARS = 2000, 8000
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_ENCODE_BATCH_CHARS = 4 << 20


def find_input_files(spec: str, extensions: Sequence[str], exclude_dirs: Sequence[str] = ()) -> list[tuple[str, str]]:
  """(path, key) for every input file; key is the path relative to the folder or glob root it came from.

  Folders are searched recursively for `extensions`, skipping hidden folders and `exclude_dirs`;
  files named directly or matched by a glob are taken whatever their extension.
  """
  extensions = tuple(e.lower() for e in extensions)
  found, seen = [], set()

  def add(path: str, key: str):
    real = os.path.realpath(path)
    if real not in seen:
      seen.add(real)
      found.append((path, key.replace(os.sep, "/")))

  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    entry = os.path.expanduser(entry)
    if os.path.isdir(entry):
      for root, dirs, names in os.walk(entry):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude_dirs)
        for name in sorted(names):
          if name.lower().endswith(extensions) and not name.startswith("."):
            path = os.path.join(root, name)
            add(path, os.path.relpath(path, entry))
    elif globlib.has_magic(entry):
      parts = Path(entry).parts
      fixed = next((i for i, p in enumerate(parts) if globlib.has_magic(p)), len(parts))
      root = str(Path(*parts[:fixed])) if fixed else "."
      for path in sorted(globlib.glob(entry, recursive=True)):
        if os.path.isfile(path):
          add(path, os.path.relpath(path, root))
    elif os.path.isfile(entry):
      add(entry, os.path.basename(entry))
  return found


def split_into_documents(text: str) -> list[str]:
  """Cut a long text at blank lines into pieces of about _DOC_TARGET_CHARS (see the module docstring)."""
  docs, start, n = [], 0, len(text)
  while start < n:
    if n - start <= _DOC_TARGET_CHARS:
      docs.append(text[start:])
      break
    blank = _BLANK_LINE.search(text, start + _DOC_TARGET_CHARS, start + _DOC_LIMIT_CHARS)
    if blank:
      end = blank.end()
    else:
      end = text.rfind("\n", start + _DOC_TARGET_CHARS, start + _DOC_LIMIT_CHARS) + 1
      end = end if end > start else min(n, start + _DOC_LIMIT_CHARS)
    docs.append(text[start:end])
    start = end
  return docs


def _hash01(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def assign_splits(keys: Sequence[str], validation_fraction: float, test_fraction: float) -> dict[str, list[str]]:
  """Split name -> keys, by hash; with >= 3 keys every split with a positive fraction gets at least one."""
  splits = {s: [] for s in SPLITS}
  for key in sorted(keys, key=_hash01):
    h = _hash01(key)
    splits["test" if h < test_fraction else "validation" if h < test_fraction + validation_fraction else "train"].append(key)
  wanted = {"train": 1.0, "validation": validation_fraction, "test": test_fraction}
  if len(keys) >= 3:
    for split in SPLITS:
      if not splits[split] and wanted[split] > 0:
        donor = max(SPLITS, key=lambda s: (len(splits[s]), s == "train"))
        # Keys are in hash order; the one nearest the empty split's hash interval moves.
        splits[split].append(splits[donor].pop(-1 if split == "train" else 0))
  return splits


def _read_text(path: str) -> str | None:
  try:
    with open(path, "rb") as f:
      return f.read().decode("utf-8", "replace")
  except OSError:
    return None


def _prepare_output(output_dir: str) -> tuple[Path | str, Path]:
  if fs.is_remote(output_dir):
    return _prepare_remote_output(output_dir)
  out = Path(output_dir).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise PrepareError(f"--output_dir {str(out)!r} exists and is not a folder")
  if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).exists():
    raise PrepareError(f"--output_dir {str(out)!r} is not empty and holds no prepared dataset; choose another")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes the folder private; the dataset should be as readable as any folder the user makes.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
  except OSError as e:
    raise PrepareError(f"cannot write --output_dir {str(out)!r}: {e.strerror}") from None
  return out, tmp


def _prepare_remote_output(output_dir: str) -> tuple[str, Path]:
  """A bucket folder (through the filesystem layer) and a local folder to write into first."""
  out = output_dir.rstrip("/")
  try:
    if fs.isfile(out):
      raise PrepareError(f"--output_dir {out!r} exists and is not a folder")
    if fs.isdir(out) and fs.listdir(out) and not fs.exists(fs.join(out, INFO_FILE)):
      raise PrepareError(f"--output_dir {out!r} is not empty and holds no prepared dataset; choose another")
    fs.makedirs(out)
  except StorageError as e:
    raise PrepareError(f"--output_dir: {e}") from None
  return out, Path(tempfile.mkdtemp(prefix="maxtext-prepare-"))


def _upload(tmp: Path, out: str):
  """Copy the prepared files into the bucket folder. Buckets have no rename of folders, so the info file,
  which marks a complete dataset, goes first out and last in; shards of an earlier preparation go too."""
  info = fs.join(out, INFO_FILE)
  try:
    if fs.exists(info):
      fs.remove(info)
    names = sorted(p.name for p in tmp.iterdir() if p.name != INFO_FILE)
    for name in names:
      fs.copy(str(tmp / name), fs.join(out, name))
    for name in fs.listdir(out, files_only=True):
      if name not in names:
        fs.remove(fs.join(out, name))
    fs.copy(str(tmp / INFO_FILE), info)
  except StorageError as e:
    raise PrepareError(str(e)) from None
  shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path | str):
  if isinstance(out, str):
    _upload(tmp, out)
    return
  if out.exists():
    # Swap through a side name so the folder is never missing or half-written for a reader.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)


def _isfile(path: str) -> bool:
  try:
    return fs.isfile(path)
  except StorageError as e:
    raise PrepareError(str(e)) from None


def _documents(files, validation_fraction: float, test_fraction: float, contiguous: bool,
               document_chars: int) -> tuple[dict, dict[str, list[str]]]:
  """(documents, splits): a document is key -> (file path, text or None = the whole file, read when written)."""
  if contiguous:
    # One stream (enwik8-style): the files in order, cut into train | validation | test by the fractions,
    # then into documents of document_chars characters.
    texts = []
    for path, _ in files:
      text = _read_text(path)
      if text is None:
        raise PrepareError(f"cannot read input file {path!r}")
      texts.append(text)
    stream = "".join(texts)
    train_end = round(len(stream) * (1 - validation_fraction - test_fraction))
    bounds = {"train": (0, train_end), "validation": (train_end, train_end + round(len(stream) * validation_fraction)),
              "test": (train_end + round(len(stream) * validation_fraction), len(stream))}
    documents, splits = {}, {}
    for split, (start, end) in bounds.items():
      splits[split] = []
      for i, at in enumerate(range(start, end, document_chars)):
        documents[f"{split}#{i}"] = (files[0][0], stream[at:min(at + document_chars, end)])
        splits[split].append(f"{split}#{i}")
    return documents, splits
  if len(files) >= 3:
    documents = {key: (path, None) for path, key in files}
  else:
    documents = {}
    for path, key in files:
      text = _read_text(path)
      if text is None:
        raise PrepareError(f"cannot read input file {path!r}")
      for i, piece in enumerate(split_into_documents(text)):
        documents[f"{key}#{i}"] = (path, piece)
  return documents, assign_splits(list(documents), validation_fraction, test_fraction)


def _train_tokenizer(files, documents, splits, model_path: Path, vocab_size: int, kind: str = "sentencepiece"):
  """A SentencePiece model (or with kind="hf" a byte-level BPE) trained on the training split (all
  documents if it is empty)."""
  train_keys = splits["train"] or list(documents)
  if documents[train_keys[0]][1] is None:  # whole files
    source = [documents[k][0] for k in train_keys]
  else:
    source = iter([documents[k][1] for k in train_keys])
  try:
    if kind == "hf":
      texts = (t for t in (_read_text(p) for p in source) if t) if isinstance(source, list) else source
      return train_bpe(texts, model_path.with_name("tokenizer.json"), vocab_size)
    return train_sentencepiece(source, model_path, vocab_size)
  except ValueError as e:
    raise PrepareError(str(e)) from None


def _copy_hf_tokenizer(tokenizer_path: str, folder: Path) -> HFTokenizer:
  """An existing Hugging Face tokenizer, checked by loading it, with its files copied into `folder`."""
  try:
    tokenizer = HFTokenizer(tokenizer_path)
  except ValueError as e:
    raise PrepareError(f"--tokenizer_path: {e}") from None
  source = Path(tokenizer_path).expanduser()
  if source.is_dir():
    for name in _HF_FILES:
      if (source / name).is_file():
        shutil.copyfile(source / name, folder / name)
  else:
    shutil.copyfile(source, folder / "tokenizer.json")
  if not (folder / "tokenizer.json").is_file():  # converted from a slow tokenizer: write what was loaded
    tokenizer._tok.save(str(folder / "tokenizer.json"))
  return HFTokenizer(folder)


def _check_args(validation_fraction, test_fraction, tokenizer, document_chars):
  if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
    raise PrepareError("--validation_fraction and --test_fraction must be >= 0 and sum to less than 1")
  if tokenizer not in TOKENIZERS:
    raise PrepareError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
  if document_chars < 1:
    raise PrepareError(f"--document_chars must be at least 1, got {document_chars}")


def prepare(input: str, output_dir: str, vocab_size: int = 8192, tokenizer_path: str | None = None,
            validation_fraction: float = 0.01, test_fraction: float = 0.01, num_shards: int = 4,
            extensions: Sequence[str] = DEFAULT_EXTENSIONS, exclude_dirs: Sequence[str] = (),
            progress: bool = True, tokenizer: str = "sentencepiece", contiguous: bool = False,
            document_chars: int = 1_000_000) -> dict:
  """Prepare a dataset folder from text files (see the module docstring); returns the summary."""
  _check_args(validation_fraction, test_fraction, tokenizer, document_chars)
  if num_shards < 1:
    raise PrepareError(f"--num_shards must be at least 1, got {num_shards}")
  if tokenizer_path and tokenizer == "byte":
    raise PrepareError("--tokenizer_path is a SentencePiece model; --tokenizer byte needs none")
  if tokenizer_path and not (_isfile(tokenizer_path) or
                             (tokenizer == "hf" and os.path.isdir(os.path.expanduser(tokenizer_path)))):
    raise PrepareError(f"--tokenizer_path {tokenizer_path!r} is not a file")
  files = find_input_files(input, extensions, exclude_dirs)
  if not files:
    raise PrepareError(f"--input {input!r} matched no files (folders are searched for {', '.join(extensions)})")
  documents, splits = _documents(files, validation_fraction, test_fraction, contiguous, document_chars)

  out, tmp = _prepare_output(output_dir)
  try:
    model_path = tmp / "tokenizer.model"
    if tokenizer == "byte":
      encoder = ByteTokenizer()
    elif tokenizer == "hf" and tokenizer_path:
      encoder = _copy_hf_tokenizer(tokenizer_path, tmp)
    elif tokenizer_path:
      try:
        fs.copy(tokenizer_path, str(model_path))
      except StorageError as e:
        raise PrepareError(f"--tokenizer_path: {e}") from None
      try:
        encoder = Tokenizer(model_path)
      except ValueError as e:
        raise PrepareError(f"--tokenizer_path: {e}") from None
    else:
      if progress:
        what = "a byte-level BPE tokenizer" if tokenizer == "hf" else "a SentencePiece tokenizer"
        print(f"training {what} ({vocab_size} pieces) on {len(splits['train'] or documents)} documents",
              file=sys.stderr, flush=True)
      encoder = _train_tokenizer(files, documents, splits, model_path, vocab_size, tokenizer)
    summary = _write_splits(tmp, splits, documents, encoder, num_shards, progress)
    summary.update(format_version=FORMAT_VERSION, input=input, vocab_size=encoder.vocab_size, tokenizer=tokenizer,
                   tokenizer_path=fs.join(str(out), _TOKENIZER_FILES[tokenizer]) if tokenizer != "byte" else "",
                   output_dir=str(out))
    (tmp / INFO_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary


def train_vocab(input: str, output_dir: str, vocab_size: int = 8192, validation_fraction: float = 0.01,
                test_fraction: float = 0.01, extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                exclude_dirs: Sequence[str] = (), contiguous: bool = False, document_chars: int = 1_000_000) -> str:
  """Only train the SentencePiece model (on the split `prepare` would train on): <output_dir>/tokenizer.model.

  The reference's `train_vocab` mode: pass the model to `prepare(tokenizer_path=...)` or `tokenizer_path=`.
  """
  _check_args(validation_fraction, test_fraction, "sentencepiece", document_chars)
  files = find_input_files(input, extensions, exclude_dirs)
  if not files:
    raise PrepareError(f"--input {input!r} matched no files (folders are searched for {', '.join(extensions)})")
  documents, splits = _documents(files, validation_fraction, test_fraction, contiguous, document_chars)
  if fs.is_remote(output_dir):
    out, tmp = output_dir.rstrip("/"), Path(tempfile.mkdtemp(prefix="maxtext-vocab-"))
    try:
      fs.makedirs(out)
      _train_tokenizer(files, documents, splits, tmp / "tokenizer.model", vocab_size)
      fs.copy(str(tmp / "tokenizer.model"), fs.join(out, "tokenizer.model"))
    except StorageError as e:
      raise PrepareError(str(e)) from None
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return fs.join(out, "tokenizer.model")
  out = Path(output_dir).expanduser().absolute()
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PrepareError(f"cannot write --output_dir {str(out)!r}: {e.strerror}") from None
  return _train_tokenizer(files, documents, splits, out / "tokenizer.model", vocab_size).path


class _SplitWriter:
  """Round-robins the documents of one split over its shards, encoding them in batches (threads help)."""

  def __init__(self, folder: Path, split: str, num_shards: int, tokenizer):
    self.tokenizer, self.n = tokenizer, num_shards
    self.writers = [tfrecord_files.ExampleWriter(str(folder / f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord"))
                    for i in range(num_shards)]
    self.stats = {"documents": 0, "tokens": 0, "files": num_shards}
    self.pending: list[str] = []
    self.pending_chars = 0

  def add(self, text: str):
    self.pending.append(text)
    self.pending_chars += len(text)
    if self.pending_chars >= _ENCODE_BATCH_CHARS or len(self.pending) >= 256:
      self.flush()

  def flush(self):
    for ids in self.tokenizer.encode_batch(self.pending) if self.pending else []:
      self.writers[self.stats["documents"] % self.n].write_tokens(list(ids))
      self.stats["documents"] += 1
      self.stats["tokens"] += len(ids)
    self.pending, self.pending_chars = [], 0

  def close(self) -> dict:
    self.flush()
    for w in self.writers:
      w.close()
    return self.stats


def _write_splits(folder: Path, splits, documents, tokenizer, num_shards: int, progress: bool) -> dict:
  summary = {"splits": {}, "skipped_files": []}
  # Every writer is open (TensorFlow imported) before the bar starts, or the import would count as the
  # first document's time and the first estimate would be hours.
  writers = {split: _SplitWriter(folder, split, min(num_shards, len(keys)), tokenizer)
             for split, keys in splits.items() if keys}
  tokens_before = 0
  with tqdm(total=len(documents), unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr) as bar:
    for split, keys in splits.items():
      if not keys:
        summary["splits"][split] = {"documents": 0, "tokens": 0, "files": 0}
        continue
      writer = writers[split]
      for key in keys:
        path, text = documents[key]
        text = _read_text(path) if text is None else text
        if text is None:
          summary["skipped_files"].append(path)
        elif text.strip():
          writer.add(text)
        bar.update(1)
        bar.set_postfix(split=split, tokens=tokens_before + writer.stats["tokens"], refresh=False)
      summary["splits"][split] = writer.close()
      tokens_before += writer.stats["tokens"]
  return summary
