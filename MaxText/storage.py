"""Checks of the folders a run writes, made before training so a disk fault is one line, not a traceback
at the first save: a file in the way, a folder that cannot be created or written, a disk too full for a
checkpoint. Paths with a scheme (gs://...) are left to the filesystem layer that serves them.
"""

from __future__ import annotations

import os
import shutil

from MaxText.errors import StorageError


def describe_os_error(error: OSError) -> str:
  """'No space left on device' (or the errno name when the OS gives no text)."""
  return error.strerror or type(error).__name__


def _is_local(path: str) -> bool:
  return "://" not in path


def ensure_folder(path: str, what: str) -> None:
  """Create `path` if needed and prove it writable (a probe file is written and removed)."""
  if not _is_local(path):
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
  if not _is_local(path) or needed_bytes <= 0:
    return
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return
  if free < needed_bytes // 2:
    raise StorageError(f"{what} {path}: {free / 2**20:,.1f} MiB free on its disk, but a checkpoint takes about "
                       f"{needed_bytes / 2**20:,.1f} MiB")
