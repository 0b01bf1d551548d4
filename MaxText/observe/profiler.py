"""`profiler: xplane`: a jax.profiler trace of a window of train steps, written into the run's TensorBoard
folder (<run dir>/tensorboard/plugins/profile/<time>/<host>.xplane.pb), where TensorBoard's profile tab
(or XProf, or Perfetto) reads it.

The window is the steps skip_first_n_steps_for_profiler .. + profiler_steps - 1 counted from the run's first
step (after a resume, from the restored step). The step is compiled before the loop, so no window holds the
compilation; skipping the first step also leaves out its one-time costs. The loop calls `maybe_start(step)`
before dispatching a step and `maybe_stop(step, outputs)` after it, with `step` the count of steps done;
stopping waits for the window's last step to finish, so its device work is in the trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


class Profiler:
  """Starts and stops one trace around a window of steps; does nothing when `profiler` is ""."""

  def __init__(self, config, first_step: int, log: Callable[[str], None] = print):
    self.enabled = config.profiler == "xplane"
    self.start = first_step + config.skip_first_n_steps_for_profiler
    self.stop = self.start + config.profiler_steps
    self.folder = config.tensorboard_dir
    self.log = log
    self.active = False

  def maybe_start(self, step: int) -> None:
    """Before running step `step + 1` (`step` steps are done)."""
    if self.enabled and not self.active and step == self.start:
      jax.profiler.start_trace(self.folder)
      self.active = True
      self.log(f"profiling steps {self.start + 1}..{self.stop} into {self.folder}")

  def maybe_stop(self, step: int, outputs: Any = None) -> None:
    """After dispatching a step (`step` steps are done); `outputs` are its results, waited for."""
    if self.active and step >= self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """End the trace if one is running (the run ended or failed inside the window). Called from the
    loop's `finally`, so a failure to write the trace is logged rather than hiding the run's own error."""
    if self.active:
      self.active = False
      try:
        jax.profiler.stop_trace()
      except Exception as e:  # noqa: BLE001
        self.log(f"profiler: writing the trace into {self.folder} failed: {e}")
