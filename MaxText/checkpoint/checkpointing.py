"""Orbax checkpoints: the train state plus the data position, saved asynchronously, restored onto any mesh,
verified against checksums, with a fallback past damaged steps.

Layout: <run dir>/checkpoints/<step>/{state, data, meta}. `state` is the state pytree of train_state.py,
`data` the input iterator's JSON state, so a resumed run sees the next batch rather than a replay; `meta`
(JSON) the run's learning-rate schedule length and a checksum of every array of `state` (integrity.py).
Restores always go through abstract targets that carry shardings, so a checkpoint written on one mesh
loads onto another. A step that cannot be read or fails its checksums is damaged: it is reported in one
line and, with `checkpoint_fallback`, moved to <run dir>/checkpoints/damaged/<step> while the newest intact
step is restored. No Orbax or TensorStore error reaches the user as such: each becomes a CheckpointError
(or StorageError for a write) that names the step, and Orbax's own error logs are not printed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from MaxText import fs
from MaxText.checkpoint import integrity, tensor_files
from MaxText.errors import CheckpointError, StorageError

DAMAGED = "damaged"  # subfolder of the checkpoint folder that receives damaged steps


class CheckpointDamage(CheckpointError):
  """A step that exists but cannot be read back as saved; the message says what is wrong."""


def _short(error: Exception) -> str:
  text = " ".join(str(error).split())
  return text if len(text) < 300 else text[:297] + "..."


class _QuietOrbax(logging.Filter):
  """Drop Orbax's error logs (each failure becomes a one-line error of ours) and asyncio's reports of the
  read futures a failed restore leaves behind: both print whole tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" in record.pathname and (record.levelno >= logging.ERROR or record.exc_info):
      return False
    return not (record.name == "asyncio" and "exception was never retrieved" in record.getMessage())


_FILTER = _QuietOrbax()


def _is_late_callback(exc_type, exc) -> bool:
  """TensorStore's read/write futures of a failed or abandoned save complete after Orbax closed their event
  loop; each completion callback then fails with this error, which TensorStore reports as unraisable (a
  whole traceback on stderr). The save's own failure is reported in one line; these echoes are dropped."""
  return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _quiet_unraisable(previous):
  def hook(unraisable):
    if not _is_late_callback(unraisable.exc_type, unraisable.exc_value):
      previous(unraisable)

  hook.quiet_checkpointing = True
  return hook


