"""Short training runs across widths, shared by coord_check.py and mup_sweep.py.

A `WidthRun` builds what `train.py` builds for one config (mesh, model spec, optimizer, sharded state,
the jitted train step) and steps it by hand on batches the tool fetched once, so every run of a
comparison sees the same data, and a tool can read activations before each update or keep every step's
loss without going through checkpoints and metric files.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tempfile
from typing import Any

import jax
import numpy as np

from MaxText import input_pipeline, startup
from MaxText.config import loader
from MaxText.parallel import sharding
from MaxText.training import train_state, train_step
from MaxText.training.run import Run

RESULTS_DIR = os.path.join("benchmarks", "results")
ASSETS_DIR = "assets"
# The CPU width ladder: configs/models/MuTransformerW<width>.yml.
LADDER = (64, 128, 256, 512, 1024)


def enable_compilation_cache() -> None:
  """Runs that differ only in the learning rate share their init program: compile it once per process."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mup-tools-jax-cache-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def fetch_batches(config, split: str, count: int) -> list[dict]:
  """The first `count` batches of a split as numpy, so that every run of a comparison sees the same data."""
  data = input_pipeline.create_iterator(config, split, process_index=0, process_count=1)
  return [next(data) for _ in range(count)]


def ladder_config(width: int, parametrization: str, *args: str, **overrides) -> Any:
  """The MuTransformerW<width> preset under `parametrization` (then `key=value` args, then keyword
  overrides), without checkpoints or TensorBoard."""
  values = dict(run_name=f"mup_{parametrization}_w{width}", parametrization=parametrization,
                enable_checkpointing=False, enable_tensorboard=False, num_devices=1)
  values.update(overrides)
  return startup.load_config([None, str(loader.BASE_CONFIG), *args], env={},
                             model_name=f"MuTransformerW{width}", **values)


class WidthRun:
  """One config's state and compiled step; use inside `with run:` (the mesh and its axis rules)."""

  def __init__(self, config):
    self.config = config
    # The step trains the plain model; only the extra forward pass below records activations.
    self.run = Run(config.replace(record_activations=False))
    self._recording = train_state.model_spec(config) if config.record_activations else None
    self._mesh = sharding.use_mesh(self.run.mesh, self.run.rules)

  def __enter__(self):
    self._mesh.__enter__()
    run = self.run
    self.state = train_state.create_sharded(run.config, run.spec, run.tx, run.shardings)
    step = train_step.make_train_step(run.config, run.spec, run.tx, run.schedule)
    recording = self._recording

    def step_and_record(state, batch):
      # The activations of the parameters before the update, from the same program as the step.
      _, aux = train_state.bind(recording, state["params"])(batch["inputs"], batch["inputs_position"],
                                                            batch["inputs_segmentation"])
      if "activations" not in aux:
        raise ValueError(f"model family {self.config.decoder_block!r} does not record activations")
      state, metrics = step(state, batch)
      return state, {**metrics, "activations": aux["activations"]}

    fn = step_and_record if self.config.record_activations else step
    self._step = jax.jit(fn, in_shardings=(run.shardings, run.batch_sharding), out_shardings=(run.shardings, None),
                         donate_argnums=(0,))
    return self

  def __exit__(self, *exc):
    return self._mesh.__exit__(*exc)

  def put(self, batch: dict) -> dict:
    """A numpy batch -> arrays split over the batch axes of the mesh."""
    return {k: jax.device_put(v, self.run.batch_sharding) for k, v in batch.items()}

  def step(self, batch: dict) -> dict:
    """One optimizer step; with record_activations, metrics["activations"] holds mean |activation| per site
    before the update (per-layer sites averaged over layers: the check is about width, not depth)."""
    self.state, metrics = self._step(self.state, batch)
    if "activations" in metrics:
      sites = jax.device_get(metrics["activations"])
      metrics = {**metrics, "activations": {site: float(np.mean(v)) for site, v in sites.items()}}
    return metrics

  def evaluate(self, batches: list[dict]) -> float:
    """Token-weighted loss over `batches`."""
    eval_fn = self.run.evaluate_fn()
    sums = [jax.device_get(eval_fn(self.state["params"], self.put(b))) for b in batches]
    return float(sum(s["nll_sum"] for s in sums) / max(sum(s["tokens"] for s in sums), 1.0))


def loadavg() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())
