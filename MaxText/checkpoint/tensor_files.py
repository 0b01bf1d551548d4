"""Flat {name: tensor} checkpoint files, read and written one tensor at a time (no mmap, no whole model in memory).

Safetensors (https://github.com/huggingface/safetensors, the format Hugging Face saves): 8 bytes little-endian
header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data, C order, offsets relative to the first byte after the header. The JSON may end in spaces.

  read:   `open_folder(dir)` -> a lazy Mapping over an HF checkpoint folder: model.safetensors, sharded
          model-*-of-*.safetensors + model.safetensors.index.json, or pytorch_model*.bin (needs torch);
          `TensorFile(path)` one safetensors file. Indexing returns a numpy array read with plain file
          reads (page cache, not this process's memory); `lazy(name)` returns a `LazyTensor` whose
          `[i]` reads one leading-axis slice (one layer of a stack).
  write:  `ShardedWriter(dir, prefix)` streams tensors into shards of at most `max_shard_bytes`, with an
          index file when there is more than one: each tensor goes to disk as it arrives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from MaxText.errors import CheckpointError

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
HEADER_RESERVE = 1 << 18  # header bytes reserved before the data; a longer header moves the data once
_CHUNK = 64 << 20


def dtype_of(name: str) -> np.dtype:
  """numpy dtype of 'float32', 'bfloat16', ..."""
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _read_into(f, offset: int, out: np.ndarray) -> None:
  view = memoryview(out.reshape(-1).view(np.uint8))
  f.seek(offset)
  done = 0
  while done < len(view):
    n = f.readinto(view[done:done + _CHUNK])
    if not n:
      raise CheckpointError(f"{f.name} is truncated")
    done += n


class LazyTensor:
  """One tensor of a safetensors file, read when converted to an array; `[i]` reads row i of the leading
  axis only, `read(index)` the rows an index needs."""

  def __init__(self, file: TensorFile, name: str, dtype: np.dtype, shape: tuple[int, ...], offset: int):
    self.file, self.name, self.dtype, self.shape, self.offset = file, name, dtype, shape, offset

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def rows(self, start: int, stop: int) -> np.ndarray:
    row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    out = np.empty((stop - start, *self.shape[1:]), self.dtype)
    with open(self.file.path, "rb") as f:
      _read_into(f, self.offset + start * row, out)
    return out

  def read(self, index=()) -> np.ndarray:
    """self[index] for a tuple of slices (a device's shard), reading only the leading rows it covers."""
    if not self.shape:
      return self.rows(0, 1).reshape(())
    index = tuple(index) if isinstance(index, tuple) else (index,)
    first = index[0] if index else slice(None)
    if isinstance(first, slice) and first.step in (None, 1):
      start, stop, _ = first.indices(self.shape[0])
      return self.rows(start, max(start, stop))[(slice(None), *index[1:])]
    return np.asarray(self)[index]

  def __getitem__(self, i):
    if isinstance(i, (int, np.integer)):
      i = int(i) % self.shape[0]
      return self.rows(i, i + 1)[0]
    return self.read(i)

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self.rows(0, self.shape[0]) if self.shape else self.read()
    return out if dtype is None else out.astype(dtype)

  def __len__(self) -> int:
    return self.shape[0]


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
  """({name: {"dtype", "shape", "data_offsets"}, "__metadata__"?: {...}}, byte offset of the data)."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"{path} is not a safetensors file")
      n = int.from_bytes(head, "little")
      if n > 100 << 20:
        raise CheckpointError(f"{path} is not a safetensors file (header of {n} bytes)")
      header = json.loads(f.read(n).decode("utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
  return header, 8 + n


class TensorFile(Mapping):
  """One safetensors file as a Mapping name -> numpy array (read on access)."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    header, start = read_header(path)
    self.metadata = header.pop("__metadata__", {}) or {}
    self.tensors: dict[str, LazyTensor] = {}
    for name, entry in header.items():
      if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which is not supported")
      begin, end = entry["data_offsets"]
      tensor = LazyTensor(self, name, DTYPES[entry["dtype"]], tuple(entry["shape"]), start + begin)
      if tensor.nbytes != end - begin:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {tensor.shape}")
      self.tensors[name] = tensor

  def lazy(self, name: str) -> LazyTensor:
    return self.tensors[name]

  def __getitem__(self, name: str) -> np.ndarray:
    return np.asarray(self.tensors[name])

  def __iter__(self) -> Iterator[str]:
    return iter(self.tensors)

  def __len__(self) -> int:
    return len(self.tensors)


class TorchFile(Mapping):
  """A pytorch_model*.bin file (torch.load with mmap, weights only), as numpy arrays."""

  def __init__(self, path: str | os.PathLike):
    try:
      import torch  # noqa: PLC0415 (optional: only for pytorch_model.bin files)
    except ImportError:
      raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch)") from None
    self.path = str(path)
    self._state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
    self._torch = torch

  def __getitem__(self, name: str) -> np.ndarray:
    t = self._state[name].detach()
    if t.dtype == self._torch.bfloat16:
      return t.view(self._torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()

  def __iter__(self):
    return iter(self._state)

  def __len__(self) -> int:
    return len(self._state)


class Folder(Mapping):
  """Every tensor of an HF checkpoint folder, by name, across its files."""

  def __init__(self, folder: str | os.PathLike, prefix: str = "model"):
    self.folder, self.prefix = Path(folder), prefix
    self._where: dict[str, Mapping] = {}
    files = self._files()
    for f in files:
      for name in f:
        self._where[name] = f
    self.files = files

  def _files(self) -> list[Mapping]:
    d = self.folder
    if not d.is_dir():
      raise CheckpointError(f"{str(d)!r} is not a folder")
    openers = [(f"{self.prefix}.safetensors.index.json", TensorFile)]
    if self.prefix == "model":
      openers.append(("pytorch_model.bin.index.json", TorchFile))
    for index_name, opener in openers:
      index = d / index_name
      if index.is_file():
        try:
          weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
          raise CheckpointError(f"{index} is not a checkpoint index: {e}") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
          raise CheckpointError(f"{index} names {missing[0]}, which is not in {d}")
        return [opener(d / n) for n in names]
    if (d / f"{self.prefix}.safetensors").is_file():
      return [TensorFile(d / f"{self.prefix}.safetensors")]
    if self.prefix == "model":
      if (d / "pytorch_model.bin").is_file():
        return [TorchFile(d / "pytorch_model.bin")]
      single = sorted(d.glob("*.safetensors"))
      if len(single) == 1:
        return [TensorFile(single[0])]
      raise CheckpointError(f"{str(d)!r} holds no model.safetensors, sharded safetensors with an index, or "
                            f"pytorch_model.bin")
    raise CheckpointError(f"{str(d)!r} holds no {self.prefix}.safetensors or {self.prefix}.safetensors.index.json")

  def lazy(self, name: str):
    f = self._where[name]
    return f.lazy(name) if isinstance(f, TensorFile) else f[name]

  def __getitem__(self, name: str) -> np.ndarray:
    return self._where[name][name]

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def open_folder(folder: str | os.PathLike, prefix: str = "model") -> Folder:
  return Folder(folder, prefix)


PARAMS_PREFIX = "params"  # converted parameters: <dir>/params.safetensors, names are parameter paths "a/b/c"


def is_parameter_folder(path: str | os.PathLike) -> bool:
  """Whether `path` holds parameters in this module's format (as convert_checkpoint.py to_maxtext writes)."""
  p = Path(path)
  if p.is_file():
    return p.suffix == ".safetensors"
  return (p / f"{PARAMS_PREFIX}.safetensors").is_file() or (p / f"{PARAMS_PREFIX}.safetensors.index.json").is_file()


def open_parameters(path: str | os.PathLike) -> Mapping:
  p = Path(path)
  return TensorFile(p) if p.is_file() else Folder(p, PARAMS_PREFIX)


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  path = Path(folder) / "config.json"
  try:
    return json.loads(path.read_text())
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class _Shard:
  """One safetensors file being written: data after a reserved header region, header written on close."""

  def __init__(self, path: Path):
    self.path = path
    self.f = open(path, "wb")
    self.f.seek(8 + HEADER_RESERVE)
    self.entries: dict[str, dict] = {}
    self.size = 0

  def add(self, name: str, array: np.ndarray) -> None:
    if array.dtype not in NAMES:
      raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here")
    array = np.ascontiguousarray(array)
    self.f.write(memoryview(array.reshape(-1).view(np.uint8)))
    self.entries[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                          "data_offsets": [self.size, self.size + array.nbytes]}
    self.size += array.nbytes

  def close(self, metadata: dict[str, str]) -> None:
    header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode("utf-8")
    if len(header) <= HEADER_RESERVE:
      header += b" " * (HEADER_RESERVE - len(header))  # JSON may end in spaces
      self.f.seek(0)
      self.f.write(len(header).to_bytes(8, "little") + header)
      self.f.close()
      return
    self.f.close()  # a header longer than the reserve: rewrite the file with the data moved after it
    header += b" " * (-len(header) % 8)
    tmp = self.path.with_name(self.path.name + ".tmp")
    with open(self.path, "rb") as src, open(tmp, "wb") as dst:
      dst.write(len(header).to_bytes(8, "little") + header)
      src.seek(8 + HEADER_RESERVE)
      while chunk := src.read(_CHUNK):
        dst.write(chunk)
    os.replace(tmp, self.path)


class ShardedWriter:
  """Writes tensors as they come into <prefix>.safetensors, or, past `max_shard_bytes`, into
  <prefix>-0000k-of-0000n.safetensors plus <prefix>.safetensors.index.json (the HF layout)."""

  def __init__(self, folder: str | os.PathLike, prefix: str = "model", max_shard_bytes: int = 5 << 30,
               metadata: dict[str, str] | None = None):
    self.folder, self.prefix, self.max_shard_bytes = Path(folder), prefix, max_shard_bytes
    self.metadata = {"format": "pt", **(metadata or {})}
    self.folder.mkdir(parents=True, exist_ok=True)
    self.shards: list[_Shard] = []
    self.total = 0

  def add(self, name: str, array) -> None:
    array = np.asarray(array)
    if not self.shards or (self.shards[-1].size and self.shards[-1].size + array.nbytes > self.max_shard_bytes):
      if self.shards:
        self.shards[-1].close(self.metadata)
      self.shards.append(_Shard(self.folder / f".{self.prefix}-{len(self.shards) + 1}.partial"))
    if any(name in s.entries for s in self.shards):
      raise CheckpointError(f"tensor {name!r} written twice")
    self.shards[-1].add(name, array)
    self.total += array.nbytes

  def close(self) -> list[Path]:
    """Finish every file; returns the paths written."""
    if not self.shards:
      self.shards.append(_Shard(self.folder / f".{self.prefix}-1.partial"))
    if not self.shards[-1].f.closed:
      self.shards[-1].close(self.metadata)
    n = len(self.shards)
    if n == 1:
      final = [self.folder / f"{self.prefix}.safetensors"]
    else:
      final = [self.folder / f"{self.prefix}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for shard, path in zip(self.shards, final):
      os.replace(shard.path, path)
    if n > 1:
      index = {"metadata": {"total_size": self.total},
               "weight_map": {name: path.name for shard, path in zip(self.shards, final) for name in shard.entries}}
      (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return final


def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB', '1000' -> bytes."""
  t = str(text).strip().upper()
  for suffix, scale in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                        ("KB", 10**3), ("B", 1)):
    if t.endswith(suffix):
      return int(float(t[: -len(suffix)]) * scale)
  return int(float(t))