def quiet_library_logs() -> None:
  if not getattr(sys.unraisablehook, "quiet_checkpointing", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  for name in ("absl", "asyncio", ""):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
  for handler in logging.getLogger().handlers:
    if _FILTER not in handler.filters:
      handler.addFilter(_FILTER)


class Checkpointer:
  def __init__(self, directory: str, *, period: int, keep: int, use_async: bool, fallback: bool = True):
    self.directory = fs.absolute(directory)
    self.period = period
    self.fallback = fallback
    quiet_library_logs()
    fs.ensure_folder(self.directory, "checkpoint folder")
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(max(period, 1)),
        preservation_policy=checkpoint_managers.LatestN(keep) if keep > 0 else None,
        enable_async_checkpointing=use_async,
        create=True,
        cleanup_tmp_directories=True,  # the unfinished writes of a killed run
    )
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "data", "meta"),
          item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise StorageError(f"cannot open checkpoint folder {self.directory}: {fs.describe_os_error(e)}") from None
    self._pending: int | None = None  # the step of a save that may still be running in the background

  @classmethod
  def from_config(cls, config) -> Checkpointer:
    return cls(config.checkpoint_dir, period=config.checkpoint_period or config.steps,
               keep=config.max_num_checkpoints_to_keep, use_async=config.async_checkpointing,
               fallback=config.checkpoint_fallback)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def ensure_space(self, abstract_state: Any) -> None:
    """A disk too full for one checkpoint of this process's part of the state is an error before training."""
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) // jax.process_count()
    fs.ensure_space(self.directory, nbytes, "checkpoint folder")

  # --- saving ---

  def due(self, step: int) -> bool:
    """Whether the period asks for a save at `step`."""
    return self.period > 0 and self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, meta: dict | None = None, *, force: bool = False) -> bool:
    """Save when the period says so (or `force`); returns whether a save started. Call on every process.

    The checksums are read from the arrays here (on CPU in place, else on the devices); the write itself
    runs in the background when asynchronous.
    """
    if force and step in self.manager.all_steps():
      return False
    if not force and not self.due(step):
      return False
    self._wait_pending()  # Orbax waits for the previous save anyway; its failure is reported as its own
    record = {**(meta or {}), "checksums": integrity.checksums(state)}
    try:
      started = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                        meta=ocp.args.JsonSave(record)),
          force=force)
    except Exception as e:  # noqa: BLE001 (Orbax raises plain Exception; each becomes one line)
      raise self._write_error(step, e) from None
    self._pending = step if started else None
    return started

  def check(self) -> None:
    """Raise at once if a background save has failed; never waits for one that is still running."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._wait_pending()  # returns at once: the background thread has ended

  def _wait_pending(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(step, e) from None

  def _write_error(self, step: int, error: BaseException) -> StorageError:
    committed = [s for s in self.all_steps() if s != step and os.path.isdir(self.step_dir(s))]
    kept = f"the earlier checkpoints ({', '.join(map(str, sorted(committed)))}) are intact" if committed \
        else "no earlier checkpoint exists"
    return StorageError(f"cannot write checkpoint step {step} to {self.directory}: {integrity.describe(error)}; {kept}")

  def close(self, *, abandon: bool = False) -> None:
    """Wait for background writes (their errors raise here, as StorageError) and release the manager.
    `abandon`: do not wait (a second signal); the step being written stays an unfinished temporary folder,
    which the next run removes, and the earlier steps are untouched."""
    if abandon:
      return
    try:
      self._wait_pending()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 (the error, if any, was raised above)
        pass

  # --- restoring ---

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`, placed as the ShapeDtypeStruct shardings of `abstract_state` say.
    CheckpointDamage if it cannot be read or fails its checksums; CheckpointError if it does not fit."""
    state, data_state, _ = self._restore(step, abstract_state)
    return state, data_state

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    path = self.step_dir(step)
    self._check_fits(step, path, abstract_state)
    has_meta = os.path.isdir(os.path.join(path, "meta"))
    args = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    if has_meta:
      args["meta"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001
      raise CheckpointDamage(f"cannot be read ({integrity.describe(e)})") from None
    meta = dict(restored["meta"] or {}) if has_meta else {}
    _verify(meta, restored["state"])
    return restored["state"], dict(restored["data"] or {}), meta

  def restore_latest(self, abstract_state: Any, say: Callable[[str], None]) -> tuple[Any, dict, dict, int] | None:
    """The newest intact step as (state, data_state, meta, step); None when there is no checkpoint.

    A damaged step is reported through `say`; with fallback the next older one is tried, and once an intact
    step is restored the damaged newer ones move to checkpoints/damaged/ (kept for inspection, and out of
    the way of the steps the resumed run will save). Without fallback, or with no intact step, it raises.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state, meta = self._restore(step, abstract_state)
      except CheckpointDamage as e:
        message = f"checkpoint step {step} in {self.directory} is damaged: {e}"
        if not self.fallback:
          raise CheckpointDamage(f"{message} (checkpoint_fallback=true restores the newest intact step)") from None
        say(message)
        damaged.append(step)
        continue
      if damaged:
        self._move_aside(damaged)
        say(f"restored step {step}, the newest intact checkpoint; damaged step(s) {', '.join(map(str, damaged))} "
            f"moved to {os.path.join(self.directory, DAMAGED)}")
      return state, data_state, meta, step
    if damaged:
      raise CheckpointDamage(f"no intact checkpoint in {self.directory}: step(s) {', '.join(map(str, damaged))} "
                             f"are damaged (move the folder away to start afresh)")
    return None

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      aside = os.path.join(self.directory, DAMAGED)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
          target += f"-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(self.step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpointing: damaged steps moved")
    self.manager.reload()

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of `step` (no optimizer state or data position), placed as `abstract_params` say."""
    path = self.step_dir(step)
    self._check_fits(step, path, {"params": abstract_params}, only="params")
    return _read_params(Path(path), abstract_params, f"checkpoint {path}")

  def _check_fits(self, step: int, path: str, abstract_state: Any, only: str = "") -> None:
    """Compare stored paths and shapes with the target (the entries under `only`, if given) before any
    array is read.

    A mismatch found by Orbax mid-restore leaves its background reads running; checking the metadata
    first gives a clean error that names the offending entry.
    """
    try:
      stored = self.manager.item_metadata(step)["state"]
      stored = getattr(stored, "tree", stored)
      have = _shapes_by_path(stored)
    except Exception as e:  # noqa: BLE001
      raise CheckpointDamage(f"its metadata cannot be read ({integrity.describe(e)})") from None
    want = _shapes_by_path(abstract_state)
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


def saved_meta(directory: str) -> dict:
  """The `meta` item (schedule length, checksums, ...) of the newest step in `directory` whose meta can be read,
  without restoring anything; {} when there is none. A run reads it before it is built (its schedule)."""
  if not fs.isdir(directory):
    return {}
  for step in sorted((int(n) for n in fs.listdir(directory) if n.isdigit()), reverse=True):
    path = fs.join(directory, str(step), "meta", "metadata")
    try:
      meta = json.loads(fs.read_text(path))
    except (OSError, ValueError, StorageError):
      continue
    if isinstance(meta, dict):
      return meta
  return {}


def _verify(meta: dict, state: Any, prefix: str = "") -> None:
  recorded = meta.get("checksums")
  if not recorded:
    return  # written before checksums were recorded
  bad = integrity.mismatches(recorded, state, prefix)
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise CheckpointDamage(f"{bad[0]}{more} {'does' if len(bad) == 1 else 'do'} not match the checksum recorded "
                           f"at save (changed bytes)")


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
  """{'params/layers/mlp/wo': shape} with namedtuple fields, dict keys and list indices alike."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {integrity.leaf_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def run_parameters(config, abstract_params: Any, purpose: str,
                   say: Callable[[str], None] | None = None) -> tuple[Any, int, str]:
  """(parameters, step, where from) for a command about an existing run (decode, evaluation): the
  parameters of the run's newest intact checkpoint (a damaged newer one is reported through `say` and,
  with checkpoint_fallback, skipped; nothing is moved), else those of `load_parameters_path` (step 0).
  Nothing else of the train state is read."""
  say = say or (lambda text: None)
  if config.enable_checkpointing and fs.isdir(config.checkpoint_dir):
    checkpointer = Checkpointer.from_config(config)
    try:
      damaged = []
      for step in sorted(checkpointer.all_steps(), reverse=True):
        try:
          return checkpointer.restore_params(step, abstract_params), step, checkpointer.step_dir(step)
        except CheckpointDamage as e:
          message = f"checkpoint step {step} in {checkpointer.directory} is damaged: {e}"
          if not config.checkpoint_fallback:
            raise CheckpointDamage(message) from None
          say(message)
          damaged.append(step)
      if damaged:
        raise CheckpointDamage(f"{purpose}: no intact checkpoint in {checkpointer.directory}")
    finally:
      checkpointer.close()
  if not config.load_parameters_path:
    raise CheckpointError(f"{purpose} needs a checkpoint: none in {config.checkpoint_dir} and no load_parameters_path")
  return load_parameters(config.load_parameters_path, abstract_params), 0, config.load_parameters_path


_DAMAGE_MARKS = ("Error reading", "Error opening", "NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                 "No such file", "Truncated", "corrupt")


def _looks_damaged(error: BaseException) -> bool:
  text = " ".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
  return isinstance(error, OSError) or any(mark in text for mark in _DAMAGE_MARKS)


def _read_params(step_dir: Path, abstract_params: Any, what: str) -> Any:
  """The parameters of a step folder, verified against its checksums when it has them; CheckpointDamage
  (bare description) when they cannot be read back as saved, CheckpointError when they do not fit."""
  item = step_dir / "state" if (step_dir / "state").is_dir() else step_dir
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        item, args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract_params}),
            partial_restore=True))
  except Exception as e:  # noqa: BLE001 (Orbax raises plain Exception for unreadable data)
    if _looks_damaged(e):
      raise CheckpointDamage(f"cannot be read ({integrity.describe(e)})") from None
    raise CheckpointError(f"{what} does not hold parameters of this model: {_short(e)}") from None
  meta_file = step_dir / "meta" / "metadata"
  if meta_file.is_file():
    try:
      meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
      raise CheckpointDamage(f"its checksums cannot be read ({integrity.describe(e)})") from None
    _verify(meta, {"params": restored["params"]}, prefix="params/")
  return restored["params"]


def load_parameters(path: str, abstract_params: Any) -> Any:
  """Only the parameters of a checkpoint step dir (<run>/checkpoints/<step>), onto the given shardings,
  verified against the step's checksums when it has them; or a converted checkpoint (convert_checkpoint.py's
  params.safetensors, a file or its folder)."""
  if tensor_files.is_parameter_folder(path):
    return load_converted(path, abstract_params)
  quiet_library_logs()
  if fs.is_remote(path):  # a bucket: reached through the filesystem layer, read by Orbax through epath

    try:
      found = fs.isdir(fs.join(path, "state")) or fs.isdir(path)
    except StorageError as e:
      raise CheckpointError(f"load_parameters_path: {e}") from None
    step_dir = epath.Path(path)
  else:
    step_dir = Path(os.path.abspath(os.path.expanduser(path)))  # Orbax wants an absolute path
    markers = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "_sharding")
    found = (step_dir / "state").is_dir() or any((step_dir / m).exists() for m in markers)
  if not found:
    raise CheckpointError(f"load_parameters_path {path!r} is not a checkpoint step folder (expected <run>/checkpoints/<step>)")
  try:
    return _read_params(step_dir, abstract_params, f"load_parameters_path {path!r}")
  except CheckpointDamage as e:
    raise CheckpointError(f"load_parameters_path {path!r} is damaged: {e}") from None


def load_converted(path: str, abstract_params: Any) -> Any:
  """Parameters from safetensors named by parameter path ("layers/mlp/wo"), each placed directly in its
  sharding: every device's shard is read from the file on its own (the leading rows it covers), cast to
  the parameter's dtype; the whole tensor is never assembled on one host."""
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
