"""Device mesh and logical axis rules -> shardings.

The only place that maps logical axis names (the sharding vocabulary of model code) to mesh axes.
Model code calls `constrain(x, names)`; it is a no-op unless a `use_mesh` context is active, so
models run unchanged on plain arrays in tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from MaxText.errors import ShardingError

Rules = Sequence[tuple[str, Any]]
LogicalAxes = tuple[str | None, ...]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "maxtext_active_mesh", default=None)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of the config's resolved ici x dcn shape, with Auto axis types."""
  if devices is None:
    devices = jax.devices()[: config.num_devices]
  ici, dcn = tuple(config.ici_parallelism), tuple(config.dcn_parallelism)
  if math.prod(ici) * math.prod(dcn) != len(devices):
    raise ShardingError(f"mesh {ici} x {dcn} needs {math.prod(ici) * math.prod(dcn)} devices, got {len(devices)}")
  if math.prod(dcn) > 1:
    on_tpu = devices[0].platform == "tpu"
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not on_tpu, allow_split_physical_axes=True)
  elif len(devices) > 1 and devices[0].platform in ("tpu", "gpu"):
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    array = np.asarray(devices, dtype=object).reshape(ici)
  axis_types = (jax.sharding.AxisType.Auto,) * len(config.mesh_axes)
  return Mesh(array, tuple(config.mesh_axes), axis_types=axis_types)


def logical_to_spec(logical_axes: LogicalAxes, rules: Rules, mesh_shape: dict[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """Map logical names to a PartitionSpec: for each dimension, the first rule whose mesh axes are free.

  With `mesh_shape` and `shape`, mesh axes are dropped (last first) from a dimension they do not divide,
  so a 1-head KV projection under 2-way tensor parallelism is replicated rather than an error.
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    if name is None:
      out.append(None)
      continue
    chosen = None
    known = False
    for rule_name, mesh_axes in rules:
      if rule_name != name:
        continue
      known = True
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      if not any(a in used for a in mesh_axes):
        chosen = mesh_axes
        break
    if not known:
      raise ShardingError(f"logical axis {name!r} has no rule in logical_axis_rules")
    chosen = list(chosen or ())
    if mesh_shape is not None:
      chosen = [a for a in chosen if mesh_shape.get(a, 1) > 1]
      if shape is not None:
        while chosen and shape[i] % math.prod(mesh_shape[a] for a in chosen):
          chosen.pop()
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*out)


def named_sharding(mesh: Mesh, rules: Rules, logical_axes: LogicalAxes, shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, dict(mesh.shape), shape))


def tree_shardings(mesh: Mesh, rules: Rules, logical_tree, shape_tree):
  """NamedShardings for a tree of arrays, given a same-shaped tree of logical axis tuples."""
  return jax.tree.map(
      lambda axes, x: named_sharding(mesh, rules, axes, x.shape),
      logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
  """Inputs are split over the batch axes only: ('activation_batch', None, ...)."""
  return NamedSharding(mesh, logical_to_spec(("activation_batch",) + (None,) * (ndim - 1), rules, dict(mesh.shape), shape))


def batch_shards(config) -> int:
  """How many ways the batch dimension is split under the config's mesh and rules."""
  mesh_shape = {a: i * d for a, i, d in zip(config.mesh_axes, config.ici_parallelism, config.dcn_parallelism)}
  spec = logical_to_spec(("activation_batch",), config.logical_axis_rules, mesh_shape)
  axes = spec[0] if spec else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh_shape[a] for a in axes)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
  """Activate `mesh` and `rules` for `constrain` while tracing; jitted functions keep what they saw."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the innermost `use_mesh`, or None: for code that must build its own shard_map."""
  return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """with_sharding_constraint by logical names under the active mesh; identity without one."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, rules, logical_axes, x.shape))
