"""What a run builds once: the mesh, the model spec, the optimizer, the state's shardings, the compiled steps.

    run = Run(config)                        # or Run(config, devices) with a TPU topology's compile-only devices
    with sharding.use_mesh(run.mesh, run.rules):
      state = run.init_state()
      batch = run.global_batch(next(run.data(config.train_split)))
      step = run.compile_step(state, batch)  # the jitted, donated train step, lowered and compiled
      state, metrics = step(state, batch)

Training (`loop.py`), train_compile.py, the benchmarks and the tools all compile the step this way.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from MaxText import input_pipeline
from MaxText.checkpoint import checkpointing
from MaxText.parallel import sharding
from MaxText.training import faults, optimizers, train_state, train_step


def agree_max(value: int) -> int:
  """The largest `value` over all processes (so every process runs the same number of steps)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


class Run:
  """Everything a run builds once: mesh, model spec, optimizer, shardings, compiled steps."""

  def __init__(self, config, devices=None):
    """`devices`: the mesh's devices (default: this job's first `num_devices`); train_compile.py passes the
    compile-only devices of a TPU topology."""
    self.config = config
    self.mesh = sharding.make_mesh(config, devices)
    self.rules = config.logical_axis_rules
    self.spec = train_state.model_spec(config)
    self.tx, self.schedule = optimizers.create(config, self.spec.roles)
    self.abstract = train_state.abstract_state(config, self.spec, self.tx)
    self.shardings = train_state.state_shardings(self.spec, self.abstract, self.mesh, self.rules)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_primary = self.process_index == 0

  def say(self, text: str) -> None:
    """A message of process 0 before the metric logger exists."""
    if self.is_primary:
      print(text, flush=True)

  def data(self, split: str):
    """This process's iterator of numpy batches of `split`."""
    return input_pipeline.create_iterator(self.config, split, process_index=self.process_index,
                                          process_count=self.process_count)

  def global_batch(self, batch: dict) -> dict:
    """Per-process numpy rows -> one global array per key, already split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

  def abstract_params(self):
    return train_state.with_shardings(self.spec.shapes, self.shardings["params"])

  def init_state(self) -> dict:
    """A fresh state created directly sharded; the parameters of `load_parameters_path` when it is set."""
    state = train_state.create_sharded(self.config, self.spec, self.tx, self.shardings)
    if self.config.load_parameters_path:
      params = checkpointing.load_parameters(self.config.load_parameters_path, self.abstract_params())
      state = {**state, "params": params}
    return state

  def train_step_fn(self):
    """The jitted train step with the state's shardings, donating the state (lower it to compile)."""
    return jax.jit(train_step.make_train_step(self.config, self.spec, self.tx, self.schedule),
                   in_shardings=(self.shardings, self.batch_sharding),
                   out_shardings=(self.shardings, None), donate_argnums=(0,))

  def compile_step(self, state, batch):
    """The train step lowered for `state` and `batch` (arrays or ShapeDtypeStructs) and compiled."""
    return self.train_step_fn().lower(state, batch).compile()

  def evaluate_fn(self):
    token_bytes = input_pipeline.token_byte_lengths(self.config)
    return jax.jit(train_step.make_eval_step(self.config, self.spec, token_bytes),
                   in_shardings=(self.shardings["params"], self.batch_sharding))

  def evaluate(self, eval_fn, params, split: str, at_step: int = -1) -> dict[str, float]:
    """Token-weighted loss over `eval_steps` batches of `split` (-1: the whole split)."""
    data = self.data(split)
    steps = self.config.eval_steps if self.config.eval_steps > 0 else agree_max(data.count_batches())
    rows = self.config.eval_batch_size // self.process_count
    # A process that runs out first contributes empty rows, so every process runs the same collectives.
    empty = {k: np.zeros((rows, self.config.max_target_length), np.int32) for k in train_step.BATCH_KEYS}
    totals = None
    for i in range(steps):
      batch = next(data, None) or empty
      sums = eval_fn(params, self.global_batch(batch))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      if i == 0:
        faults.reached("eval", at_step)
    totals = jax.device_get(totals)
    tokens = float(totals["tokens"])
    loss = float(totals["nll_sum"]) / max(tokens, 1.0)
    row: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if float(totals.get("bytes", 0.0)) > 0:  # data with a tokenizer: nats per token -> bits per byte of text
      row["bits_per_byte"] = float(totals["nll_sum"]) / math.log(2.0) / float(totals["bytes"])
    return row
