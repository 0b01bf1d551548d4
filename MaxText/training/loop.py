"""The training loop: `Loop(config).run()` trains `steps` steps, resuming the run from its newest intact checkpoint.

The loop owns what lives for one run: the checkpointer, the metric logger, the divergence guard, the metric
window, the profiler, the stop flag and the data. Its config is decided before anything is built (a resumed
run keeps the learning-rate schedule its checkpoint saved), so nothing changes it afterwards.

A step is dispatched before the previous window's metrics are fetched, so the host never waits for the device
except at log, evaluation and save steps; the final evaluation comes before the final save, so a kill cannot
lose it; SIGTERM/SIGINT stops after a checkpoint (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any

import jax

from MaxText import fs, models
from MaxText.checkpoint import checkpointing
from MaxText.errors import CheckpointError, ConfigError, Preempted, StorageError
from MaxText.observe import metrics, profiler
from MaxText.parallel import sharding, sharding_report
from MaxText.training import divergence, faults, train_state
from MaxText.training.run import Run, agree_max


class StopFlag:
  """SIGTERM or SIGINT: the loop saves a checkpoint after the current step and the run exits with
  EXIT_PREEMPTED (resume by running the same command). A second signal stops at once: Preempted is raised
  wherever the main thread is, and a save in flight is abandoned (the earlier checkpoints are untouched)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  active: StopFlag | None = None

  def __init__(self):
    self.requested = ""  # the name of the first signal
    self.previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self.previous[sig] = signal.signal(sig, self._handle)
      StopFlag.active = self
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      raise Preempted(f"{name} again: stopped at once; a checkpoint being written was abandoned and the earlier "
                      f"ones are intact (run the same command to resume)")
    self.requested = name
    print(f"{name}: stopping after the next checkpoint ({name} again stops at once)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, previous in self.previous.items():
      signal.signal(sig, previous)
    if StopFlag.active is self:
      StopFlag.active = None

  @classmethod
  def current(cls):
    """The flag in force (the CLI installs one around the whole run, closing included), else a new one."""
    return contextlib.nullcontext(cls.active) if cls.active is not None else cls()


def kept_schedule(config, saved: int | None):
  """The config a resumed run trains with. The schedule's length is the run's: a resume with another `steps`
  keeps the saved length, unless learning_rate_schedule_steps is given to re-plan it."""
  if saved is None or saved == config.learning_rate_schedule_steps or not config.schedule_follows_steps:
    return config
  return config.replace(learning_rate_schedule_steps=saved)


def _schedule_note(asked, kept, saved: int | None, schedule) -> str:
  """What a resumed run says about its schedule ("" when nothing changed)."""
  if saved is None or saved == asked.learning_rate_schedule_steps:
    return ""
  if kept is asked:
    return (f"learning_rate_schedule_steps={asked.learning_rate_schedule_steps} re-plans the learning-rate "
            f"schedule (the checkpoint's was {saved} steps)")
  past = (f"; past step {saved} the learning rate holds its final {float(schedule(saved)):.3g}"
          if asked.steps > saved else "")
  return (f"steps={asked.steps}: the run keeps its saved {saved}-step learning-rate schedule{past} "
          f"(learning_rate_schedule_steps=N re-plans it)")


def _meta(config) -> dict:
  """What a checkpoint records about the run besides its state (checkpointing adds the checksums)."""
  return {"schedule_steps": config.learning_rate_schedule_steps}


class Loop:
  """One run of training: open (restore or init), step to `steps` or a signal, evaluate, save, close."""

  def __init__(self, config, *, progress: bool = True):
    saved = checkpointing.saved_meta(config.checkpoint_dir).get("schedule_steps") \
        if config.enable_checkpointing else None
    self.config = kept_schedule(config, saved)
    self.progress = progress
    self.run = Run(self.config)
    self._schedule_note = _schedule_note(config, self.config, saved, self.run.schedule)
    self.result: dict[str, Any] = {}
    self.checkpointer = self.logger = self.train_data = self.eval_fn = self.window = None
    self.guard = divergence.Guard.from_config(self.config)
    self.flops_per_token = models.get_family(self.config.decoder_block).flops_per_token(self.config)

  # --- the run ---

  def run_to_end(self) -> dict[str, Any]:
    """Train to `steps` (or a signal); the last metrics, with "stopped_by" set to the signal's name when
    SIGTERM/SIGINT ended it early. DivergenceError when a step is not finite (nan_policy); Preempted on a
    second signal; StorageError (a ConfigError) when a folder cannot be written or a background save fails."""
    config, run = self.config, self.run
    # Folders this call creates; if it fails, those it left empty are removed (a bad key or file must not
    # leave an empty run behind).
    created = fs.missing((config.run_dir, config.checkpoint_dir), "base_output_directory")
    if fs.is_remote(config.run_dir):  # a bucket out of reach fails here, in one line (local folders: below)
      fs.check_writable(config.run_dir, "base_output_directory")
    completed = False
    with sharding.use_mesh(run.mesh, run.rules), StopFlag.current() as self.stop:
      try:
        state, start_step = self._open()
        if start_step >= config.steps:
          self._nothing_left(state, start_step)
        else:
          self._train(state, start_step)
        completed = True
      finally:
        self._close(completed, abandon=isinstance(sys.exc_info()[1], Preempted))
        if not completed:
          for folder in reversed(created):
            fs.remove_if_empty(folder)
    return self.result

  def _open(self) -> tuple[dict, int]:
    """Folders, data, checkpointer, the state (restored or fresh), the logger and the evaluation step."""
    config, run = self.config, self.run
    if run.is_primary:
      fs.ensure_folder(config.run_dir, "run folder")
    self.train_data = run.data(config.train_split)
    if config.eval_interval:
      run.data(config.eval_split)  # a missing or bad evaluation split fails now, not at the first evaluation
    if config.enable_checkpointing:
      self.checkpointer = checkpointing.Checkpointer.from_config(config)
      self.checkpointer.ensure_space(run.abstract)
    state, start_step = self._restore_or_init()
    self.logger = metrics.MetricLogger(config, start_step=start_step, is_primary=run.is_primary,
                                       progress=self.progress, resume=True)
    if run.is_primary:
      self._write_config()
    self.peak = metrics.peak_flops_per_device(config)
    self._describe(start_step)
    self.eval_fn = run.evaluate_fn() if config.eval_interval else None
    return state, start_step

  def _restore_or_init(self) -> tuple[dict, int]:
    """The newest intact checkpoint of the run (state + data position), else a fresh state."""
    run = self.run
    target = train_state.with_shardings(run.abstract, run.shardings)
    latest = self.checkpointer.restore_latest(target, run.say) if self.checkpointer else None
    if latest is None:
      return run.init_state(), 0
    state, data_state, meta, step = latest
    saved = meta.get("schedule_steps")
    if saved is not None and saved != self.config.learning_rate_schedule_steps and self.config.schedule_follows_steps:
      raise CheckpointError(f"checkpoint step {step} in {self.checkpointer.directory} has a {saved}-step learning-rate "
                            f"schedule, the newer damaged steps another; set learning_rate_schedule_steps={saved}")
    self.train_data.set_state(data_state)
    if self._schedule_note:
      run.say(self._schedule_note)
    return state, step

  def _nothing_left(self, state, step: int) -> None:
    if self.eval_fn is not None and not self.logger.logged(step, "eval"):
      self.logger.message(f"step {step}: the final evaluation is missing (the run stopped before it); running it")
      self._evaluate(state, step)
    else:
      self.logger.message(f"run already trained to step {step} >= steps={self.config.steps}; nothing to do")
    self.result["step"] = step

  def _train(self, state, start_step: int) -> None:
    config, run = self.config, self.run
    batch = run.global_batch(next(self.train_data))
    start = time.perf_counter()
    step_fn = run.compile_step(state, batch)
    self.result["compile_seconds"] = time.perf_counter() - start
    self.logger.message(f"compiled the train step in {self.result['compile_seconds']:.1f} s")
    tokens_per_step = config.global_batch_size_to_train_on * config.max_target_length
    self.window = metrics.MetricWindow(start_step, tokens_per_step, self.flops_per_token, config.num_devices,
                                       self.peak[0])
    trace = profiler.Profiler(config, start_step, self.logger.message)
    try:
      state, step = self._steps(state, start_step, step_fn, batch, trace)
    finally:
      trace.close()
    if step == config.steps and self.eval_fn is not None:
      self._evaluate(state, step)
    if self.checkpointer is not None:
      self._save(state, step, force=True)
    if self.stop.requested and step < config.steps:
      self.result["stopped_by"] = self.stop.requested
    self.result["step"] = step

  def _steps(self, state, step: int, step_fn, batch, trace) -> tuple[dict, int]:
    """The step loop, from `step` to `steps` or a signal; returns (state, step)."""
    config, run, start_step = self.config, self.run, step
    while step < config.steps:
      trace.maybe_start(step)
      if step > start_step:
        batch = run.global_batch(next(self.train_data))
      state, step_metrics = step_fn(state, batch)
      step += 1
      trace.maybe_stop(step, step_metrics)
      faults.reached("step", step)
      self.guard.add(step_metrics, step)
      self._log_window()  # the previous window's values, now that this step is queued behind them
      self.window.add(step_metrics)
      if step % config.log_period == 0 or step == config.steps:
        self.window.close(step)
        self.logger.advance(step)
      if self.checkpointer is not None:
        self.checkpointer.check()  # a failed background save stops the run now, not at the next save
      if step == config.steps:
        break  # the final evaluation comes before the final save, so a kill cannot lose it
      if config.eval_interval and step % config.eval_interval == 0:
        self._log_window()
        self._evaluate(state, step)
        self.window.restart_clock(step)
      if self.checkpointer is not None and self.checkpointer.due(step):
        self._save(state, step)
      if self._stop_agreed(step):
        self.logger.message(f"{self.stop.requested or 'SIGTERM'}: stopping at step {step} after a checkpoint")
        break
    self._log_window()
    return state, step

  # --- the pieces ---

  def _log_window(self) -> None:
    row = self.window.fetch()
    if row is not None:
      logged_step = row.pop("step")
      self.logger.log(logged_step, row)
      self.result.update(step=logged_step, **row)
      self._check_finite()  # the fetch waited for those steps already

  def _evaluate(self, state, step: int) -> None:
    self._check_finite()
    row = self.run.evaluate(self.eval_fn, state["params"], self.config.eval_split, at_step=step)
    self.logger.log(step, row, prefix="eval")
    self.result.update({f"eval_{k}": v for k, v in row.items()})

  def _save(self, state, step: int, force: bool = False) -> None:
    self._check_finite()
    self.checkpointer.save(step, state, self.train_data.get_state(), _meta(self.config), force=force)
    faults.reached("save", step)

  def _check_finite(self) -> None:
    steps = self.checkpointer.all_steps() if self.checkpointer is not None else []
    self.guard.check(max(steps) if steps else None)

  def _stop_agreed(self, step: int) -> bool:
    """Whether any process saw SIGTERM; processes compare notes at log steps so they stop together."""
    requested = bool(self.stop.requested)
    if jax.process_count() == 1:
      return requested
    if step % self.config.log_period:
      return False
    return agree_max(int(requested)) > 0

  def _write_config(self) -> None:
    config = self.config
    path = fs.join(config.run_dir, "config.yml")
    try:
      fs.write_text(path, config.to_yaml())  # a failure to open is a one-line StorageError naming the path
    except OSError as e:  # one while writing (a full disk)
      raise StorageError(f"cannot write {path}: {fs.describe_os_error(e)}") from None
    self.logger.write_text("config", "```\n" + config.to_yaml() + "\n```")

  def _describe(self, start_step: int) -> None:
    config, run = self.config, self.run
    peak, peak_source = self.peak
    self.logger.message(
        f"{config.model_name} ({config.decoder_block}): {run.spec.num_params:,} parameters, "
        f"{self.flops_per_token / 1e6:,.1f} MFLOPs/token; mesh {dict(run.mesh.shape)}; "
        f"global batch {config.global_batch_size_to_train_on} x {config.max_target_length} tokens; "
        f"peak {peak / 1e12:.2f} TFLOP/s/device ({peak_source})")
    if config.print_sharding:
      self.logger.message(sharding_report.format_parameters(run.spec, run.abstract, run.shardings))
    if start_step:
      self.logger.message(f"resumed from {config.checkpoint_dir} at step {start_step}")

  def _close(self, completed: bool, abandon: bool) -> None:
    """Close the writers. On success a failed background save raises here; after another error it is
    dropped so the first error is the one reported; after a second signal the save in flight is abandoned."""
    try:
      if self.checkpointer is not None:
        if completed:
          self.checkpointer.close()
        else:
          try:
            self.checkpointer.close(abandon=abandon)
          except ConfigError:
            pass
    finally:
      if self.logger is not None:
        self.logger.close()


def train_and_evaluate(config, *, progress: bool = True) -> dict[str, Any]:
  """Train `config.steps` steps, resuming the run from its newest intact checkpoint; the last metrics, with
  "stopped_by" when a signal ended it early (see `Loop.run_to_end`)."""
  return Loop(config, progress=progress).run_to_end()
