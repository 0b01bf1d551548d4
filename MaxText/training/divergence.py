"""Non-finite steps, found on the device without a host sync per step.

Every step's loss, gradient norm and parameter norm update a small record that stays on the device (one
tiny jitted update, dispatched behind the step like the metric window's sums). The host reads it only
when it waits for the device anyway: at log steps, with the metric window (one step late), and before
every evaluation and save, so a non-finite state is never evaluated or written.

`nan_policy: stop`: the first non-finite step ends the run with a DivergenceError naming it (exit 3); the
checkpoints written before it are the run's last ones. `nan_policy: skip`: the train step keeps the old
parameters and optimizer state for a non-finite step (train_step's `skip_nonfinite`), the metric window
counts it (`skipped_steps`), and the run stops after `max_consecutive_skips` of them in a row. Either way the
state that is saved is finite: under stop nothing after the first bad step is saved, under skip the bad
updates never reach the state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from MaxText.errors import DivergenceError


def _empty() -> dict:
  minus_one = jnp.asarray(-1, jnp.int32)
  return {"bad": jnp.asarray(0, jnp.int32), "streak": jnp.asarray(0, jnp.int32),
          "longest": jnp.asarray(0, jnp.int32), "longest_end": minus_one, "first": minus_one,
          "first_loss": jnp.asarray(0.0, jnp.float32), "first_grad_norm": jnp.asarray(0.0, jnp.float32),
          "first_param_norm": jnp.asarray(0.0, jnp.float32)}


@jax.jit
def _update(record: dict, metrics: dict, step) -> dict:
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics["param_norm"])
  bad = jnp.logical_not(finite)
  step = jnp.asarray(step, jnp.int32)
  streak = jnp.where(bad, record["streak"] + 1, 0)
  is_first = bad & (record["first"] < 0)
  longer = streak > record["longest"]
  return {"bad": record["bad"] + bad.astype(jnp.int32), "streak": streak,
          "longest": jnp.maximum(record["longest"], streak),
          "longest_end": jnp.where(longer, step, record["longest_end"]),
          "first": jnp.where(is_first, step, record["first"]),
          "first_loss": jnp.where(is_first, metrics["loss"].astype(jnp.float32), record["first_loss"]),
          "first_grad_norm": jnp.where(is_first, metrics["grad_norm"].astype(jnp.float32), record["first_grad_norm"]),
          "first_param_norm": jnp.where(is_first, metrics["param_norm"].astype(jnp.float32),
                                        record["first_param_norm"])}


def _show(x: float) -> str:
  return f"{x:.4g}" if math.isfinite(x) else str(x)


class Guard:
  """The on-device record of non-finite steps of this run (since it started or resumed)."""

  def __init__(self, policy: str, max_consecutive_skips: int):
    self.policy, self.max_skips = policy, max_consecutive_skips
    self.record = _empty()

  @classmethod
  def from_config(cls, config) -> Guard:
    return cls(config.nan_policy, config.max_consecutive_skips)

  def add(self, metrics: dict, step: int) -> None:
    """Fold in the metrics of `step` (device values; nothing is fetched)."""
    self.record = _update(self.record, metrics, step)

  def check(self, last_checkpoint: int | None) -> None:
    """Raise DivergenceError if the policy says stop (waits for the steps dispatched so far)."""
    r = {k: v.item() for k, v in jax.device_get(self.record).items()}
    values = (f"loss {_show(r['first_loss'])}, gradient norm {_show(r['first_grad_norm'])}, parameter norm "
              f"{_show(r['first_param_norm'])}")
    saved = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
             else "no checkpoint was saved")
    if self.policy == "stop" and r["bad"]:
      raise DivergenceError(f"step {r['first']}: {values}; training diverged and stopped (nan_policy=stop); "
                            f"nothing after it was saved, {saved}")
    if self.policy == "skip" and r["longest"] >= self.max_skips:
      end = r["longest_end"]
      raise DivergenceError(
          f"steps {end - r['longest'] + 1}-{end}: {r['longest']} non-finite steps in a row (first at step "
          f"{r['first']}: {values}); training diverged and stopped (nan_policy=skip, "
          f"max_consecutive_skips={self.max_skips}); {saved}")
