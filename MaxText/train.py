"""Train (or evaluate) a model.

  python MaxText/train.py MaxText/configs/base_v2.yml run_name=demo [key=value ...]
  python MaxText/train.py --help | --list-models
  python MaxText/train.py MaxText/configs/base_v2.yml model_name=Llama2Medium --count-params

Running the same command again resumes from the run's latest checkpoint. `mode=validation` or
`mode=test` evaluates the latest checkpoint on that split instead of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

if __package__ in (None, ""):  # `python MaxText/train.py` puts MaxText/ itself on the path, not the repo
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from MaxText import errors, pyconfig, startup  # noqa: E402  (after the path fix)
from MaxText.errors import ConfigError, DivergenceError, Preempted  # noqa: E402


def _global_batch(batch: dict, sharding) -> dict:
  """Per-process numpy rows -> one global array per key, already split over the batch axes."""
  import jax  # noqa: PLC0415

  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _agree_max(value: int) -> int:
  """The largest `value` over all processes (so every process runs the same number of steps)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


class _StopFlag:
  """SIGTERM or SIGINT: the loop saves a checkpoint after the current step and the run exits with
  EXIT_PREEMPTED (resume by running the same command). A second signal stops at once: Preempted is raised
  wherever the main thread is, and a save in flight is abandoned (the earlier checkpoints are untouched)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  active: "_StopFlag | None" = None

  def __init__(self):
    self.requested = ""  # the name of the first signal
    self.previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self.previous[sig] = signal.signal(sig, self._handle)
      _StopFlag.active = self
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
    if _StopFlag.active is self:
      _StopFlag.active = None


def _stop_flag():
  """The stop flag in force (the CLI installs one around the whole run, closing included), else a new one."""
  return contextlib.nullcontext(_StopFlag.active) if _StopFlag.active is not None else _StopFlag()


class Run:
  """Everything a run builds once: mesh, model spec, optimizer, shardings, compiled steps."""

  def __init__(self, config, devices=None):
    """`devices`: the mesh's devices (default: this job's first `num_devices`); train_compile.py passes the
    compile-only devices of a TPU topology."""
    import jax  # noqa: PLC0415

    from MaxText.parallel import sharding  # noqa: PLC0415
    from MaxText.training import optimizers, train_state  # noqa: PLC0415

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
    from MaxText import input_pipeline  # noqa: PLC0415

    return input_pipeline.create_iterator(self.config, split, process_index=self.process_index,
                                          process_count=self.process_count)

  def restore_or_init(self, checkpointer, train_data, say: Callable[[str], None] = print) -> tuple[dict, int]:
    """The newest intact checkpoint of the run (state + data position), else fresh or `load_parameters_path`.
    Damaged steps and a kept learning-rate schedule are reported through `say`."""
    from MaxText.checkpoint import checkpointing  # noqa: PLC0415
    from MaxText.training import train_state  # noqa: PLC0415

    target = train_state.with_shardings(self.abstract, self.shardings)
    latest = checkpointer.restore_latest(target, say) if checkpointer else None
    if latest is not None:
      state, data_state, meta, step = latest
      if train_data is not None:
        train_data.set_state(data_state)
      self._resume_schedule(meta.get("schedule_steps"), say)
      return state, step
    state = train_state.create_sharded(self.config, self.spec, self.tx, self.shardings)
    if self.config.load_parameters_path:
      abstract_params = train_state.with_shardings(self.spec.shapes, self.shardings["params"])
      params = checkpointing.load_parameters(self.config.load_parameters_path, abstract_params)
      state = {**state, "params": params}
    return state, 0

  def train_step_fn(self):
    """The jitted train step with the state's shardings, donating the state (lower it to compile)."""
    import jax  # noqa: PLC0415

    from MaxText.training import train_step  # noqa: PLC0415

    return jax.jit(train_step.make_train_step(self.config, self.spec, self.tx, self.schedule),
                   in_shardings=(self.shardings, self.batch_sharding),
                   out_shardings=(self.shardings, None), donate_argnums=(0,))

  def _resume_schedule(self, saved: int | None, say: Callable[[str], None]) -> None:
    """The schedule's length is the run's: a resume with another `steps` keeps the saved length, unless
    learning_rate_schedule_steps is given to re-plan it."""
    config = self.config
    if saved is None or saved == config.learning_rate_schedule_steps:
      return
    if not config.schedule_follows_steps:
      say(f"learning_rate_schedule_steps={config.learning_rate_schedule_steps} re-plans the learning-rate schedule "
          f"(the checkpoint's was {saved} steps)")
      return
    self.use_schedule(saved)
    past = (f"; past step {saved} the learning rate holds its final {float(self.schedule(saved)):.3g}"
            if config.steps > saved else "")
    say(f"steps={config.steps}: the run keeps its saved {saved}-step learning-rate schedule{past} "
        f"(learning_rate_schedule_steps=N re-plans it)")

  def use_schedule(self, schedule_steps: int) -> None:
    """Rebuild the optimizer for a schedule of `schedule_steps` (the state's structure does not change)."""
    from MaxText.training import optimizers  # noqa: PLC0415

    self.config = dataclasses.replace(self.config, learning_rate_schedule_steps=schedule_steps)
    self.tx, self.schedule = optimizers.create(self.config, self.spec.roles)

  def evaluate_fn(self):
    import jax  # noqa: PLC0415

    from MaxText import input_pipeline  # noqa: PLC0415
    from MaxText.training import train_step  # noqa: PLC0415

    token_bytes = input_pipeline.token_byte_lengths(self.config)
    return jax.jit(train_step.make_eval_step(self.config, self.spec, token_bytes),
                   in_shardings=(self.shardings["params"], self.batch_sharding))

  def evaluate(self, eval_fn, params, split: str, at_step: int = -1) -> dict[str, float]:
    """Token-weighted loss over `eval_steps` batches of `split` (-1: the whole split)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from MaxText.training import faults, train_step  # noqa: PLC0415

    data = self.data(split)
    steps = self.config.eval_steps if self.config.eval_steps > 0 else _agree_max(data.count_batches())
    rows = self.config.eval_batch_size // self.process_count
    # A process that runs out first contributes empty rows, so every process runs the same collectives.
    empty = {k: np.zeros((rows, self.config.max_target_length), np.int32) for k in train_step.BATCH_KEYS}
    totals = None
    for i in range(steps):
      batch = next(data, None) or empty
      sums = eval_fn(params, _global_batch(batch, self.batch_sharding))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
      if i == 0:
        faults.reached("eval", at_step)
    totals = jax.device_get(totals)
    tokens = float(totals["tokens"])
    loss = float(totals["nll_sum"]) / max(tokens, 1.0)
    row = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if float(totals.get("bytes", 0.0)) > 0:  # data with a tokenizer: nats per token -> bits per byte of text
      row["bits_per_byte"] = float(totals["nll_sum"]) / math.log(2.0) / float(totals["bytes"])
    return row


def train_and_evaluate(config, *, progress: bool = True) -> dict[str, Any]:
  """Train `config.steps` steps (resuming the run from its newest intact checkpoint); returns the last
  metrics, with "stopped_by" set to the signal's name when SIGTERM/SIGINT ended it early.

  DivergenceError when a step is not finite (nan_policy); Preempted on a second signal; StorageError
  (a ConfigError) when a folder cannot be written or a background save fails.
  """
  from MaxText import fs  # noqa: PLC0415
  from MaxText.checkpoint import checkpointing  # noqa: PLC0415
  from MaxText.observe import metrics  # noqa: PLC0415
  from MaxText.parallel import sharding  # noqa: PLC0415
  from MaxText.training import divergence  # noqa: PLC0415

  run = Run(config)
  result: dict[str, Any] = {}
  # Folders this call creates; if it fails, those it left empty are removed (a bad key or file must not
  # leave an empty run behind).
  created = fs.missing((config.run_dir, config.checkpoint_dir), "base_output_directory")
  if fs.is_remote(config.run_dir):  # a bucket out of reach fails here, in one line (local folders: storage)
    fs.check_writable(config.run_dir, "base_output_directory")
  with sharding.use_mesh(run.mesh, run.rules), _stop_flag() as stop:
    checkpointer = logger = None
    completed = False
    try:
      if run.is_primary:
        fs.ensure_folder(config.run_dir, "run folder")
      train_data = run.data(config.train_split)
      if config.eval_interval:
        run.data(config.eval_split)  # a missing or bad evaluation split fails now, not at the first evaluation
      checkpointer = checkpointing.Checkpointer.from_config(config) if config.enable_checkpointing else None
      if checkpointer is not None:
        checkpointer.ensure_space(run.abstract)
      state, start_step = run.restore_or_init(checkpointer, train_data, say=run.say)
      config = run.config  # a resumed run may keep its saved learning-rate schedule
      logger = metrics.MetricLogger(config, start_step=start_step, is_primary=run.is_primary, progress=progress,
                                    resume=True)
      if run.is_primary:
        _write_config(config, logger)
      peak = metrics.peak_flops_per_device(config)
      _describe_run(run, logger, start_step, peak)
      eval_fn = run.evaluate_fn() if config.eval_interval else None
      if start_step >= config.steps:
        if eval_fn is not None and not logger.logged(start_step, "eval"):
          logger.message(f"step {start_step}: the final evaluation is missing (the run stopped before it); running it")
          result.update(_evaluate(run, eval_fn, state, start_step, logger))
        else:
          logger.message(f"run already trained to step {start_step} >= steps={config.steps}; nothing to do")
        completed = True
        return {"step": start_step, **result}
      guard = divergence.Guard.from_config(config)
      state, step = _train(run, state, start_step, train_data, checkpointer, logger, eval_fn, guard, stop, result,
                           peak[0])
      if step == config.steps and eval_fn is not None:
        result.update(_evaluate(run, eval_fn, state, step, logger, guard, checkpointer))
      if checkpointer is not None:
        _check_finite(guard, checkpointer)
        checkpointer.save(step, state, train_data.get_state(), _meta(config), force=True)
        faults_reached("save", step)
      if stop.requested and step < config.steps:
        result["stopped_by"] = stop.requested
      result["step"] = step
      completed = True
    finally:
      _close(checkpointer, logger, completed, abandon=isinstance(sys.exc_info()[1], Preempted))
      if not completed:
        _remove_empty(reversed(created))
  return result


def faults_reached(kind: str, step: int) -> None:
  from MaxText.training import faults  # noqa: PLC0415

  faults.reached(kind, step)


def _train(run, state, start_step, train_data, checkpointer, logger, eval_fn, guard, stop, result, peak):
  """The step loop, from `start_step` to `steps` or a signal; returns (state, step)."""
  from MaxText.observe import metrics, profiler  # noqa: PLC0415

  config = run.config
  flops_per_token = _family(config).flops_per_token(config)
  tokens_per_step = config.global_batch_size_to_train_on * config.max_target_length
  step_fn = run.train_step_fn()
  batch = _global_batch(next(train_data), run.batch_sharding)
  compile_start = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  result["compile_seconds"] = time.perf_counter() - compile_start
  logger.message(f"compiled the train step in {result['compile_seconds']:.1f} s")

  step = start_step
  window = metrics.MetricWindow(step, tokens_per_step, flops_per_token, config.num_devices, peak)
  trace = profiler.Profiler(config, start_step, logger.message)
  try:
    return _steps(run, state, step, start_step, step_fn, batch, train_data, checkpointer, logger, eval_fn, guard,
                  stop, result, window, trace)
  finally:
    trace.close()


def _steps(run, state, step, start_step, step_fn, batch, train_data, checkpointer, logger, eval_fn, guard, stop,
           result, window, trace):
  config = run.config

  def log_window():
    row = window.fetch()
    if row is not None:
      logged_step = row.pop("step")
      logger.log(logged_step, row)
      result.update(step=logged_step, **row)
      _check_finite(guard, checkpointer)  # the fetch waited for those steps already

  while step < config.steps:
    trace.maybe_start(step)
    if step > start_step:
      batch = _global_batch(next(train_data), run.batch_sharding)
    state, step_metrics = step_fn(state, batch)
    step += 1
    trace.maybe_stop(step, step_metrics)
    faults_reached("step", step)
    guard.add(step_metrics, step)
    log_window()  # the previous window's values, now that this step is queued behind them
    window.add(step_metrics)
    if step % config.log_period == 0 or step == config.steps:
      window.close(step)
      logger.advance(step)
    if checkpointer is not None:
      checkpointer.check()  # a failed background save stops the run now, not at the next save
    if step == config.steps:
      break  # the final evaluation comes before the final save, so a kill cannot lose it
    if config.eval_interval and step % config.eval_interval == 0:
      log_window()
      result.update(_evaluate(run, eval_fn, state, step, logger, guard, checkpointer))
      window.restart_clock(step)
    if checkpointer is not None and checkpointer.due(step):
      _check_finite(guard, checkpointer)
      checkpointer.save(step, state, train_data.get_state(), _meta(config))
      faults_reached("save", step)
    if _stop_agreed(bool(stop.requested), step, config):
      logger.message(f"{stop.requested or 'SIGTERM'}: stopping at step {step} after a checkpoint")
      break
  log_window()
  return state, step


def _evaluate(run, eval_fn, state, step, logger, guard=None, checkpointer=None) -> dict[str, float]:
  if guard is not None:
    _check_finite(guard, checkpointer)
  row = run.evaluate(eval_fn, state["params"], run.config.eval_split, at_step=step)
  logger.log(step, row, prefix="eval")
  return {f"eval_{k}": v for k, v in row.items()}


def _check_finite(guard, checkpointer) -> None:
  steps = checkpointer.all_steps() if checkpointer is not None else []
  guard.check(max(steps) if steps else None)


def _meta(config) -> dict:
  """What a checkpoint records about the run besides its state (checkpointing adds the checksums)."""
  return {"schedule_steps": config.learning_rate_schedule_steps}


def _write_config(config, logger) -> None:
  from MaxText import fs  # noqa: PLC0415

  path = fs.join(config.run_dir, "config.yml")
  if fs.is_remote(path):
    fs.write_text(path, config.to_yaml())  # its errors are one-line StorageErrors naming the path
    logger.write_text("config", "```\n" + config.to_yaml() + "\n```")
    return
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write(config.to_yaml())
  except OSError as e:
    raise errors.StorageError(f"cannot write {path}: {fs.describe_os_error(e)}") from None
  logger.write_text("config", "```\n" + config.to_yaml() + "\n```")


def _describe_run(run, logger, start_step: int, peak: tuple[float, str]) -> None:
  config = run.config
  peak, peak_source = peak
  logger.message(
      f"{config.model_name} ({config.decoder_block}): {run.spec.num_params:,} parameters, "
      f"{_family(config).flops_per_token(config) / 1e6:,.1f} MFLOPs/token; mesh {dict(run.mesh.shape)}; "
      f"global batch {config.global_batch_size_to_train_on} x {config.max_target_length} tokens; "
      f"peak {peak / 1e12:.2f} TFLOP/s/device ({peak_source})")
  if config.print_sharding:
    from MaxText.parallel import sharding_report  # noqa: PLC0415

    logger.message(sharding_report.format_parameters(run.spec, run.abstract, run.shardings))
  if start_step:
    logger.message(f"resumed from {config.checkpoint_dir} at step {start_step}")


def _close(checkpointer, logger, completed: bool, abandon: bool) -> None:
  """Close the writers. On success a failed background save raises here; after another error it is
  dropped so the first error is the one reported; after a second signal the save in flight is abandoned."""
  try:
    if checkpointer is not None:
      if completed:
        checkpointer.close()
      else:
        try:
          checkpointer.close(abandon=abandon)
        except ConfigError:
          pass
  finally:
    if logger is not None:
      logger.close()


def _remove_empty(folders) -> None:
  from MaxText import fs  # noqa: PLC0415

  for folder in folders:
    fs.remove_if_empty(folder)


def _stop_agreed(requested: bool, step: int, config) -> bool:
  """Whether any process saw SIGTERM; processes compare notes at log steps so they stop together."""
  import jax  # noqa: PLC0415

  if jax.process_count() == 1:
    return requested
  if step % config.log_period:
    return False
  return _agree_max(int(requested)) > 0


def evaluate_checkpoint(config) -> dict[str, float]:
  """mode=validation|test: the loss of the run's latest checkpoint (or load_parameters_path) on that split.
  Only the parameters are read."""
  from MaxText.checkpoint import checkpointing  # noqa: PLC0415
  from MaxText.observe import metrics  # noqa: PLC0415
  from MaxText.parallel import sharding  # noqa: PLC0415
  from MaxText.training import train_state  # noqa: PLC0415

  run = Run(config)
  split = config.eval_split if config.mode == "validation" else config.test_split
  with sharding.use_mesh(run.mesh, run.rules):
    abstract_params = train_state.with_shardings(run.spec.shapes, run.shardings["params"])
    params, step, _ = checkpointing.run_parameters(config, abstract_params, f"mode={config.mode}",
                                                   say=lambda text: print(text, file=sys.stderr, flush=True))
    row = run.evaluate(run.evaluate_fn(), params, split)
  logger = metrics.MetricLogger(config, start_step=step, is_primary=run.is_primary, progress=False)
  logger.log(step, row, prefix=config.mode)
  logger.close()
  if run.is_primary:
    bpb = f", {row['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in row else ""
    print(f"{config.mode} split {split!r} at step {step}: loss {row['loss']:.4f}, "
          f"perplexity {row['perplexity']:.3f}{bpb}, {row['tokens']:,.0f} tokens", flush=True)
  return {"step": step, **row}


def _family(config):
  from MaxText import models  # noqa: PLC0415

  return models.get_family(config.decoder_block)


def list_models() -> str:
  """The registry as a markdown table: every preset with its family, shape and parameter count."""
  from MaxText.training import train_state  # noqa: PLC0415

  rows = [("model_name", "family", "layers", "width", "heads", "parameters")]
  for name in pyconfig.preset_names():
    config = startup.load_config([None, str(pyconfig.BASE_CONFIG)], model_name=name, num_devices=1,
                                 per_device_batch_size=1.0, ici_fsdp_parallelism=-1)
    spec = train_state.model_spec(config)
    rows.append((f"`{name}`", config.decoder_block, str(config.base_num_decoder_layers), str(config.base_emb_dim),
                 str(config.base_num_query_heads), f"{spec.num_params / 1e6:,.1f}M"))
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def count_params(config) -> str:
  """Parameters of the configured model (total, embedding tables, the rest) and its FLOPs per token."""
  import jax  # noqa: PLC0415

  from MaxText.training import train_state  # noqa: PLC0415

  spec = train_state.model_spec(config)
  sizes = jax.tree.map(lambda x: x.size, spec.shapes)
  embedding = sum(n for n, role in zip(jax.tree.leaves(sizes), jax.tree.leaves(spec.roles)) if role == "embedding")
  lines = [f"model {config.model_name} ({config.decoder_block})",
           f"  parameters      {spec.num_params:>16,}",
           f"  input embedding {embedding:>16,}",
           f"  the rest        {spec.num_params - embedding:>16,}",
           f"  training FLOPs per token at length {config.max_target_length}: {_family(config).flops_per_token(config):,.0f}"]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  flags = [a for a in argv[1:] if a.startswith("--") and "=" not in a]
  try:
    if "--help" in flags or "-h" in argv[1:]:
      from MaxText import validation  # noqa: PLC0415

      print(pyconfig.help_text(validation.choices()))
      return 0
    if "--list-models" in flags:
      print(list_models())
      return 0
    counting = "--count-params" in flags
    flags = [f for f in flags if f != "--count-params"]
    if flags:
      raise ConfigError(f"unknown option {flags[0]!r} (options: --help, --list-models, --count-params)")
    argv = [a for a in argv if a != "--count-params"]
    # Evaluating an existing run: its config.yml supplies the keys the command line does not.
    config = startup.load_config(argv, for_run=pyconfig.load(argv)["mode"] != "train")
    if counting:
      print(count_params(config))
    elif config.mode == "train":
      with _stop_flag():  # installed until the checkpoints are closed, not only around the loop
        if train_and_evaluate(config).get("stopped_by"):
          return errors.EXIT_PREEMPTED
    else:
      evaluate_checkpoint(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_ERROR
  except DivergenceError as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_DIVERGED
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    return errors.EXIT_PREEMPTED
  except OSError as e:  # a disk or permission fault outside the paths checked before training
    where = f" {e.filename}" if e.filename else ""
    print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
    return errors.EXIT_ERROR
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return errors.EXIT_OK


if __name__ == "__main__":
  startup.exit_now(main())
