"""Train steps on fixed global batches, with an optional checkpoint save or restore: the same losses must
come out whatever the mesh and however many processes share it. Imported by tests/test_scale_out.py and
run by it as a script, one copy per process:

  python tests/scale_out_steps.py OUT.json START STOP RESTORE_DIR|- SAVE_DIR|- key=value ...

The batches are a function of the step alone (not of the data pipeline, whose packing is per process),
and each process feeds its own rows of them, as the trainer does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def global_batch(config, step: int) -> dict[str, np.ndarray]:
  """Rows of two packed documents each (cut at a random point), the last row half padding."""
  rng = np.random.default_rng([7, step])
  B, L = config.global_batch_size_to_train_on, config.max_target_length
  tokens = rng.integers(4, config.vocab_size, (B, L + 1), dtype=np.int32)
  cut = rng.integers(2, L - 2, (B, 1))
  segment = np.where(np.arange(L + 1)[None] < cut, 1, 2).astype(np.int32)
  segment[-1, L // 2:] = 0
  position = np.where(segment == 1, np.arange(L + 1), np.arange(L + 1) - cut).astype(np.int32)
  targets_segmentation = np.where(segment[:, 1:] == segment[:, :-1], segment[:, 1:], 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "inputs_position": position[:, :-1],
          "inputs_segmentation": segment[:, :-1], "targets_segmentation": targets_segmentation}


def initial_state(config):
  """The config's freshly initialised train state, on the host: compiled once, then placed on any mesh
  (the sharded init's compile costs more than a tiny model's train step)."""
  import jax  # noqa: PLC0415

  from MaxText.parallel import sharding  # noqa: PLC0415
  from MaxText.training import train_state  # noqa: PLC0415
  from MaxText.training.run import Run  # noqa: PLC0415

  run = Run(config)
  with sharding.use_mesh(run.mesh, run.rules):
    return jax.device_get(train_state.create_sharded(config, run.spec, run.tx, run.shardings))


def run_steps(config, start: int, stop: int, *, state=None, restore_dir: str | None = None,
              save_dir: str | None = None, save_step: int | None = None) -> dict:
  """Steps start+1..stop from `state` (host arrays, placed on this config's mesh), or from the latest
  checkpoint in `restore_dir`, or from a fresh state; the state after step `save_step` (default `stop`) is
  saved to `save_dir`. Returns the losses, the mesh and the parameters' PartitionSpecs."""
  import jax  # noqa: PLC0415

  from MaxText.checkpoint import checkpointing  # noqa: PLC0415
  from MaxText.parallel import sharding  # noqa: PLC0415
  from MaxText.training import train_state  # noqa: PLC0415
  from MaxText.training.run import Run  # noqa: PLC0415

  run = Run(config)
  rows = config.global_batch_size_to_train_on // run.process_count
  mine = slice(run.process_index * rows, (run.process_index + 1) * rows)
  losses = []

  def checkpointer(directory):
    return checkpointing.Checkpointer(directory, period=0, keep=0, use_async=False)

  def save(step, state):
    target = checkpointer(save_dir)
    try:
      target.save(step, state, {}, force=True)
    finally:
      target.close()

  save_step = stop if save_step is None else save_step

  with sharding.use_mesh(run.mesh, run.rules):
    if restore_dir:
      source = checkpointer(restore_dir)
      try:
        state, _, _, step = source.restore_latest(train_state.with_shardings(run.abstract, run.shardings), print)
      finally:
        source.close()
      assert step == start, f"checkpoint at step {step}, expected {start}"
    elif state is not None:
      state = jax.device_put(state, run.shardings)
    else:
      state = run.init_state()
    if save_dir and save_step == start:
      save(start, state)
    step_fn = run.train_step_fn()
    for step in range(start + 1, stop + 1):
      local = {k: v[mine] for k, v in global_batch(config, step).items()}
      state, metrics = step_fn(state, run.global_batch(local))
      losses.append(float(jax.device_get(metrics["loss"])))
      if save_dir and step == save_step:
        save(step, state)
  specs = jax.tree.map(lambda x: list(x.sharding.spec), state["params"])
  return {"losses": losses, "mesh": dict(run.mesh.shape), "specs": specs}


def main(argv: list[str]) -> int:
  from MaxText import startup  # noqa: PLC0415

  out, start, stop, restore_dir, save_dir, *overrides = argv[1:]
  config = startup.load_config([None, "MaxText/configs/base_v2.yml", *overrides])
  result = run_steps(config, int(start), int(stop), restore_dir=None if restore_dir == "-" else restore_dir,
                     save_dir=None if save_dir == "-" else save_dir)
  import jax  # noqa: PLC0415

  if jax.process_index() == 0:
    Path(out).write_text(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
