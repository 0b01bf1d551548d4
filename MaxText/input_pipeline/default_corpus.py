"""The embedded default corpus: this Python's own standard library sources, prepared once per machine.

Every machine that runs the trainer has them, so `python MaxText/train.py ...` trains on real text with
no download. The prepared folder lives under `dataset_cache_dir` (default ~/.cache/maxtext_research)
with a name that encodes the Python version, the vocabulary size and FORMAT_VERSION; bump the latter
whenever the preparation changes, so stale caches are never reused.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path

from MaxText import fs
from MaxText.errors import ConfigError, PrepareError
from MaxText.input_pipeline.preparation import INFO_FILE, prepare
from MaxText.input_pipeline.token_store import DEFAULT_CACHE_DIR

FORMAT_VERSION = 1
_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def corpus_dir(cache_dir: str = "", vocab_size: int = 8192, tokenizer_path: str = "",
               source_dir: str | os.PathLike | None = None) -> Path:
  """Where the corpus for these settings is (or will be) prepared."""
  cache = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
  name = f"stdlib-py{platform.python_version()}-v{vocab_size}-f{FORMAT_VERSION}"
  if tokenizer_path:
    # Another tokenizer gives other token ids: a folder of its own, keyed by the model's content.
    name += f"-tok{hashlib.sha256(Path(tokenizer_path).expanduser().read_bytes()).hexdigest()[:10]}"
  if source_dir is not None and Path(source_dir).resolve() != stdlib_dir().resolve():
    name += f"-src{_digest(str(Path(source_dir).resolve()))}"
  return cache / name


def ensure_default_corpus(cache_dir: str = "", vocab_size: int = 8192, tokenizer_path: str = "",
                          source_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
  """The prepared folder, preparing it first if no process has yet; safe for concurrent processes.

  `source_dir` replaces the standard library (tests use a small folder).
  """
  if tokenizer_path and not Path(tokenizer_path).expanduser().is_file():
    raise ConfigError(f"tokenizer_path {tokenizer_path!r} is not a file")
  source = Path(source_dir) if source_dir is not None else stdlib_dir()
  target = corpus_dir(cache_dir, vocab_size, tokenizer_path, source)
  # prepare() renames a complete folder into place, so its info file means "ready".
  if (target / INFO_FILE).is_file():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"dataset_cache_dir: cannot create {str(target.parent)!r}: {e.strerror}") from None
  with fs.file_lock(target.parent / f".{target.name}.lock"):
    if (target / INFO_FILE).is_file():
      return target  # another process prepared it while this one waited
    print(f"preparing the default corpus (the Python {platform.python_version()} standard library in "
          f"{source}) into {target}", file=sys.stderr, flush=True)
    try:
      prepare(str(source), str(target), vocab_size=vocab_size, tokenizer_path=tokenizer_path or None,
              extensions=(".py",), exclude_dirs=_EXCLUDE_DIRS, progress=progress)
    except PrepareError as e:
      raise ConfigError(f"default corpus: {e}") from None
  return target
