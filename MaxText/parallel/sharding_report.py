"""What each device holds: per-parameter shardings (`print_sharding: true`), bytes per device of a sharded
tree, the largest arrays, and the compiler's memory analysis of a compiled step.

Everything is computed from shapes and shardings (abstract trees), so a 10B model costs nothing to report.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax

GiB = 1 << 30


class Row(NamedTuple):
  path: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple | None
  spec: Any  # PartitionSpec
  bytes_per_device: int
  bytes_total: int


def _name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_bytes(leaf, sharding) -> tuple[int, int]:
  itemsize = jax.numpy.dtype(leaf.dtype).itemsize
  total = math.prod(leaf.shape) * itemsize
  shard = sharding.shard_shape(tuple(leaf.shape)) if sharding is not None else tuple(leaf.shape)
  return math.prod(shard) * itemsize, total


def rows(abstract: Any, shardings: Any, logical_axes: Any = None) -> list[Row]:
  """One row per array of `abstract` (ShapeDtypeStructs or arrays) with its sharding from the same-shaped
  `shardings`; `logical_axes`, a same-shaped tree of axis-name tuples, adds the logical names."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(flat_shardings) != len(flat):
    raise ValueError(f"{len(flat)} arrays but {len(flat_shardings)} shardings")
  axes = [None] * len(flat)
  if logical_axes is not None:
    axes = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
  out = []
  for (path, leaf), sharding, names in zip(flat, flat_shardings, axes):
    per_device, total = _leaf_bytes(leaf, sharding)
    out.append(Row("/".join(_name(k) for k in path), tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)), names,
                   getattr(sharding, "spec", None), per_device, total))
  return out


def bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Bytes of `abstract` that each device holds under `shardings` (every dimension divides evenly: the
  rules replicate a dimension its mesh axes do not divide)."""
  return sum(r.bytes_per_device for r in rows(abstract, shardings))


def total_bytes(abstract: Any) -> int:
  return sum(math.prod(x.shape) * jax.numpy.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


def _human(n: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def _table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
  widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, body)])


def format_parameters(spec, abstract, shardings) -> str:
  """`print_sharding`: every parameter's shape, logical axes, PartitionSpec and bytes per device; then the
  bytes per device of the parameters and of the whole train state (parameters + optimizer state)."""
  params = rows(spec.shapes, shardings["params"], spec.logical_axes)
  body = [(r.path, "x".join(map(str, r.shape)) or "scalar", ",".join(str(a) for a in r.logical_axes or ()),
           str(tuple(r.spec)) if r.spec is not None else "", _human(r.bytes_per_device)) for r in params]
  state = rows(abstract, shardings)
  return "\n".join([
      _table(("parameter", "shape", "logical axes", "PartitionSpec", "per device"), body),
      f"parameters: {_human(sum(r.bytes_per_device for r in params))} per device of "
      f"{_human(sum(r.bytes_total for r in params))} ({len(params)} arrays)",
      f"train state (parameters + optimizer): {_human(sum(r.bytes_per_device for r in state))} per device of "
      f"{_human(sum(r.bytes_total for r in state))}"])


def largest(abstract: Any, shardings: Any, n: int = 8) -> list[dict]:
  """The `n` arrays of the tree that take the most bytes per device: path, shape, dtype, spec, bytes."""
  top = sorted(rows(abstract, shardings), key=lambda r: -r.bytes_per_device)[:n]
  return [{"path": r.path, "shape": list(r.shape), "dtype": r.dtype,
           "spec": str(tuple(r.spec)) if r.spec is not None else "", "bytes_per_device": r.bytes_per_device}
          for r in top]


def format_largest(top: list[dict]) -> str:
  body = [(r["path"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"], r["spec"],
           _human(r["bytes_per_device"])) for r in top]
  return _table(("array", "shape", "dtype", "PartitionSpec", "per device"), body)


def compiled_memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (`compiled.memory_analysis()`): arguments, outputs, the part of
  the outputs that reuses donated arguments, temporaries, generated code, and their total."""
  stats = compiled.memory_analysis()
  out = {
      "arguments": int(stats.argument_size_in_bytes),
      "outputs": int(stats.output_size_in_bytes),
      "aliased": int(stats.alias_size_in_bytes),
      "temporaries": int(stats.temp_size_in_bytes),
      "generated_code": int(stats.generated_code_size_in_bytes),
  }
  # Donated state is written in place: its outputs take no memory of their own.
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
  return out


def format_memory(memory: dict[str, int], capacity: int | None = None) -> str:
  labels = {"arguments": "arguments (state + batch)", "outputs": "outputs (new state + metrics)",
            "aliased": "  of which donated (in place)", "temporaries": "temporaries (activations, gradients)",
            "generated_code": "generated code", "total": "total"}
  lines = [f"  {labels[k]:<38}{_human(v):>12}" for k, v in memory.items()]
  if capacity:
    lines[-1] += f"  of {_human(capacity)} HBM ({memory['total'] / capacity:.0%})"
  return "\n".join(lines)
