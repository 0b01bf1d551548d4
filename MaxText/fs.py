"""The filesystem layer: every path the trainer reads or writes goes through here, local or a URL.

A path with a scheme (`gs://bucket/runs`, TensorFlow's in-memory `ram://` in tests, any filesystem
TensorFlow has registered) goes through `tf.io.gfile`, the layer TFDS and Orbax (through etils.epath) use
for the same URLs; a local path goes through `os`, with `~` expanded, and never imports TensorFlow.
A failure of the storage (a bucket that cannot be reached, no permission, a missing object) is a
`StorageError`: one line that names the path and says what was being done.

  fs.makedirs("gs://bucket/runs/r1")
  with fs.open(fs.join(run_dir, "config.yml"), "w") as f: ...

Checks made before training, so a disk fault is one line rather than a traceback at the first save: a file
in the way, a folder that cannot be created or written, a disk too full for a checkpoint (`ensure_folder`,
`ensure_space`; paths with a scheme are left to the filesystem that serves them).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as globlib
import os
import shutil
from collections.abc import Iterator
from typing import IO

from MaxText.errors import StorageError

_tf = None


def import_tf():
  """TensorFlow, imported quietly and kept away from the accelerator (it only reads and writes files)."""
  global _tf
  if _tf is None:
    # oneDNN's banner and TF's INFO lines are noise for a reader; set only for the import, and only
    # where the user has not chosen, so JAX/XLA (which read the same variables) keep the user's setting.
    quiet = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    ours = [k for k in quiet if k not in os.environ]
    for k in ours:
      os.environ[k] = quiet[k]
    try:
      import tensorflow as tf  # noqa: PLC0415 (4 s to import: only for paths with a scheme)
    finally:
      for k in ours:
        os.environ.pop(k, None)
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
      pass  # TF was already initialised by someone else; it is too late to hide the GPU
    tf.get_logger().setLevel("ERROR")
    _tf = tf
  return _tf


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _gfile():
  return import_tf().io.gfile


def _short(error: Exception) -> str:
  """The storage's reason on one line: TF's messages continue with "when reading ... of <path>", which
  the StorageError already names."""
  text = str(getattr(error, "message", "") or error).strip().splitlines()
  text = " ".join(text[0].split()) if text else type(error).__name__
  return text if len(text) <= 240 else text[:237] + "..."


class _Guard:
  """Turns the storage's exceptions (TF's OpError, OSError) into a StorageError naming the path."""

  def __init__(self, doing: str, path: str):
    self.doing, self.path = doing, path

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is None or isinstance(error, StorageError):
      return False
    tf_error = _tf is not None and isinstance(error, _tf.errors.OpError)
    if tf_error or isinstance(error, OSError):
      reason = error.strerror if isinstance(error, OSError) and error.strerror else _short(error)
      raise StorageError(f"cannot {self.doing} {self.path}: {reason}") from None
    return False


def expand(path: str) -> str:
  """`~` expanded for local paths; URLs unchanged."""
  path = str(path)
  return path if is_remote(path) else os.path.expanduser(path)


def absolute(path: str) -> str:
  path = expand(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  base = str(base)
  if is_remote(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def dirname(path: str) -> str:
  path = str(path)
  if is_remote(path):
    scheme, rest = path.split("://", 1)
    rest = rest.rstrip("/")
    return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else f"{scheme}://{rest}"
  return os.path.dirname(path)


def basename(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
  path = expand(path)
  if not is_remote(path):
    return os.path.exists(path)
  with _Guard("reach", path):
    return _gfile().exists(path)


def isdir(path: str) -> bool:
  path = expand(path)
  if not is_remote(path):
    return os.path.isdir(path)
  with _Guard("reach", path):
    # gfile.isdir says False for a bucket it cannot reach; exists raises, naming the cause.
    return _gfile().exists(path) and _gfile().isdir(path)


def isfile(path: str) -> bool:
  path = expand(path)
  if not is_remote(path):
    return os.path.isfile(path)
  with _Guard("reach", path):
    return _gfile().exists(path) and not _gfile().isdir(path)


def listdir(path: str, files_only: bool = False) -> list[str]:
  """Names in a folder (no trailing '/'), sorted; `files_only` leaves out sub-folders (and, locally,
  hidden files)."""
  path = expand(path)
  with _Guard("list", path):
    names = os.listdir(path) if not is_remote(path) else _gfile().listdir(path)
  if files_only:
    if is_remote(path):
      # GCS marks folders with a trailing '/', so a bucket needs no request per name; other schemes do.
      marked = path.startswith("gs://")
      with _Guard("list", path):
        names = [n for n in names if not n.endswith("/") and (marked or not _gfile().isdir(join(path, n)))]
    else:
      names = [n for n in names if not n.startswith(".") and os.path.isfile(os.path.join(path, n))]
  return sorted(n.rstrip("/") for n in names)


def glob(pattern: str) -> list[str]:
  pattern = expand(pattern)
  if not is_remote(pattern):
    return sorted(globlib.glob(pattern))
  with _Guard("list", pattern):
    return sorted(_gfile().glob(pattern))


def makedirs(path: str) -> None:
  path = expand(path)
  with _Guard("create folder", path):
    if is_remote(path):
      _gfile().makedirs(path)
    else:
      os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r", encoding: str | None = None) -> IO:
  """A file object; remote files are written when closed (a bucket has no partial objects)."""
  path = expand(path)
  doing = "read" if mode.startswith("r") else "write"
  with _Guard(doing, path):
    if not is_remote(path):
      return builtins.open(path, mode, encoding=None if "b" in mode else (encoding or "utf-8"))
    return _GuardedFile(_gfile().GFile(path, mode), doing, path)


class _GuardedFile:
  """A GFile whose storage errors (on read, write, flush or close) are StorageErrors."""

  def __init__(self, file, doing: str, path: str):
    self._file, self._doing, self._path = file, doing, path

  def __getattr__(self, name):
    attr = getattr(self._file, name)
    if not callable(attr):
      return attr

    def guarded(*args, **kwargs):
      with _Guard(self._doing, self._path):
        return attr(*args, **kwargs)
    return guarded

  def __iter__(self) -> Iterator:
    with _Guard(self._doing, self._path):
      yield from self._file

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def copy(src: str, dst: str) -> None:
  """Copy one file, either side local or remote; an existing `dst` is replaced."""
  src, dst = expand(src), expand(dst)
  with _Guard("copy to", dst):
    if is_remote(src) or is_remote(dst):
      _gfile().copy(src, dst, overwrite=True)
    else:
      shutil.copyfile(src, dst)


def remove(path: str) -> None:
  path = expand(path)
  with _Guard("remove", path):
    if is_remote(path):
      _gfile().remove(path)
    else:
      os.remove(path)


def rmtree(path: str) -> None:
  path = expand(path)
  with _Guard("remove", path):
    if is_remote(path):
      _gfile().rmtree(path)
    else:
      shutil.rmtree(path)


def remove_if_empty(path: str) -> bool:
  """Remove a folder only if it holds nothing; returns whether it did."""
  path = expand(path)
  try:
    if is_remote(path):
      if not isdir(path) or listdir(path):
        return False
      _gfile().rmtree(path)
    else:
      os.rmdir(path)
  except (OSError, StorageError):
    return False
  return True


def missing(paths, what: str) -> list[str]:
  """Those of `paths` that do not exist yet; a storage out of reach is one line naming `what` (a config key
  or flag)."""
  try:
    return [p for p in paths if not exists(p)]
  except StorageError as e:
    raise StorageError(f"{what}: {e}") from None


def check_writable(path: str, what: str) -> None:
  """Create the folder `path` or fail with one line naming `what` (a config key or flag) and the cause:
  checked before a run starts, so an unreachable bucket costs seconds, not a compiled model."""
  try:
    makedirs(path)
    if is_remote(path) and not isdir(path):
      raise StorageError(f"cannot create folder {path}")
  except StorageError as e:
    raise StorageError(f"{what}: {e}") from None


# --- Checks before training ---


def describe_os_error(error: OSError) -> str:
  """'No space left on device' (or the errno name when the OS gives no text)."""
  return error.strerror or type(error).__name__


def ensure_folder(path: str, what: str) -> None:
  """Create `path` if needed and prove it writable (a probe file is written and removed)."""
  if is_remote(path):
    return
  if os.path.lexists(path) and not os.path.isdir(path):
    raise StorageError(f"{what} {path} is a file, not a folder; move it away or choose another run_name")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise StorageError(f"cannot create {what} {path}: {describe_os_error(e)}") from None
  probe = os.path.join(path, f".write-test-{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"0")
    os.remove(probe)
  except OSError as e:
    raise StorageError(f"cannot write into {what} {path}: {describe_os_error(e)}") from None


def ensure_space(path: str, needed_bytes: int, what: str) -> None:
  """Refuse to start when the disk cannot hold even half of `needed_bytes` (the raw size of a checkpoint;
  compression of trained float32 arrays saves far less than half), so a full disk is found before training
  rather than at the first save."""
  if is_remote(path) or needed_bytes <= 0:
    return
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return
  if free < needed_bytes // 2:
    raise StorageError(f"{what} {path}: {free / 2**20:,.1f} MiB free on its disk, but a checkpoint takes about "
                       f"{needed_bytes / 2**20:,.1f} MiB")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
  """An exclusive lock on a local file (created if missing), held for the duration of the block; processes of
  one machine that start together wait for each other here."""
  import fcntl  # noqa: PLC0415 (POSIX only; the module is imported on every platform)

  with builtins.open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
