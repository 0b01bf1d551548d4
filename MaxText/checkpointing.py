"""Orbax checkpoints: the train state plus the data position, saved asynchronously, restored onto any mesh.

Layout: <run dir>/checkpoints/<step>/{state, data}. `state` is the state pytree of train_state.py,
`data` the input iterator's JSON state, so a resumed run sees the next batch rather than a replay.
Restores always go through abstract targets that carry shardings, so a checkpoint written on one mesh
loads onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from MaxText import fs, tensor_files
from MaxText.errors import CheckpointError, StorageError


def _short(error: Exception) -> str:
  text = " ".join(str(error).split())
  return text if len(text) < 300 else text[:297] + "..."


class Checkpointer:
  def __init__(self, directory: str, *, period: int, keep: int, use_async: bool):
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(max(period, 1)),
        preservation_policy=checkpoint_managers.LatestN(keep) if keep > 0 else None,
        enable_async_checkpointing=use_async,
        create=True,
    )
    self.directory = fs.absolute(directory)
    self.period = period
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  @classmethod
  def from_config(cls, config) -> "Checkpointer":
    return cls(config.checkpoint_dir, period=config.checkpoint_period or config.steps,
               keep=config.max_num_checkpoints_to_keep, use_async=config.async_checkpointing)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Save when the period says so (or `force`); returns whether a save started. Call on every process."""
    if force and step in self.manager.all_steps():
      return False
    if not force and self.period == 0:
      return False
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`, placed as the ShapeDtypeStruct shardings of `abstract_state` say."""
    path = os.path.join(self.directory, str(step))
    self._check_fits(step, path, abstract_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise CheckpointError(f"checkpoint {path} does not fit this run's model and optimizer: {_short(e)}") from None
    return restored["state"], dict(restored["data"] or {})

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of `step` (no optimizer state or data position), placed as `abstract_params` say."""
    path = os.path.join(self.directory, str(step))
    self._check_fits(step, path, {"params": abstract_params}, only="params")
    return load_parameters(path, abstract_params)

  def _check_fits(self, step: int, path: str, abstract_state: Any, only: str = "") -> None:
    """Compare stored paths and shapes with the target (the entries under `only`, if given) before any
    array is read.

    A mismatch found by Orbax mid-restore leaves its background reads running; checking the metadata
    first gives a clean error that names the offending entry.
    """
    try:
      stored = self.manager.item_metadata(step)["state"]
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as e:
      raise CheckpointError(f"checkpoint {path} cannot be read: {_short(e)}") from None
    stored = getattr(stored, "tree", stored)
    want = _shapes_by_path(abstract_state)
    have = _shapes_by_path(stored)
    if only:
      have = {k: v for k, v in have.items() if k == only or k.startswith(only + "/")}
    for key in sorted(set(want) | set(have), key=lambda k: (not k.startswith("params"), k)):
      if key not in have:
        raise CheckpointError(f"checkpoint {path} does not fit this run's model and optimizer: it lacks {key}")
      if key not in want:
        raise CheckpointError(f"checkpoint {path} does not fit this run's model and optimizer: "
                              f"it has {key}, which this run does not")
      if have[key] != want[key]:
        raise CheckpointError(f"checkpoint {path} does not fit this run's model and optimizer: {key} is "
                              f"{have[key]} there but {want[key]} here")

  def close(self) -> None:
    """Wait for background writes (their errors surface here) and release the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
  """{'params/layers/mlp/wo': shape} with namedtuple fields, dict keys and list indices alike."""
  def name(key):
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def run_parameters(config, abstract_params: Any, purpose: str) -> tuple[Any, int, str]:
  """(parameters, step, where from) for a command about an existing run (decode, evaluation): the
  parameters of the run's latest checkpoint, else those of `load_parameters_path` (step 0). Nothing else
  of the train state is read."""
  if config.enable_checkpointing and fs.isdir(config.checkpoint_dir):
    checkpointer = Checkpointer.from_config(config)
    try:
      latest = checkpointer.latest_step()
      if latest is not None:
        return checkpointer.restore_params(latest, abstract_params), latest, os.path.join(config.checkpoint_dir, str(latest))
    finally:
      checkpointer.close()
  if not config.load_parameters_path:
    raise CheckpointError(f"{purpose} needs a checkpoint: none in {config.checkpoint_dir} and no load_parameters_path")
  return load_parameters(config.load_parameters_path, abstract_params), 0, config.load_parameters_path


def load_parameters(path: str, abstract_params: Any) -> Any:
  """Only the parameters of a checkpoint step dir (<run>/checkpoints/<step>), or of a converted checkpoint
  (convert_checkpoint.py's params.safetensors, a file or its folder), onto the given shardings."""
  if tensor_files.is_parameter_folder(path):
    return load_converted(path, abstract_params)
  try:
    item = fs.join(path, "state") if fs.isdir(fs.join(path, "state")) else fs.expand(path)
    if not fs.isdir(item):
      raise CheckpointError(f"load_parameters_path {path!r} is not a checkpoint step folder (expected <run>/checkpoints/<step>)")
  except StorageError as e:
    raise CheckpointError(f"load_parameters_path: {e}") from None
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        item, args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract_params}),
            partial_restore=True))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f"load_parameters_path {path!r} does not hold parameters of this model: {_short(e)}") from None
  return restored["params"]


def load_converted(path: str, abstract_params: Any) -> Any:
  """Parameters from safetensors named by parameter path ("layers/mlp/wo"), each placed directly in its
  sharding: every device's shard is read from the file on its own (the leading rows it covers), cast to
  the parameter's dtype; the whole tensor is never assembled on one host."""
  import numpy as np  # noqa: PLC0415

  stored = tensor_files.open_parameters(path)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  names = ["/".join(str(getattr(k, "key", k)) for k in key_path) for key_path, _ in flat]
  extra = sorted(set(stored) - set(names))
  if extra:
    raise CheckpointError(f"load_parameters_path {path!r} has {extra[0]}, which this model does not")
  arrays = []
  for name, (_, target) in zip(names, flat):
    if name not in stored:
      raise CheckpointError(f"load_parameters_path {path!r} lacks {name}")
    lazy = stored.lazy(name)
    if tuple(lazy.shape) != tuple(target.shape):
      raise CheckpointError(f"load_parameters_path {path!r}: {name} is {tuple(lazy.shape)} there but "
                            f"{tuple(target.shape)} here")
    dtype = np.dtype(target.dtype)
    arrays.append(jax.make_array_from_callback(
        target.shape, target.sharding, lambda index, lazy=lazy, dtype=dtype: lazy.read(index).astype(dtype)))
  return jax.tree_util.tree_unflatten(treedef, arrays)
