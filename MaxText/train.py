"""Train (or evaluate) a model.

  python MaxText/train.py MaxText/configs/base_v2.yml run_name=demo [key=value ...]
  python MaxText/train.py --help | --list-models
  python MaxText/train.py MaxText/configs/base_v2.yml model_name=Llama2Medium --count-params

Running the same command again resumes from the run's latest checkpoint. `mode=validation` or
`mode=test` evaluates the latest checkpoint on that split instead of training.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any

if __package__ in (None, ""):  # `python MaxText/train.py` puts MaxText/ itself on the path, not the repo
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from MaxText import pyconfig, startup  # noqa: E402  (after the path fix)
from MaxText.errors import ConfigError  # noqa: E402


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
  """Set by SIGTERM; the loop saves a checkpoint and exits cleanly when it sees it."""

  def __init__(self):
    self.requested = False
    self.previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


class Run:
  """Everything a run builds once: mesh, model spec, optimizer, shardings, compiled steps."""

  def __init__(self, config, devices=None):
    """`devices`: the mesh's devices (default: this job's first `num_devices`); train_compile.py passes the
    compile-only devices of a TPU topology."""
    import jax  # noqa: PLC0415

    from MaxText import optimizers, sharding, train_state  # noqa: PLC0415

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

  def data(self, split: str):
    from MaxText import input_pipeline  # noqa: PLC0415

    return input_pipeline.create_iterator(self.config, split, process_index=self.process_index,
                                          process_count=self.process_count)

  def restore_or_init(self, checkpointer, train_data) -> tuple[dict, int]:
    """The latest checkpoint of the run (state + data position), else fresh or `load_parameters_path`."""
    from MaxText import checkpointing, train_state  # noqa: PLC0415

    latest = checkpointer.latest_step() if checkpointer else None
    if latest is not None:
      state, data_state = checkpointer.restore(latest, train_state.with_shardings(self.abstract, self.shardings))
      if train_data is not None:
        train_data.set_state(data_state)
      return state, latest
    state = train_state.create_sharded(self.config, self.spec, self.tx, self.shardings)
    if self.config.load_parameters_path:
      abstract_params = train_state.with_shardings(self.spec.shapes, self.shardings["params"])
      params = checkpointing.load_parameters(self.config.load_parameters_path, abstract_params)
      state = {**state, "params": params}
    return state, 0

  def train_step_fn(self):
    """The jitted train step with the state's shardings, donating the state (lower it to compile)."""
    import jax  # noqa: PLC0415

    from MaxText import train_step  # noqa: PLC0415

    return jax.jit(train_step.make_train_step(self.config, self.spec, self.tx, self.schedule),
                   in_shardings=(self.shardings, self.batch_sharding),
                   out_shardings=(self.shardings, None), donate_argnums=(0,))

  def evaluate_fn(self):
    import jax  # noqa: PLC0415

    from MaxText import input_pipeline, train_step  # noqa: PLC0415

    token_bytes = input_pipeline.token_byte_lengths(self.config)
    return jax.jit(train_step.make_eval_step(self.config, self.spec, token_bytes),
                   in_shardings=(self.shardings["params"], self.batch_sharding))

  def evaluate(self, eval_fn, params, split: str) -> dict[str, float]:
    """Token-weighted loss over `eval_steps` batches of `split` (-1: the whole split)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from MaxText import train_step  # noqa: PLC0415

    data = self.data(split)
    steps = self.config.eval_steps if self.config.eval_steps > 0 else _agree_max(data.count_batches())
    rows = self.config.eval_batch_size // self.process_count
    # A process that runs out first contributes empty rows, so every process runs the same collectives.
    empty = {k: np.zeros((rows, self.config.max_target_length), np.int32) for k in train_step.BATCH_KEYS}
    totals = None
    for _ in range(steps):
      batch = next(data, None) or empty
      sums = eval_fn(params, _global_batch(batch, self.batch_sharding))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    tokens = float(totals["tokens"])
    loss = float(totals["nll_sum"]) / max(tokens, 1.0)
    row = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if float(totals.get("bytes", 0.0)) > 0:  # data with a tokenizer: nats per token -> bits per byte of text
      row["bits_per_byte"] = float(totals["nll_sum"]) / math.log(2.0) / float(totals["bytes"])
    return row


def train_and_evaluate(config, *, progress: bool = True) -> dict[str, Any]:
  """Train `config.steps` steps (resuming the run if it has checkpoints); returns the last metrics."""
  from MaxText import checkpointing, fs, metrics, profiler, sharding  # noqa: PLC0415

  run = Run(config)
  family = _family(config)
  flops_per_token = family.flops_per_token(config)
  tokens_per_step = config.global_batch_size_to_train_on * config.max_target_length
  result: dict[str, Any] = {}
  # Folders this call creates; if it fails, those it left empty are removed (a bad key or file must not
  # leave an empty run behind).
  created = fs.missing((config.run_dir, config.checkpoint_dir), "base_output_directory")
  fs.check_writable(config.run_dir, "base_output_directory")  # a bucket out of reach fails here, in one line
  with sharding.use_mesh(run.mesh, run.rules), _StopFlag() as stop:
    checkpointer = logger = trace = None
    completed = False
    try:
      train_data = run.data(config.train_split)
      if config.eval_interval:
        run.data(config.eval_split)  # a missing or bad evaluation split fails now, not at the first evaluation
      checkpointer = checkpointing.Checkpointer.from_config(config) if config.enable_checkpointing else None
      state, start_step = run.restore_or_init(checkpointer, train_data)
      logger = metrics.MetricLogger(config, start_step=start_step, is_primary=run.is_primary, progress=progress)
      if run.is_primary:
        fs.makedirs(config.run_dir)
        fs.write_text(fs.join(config.run_dir, "config.yml"), config.to_yaml())
        logger.write_text("config", "```\n" + config.to_yaml() + "\n```")
      peak, peak_source = metrics.peak_flops_per_device(config)
      logger.message(
          f"{config.model_name} ({config.decoder_block}): {run.spec.num_params:,} parameters, "
          f"{flops_per_token / 1e6:,.1f} MFLOPs/token; mesh {dict(run.mesh.shape)}; "
          f"global batch {config.global_batch_size_to_train_on} x {config.max_target_length} tokens; "
          f"peak {peak / 1e12:.2f} TFLOP/s/device ({peak_source})")
      if config.print_sharding:
        from MaxText import sharding_report  # noqa: PLC0415

        logger.message(sharding_report.format_parameters(run.spec, run.abstract, run.shardings))
      if start_step:
        logger.message(f"resumed from {config.checkpoint_dir} at step {start_step}")
      if start_step >= config.steps:
        logger.message(f"run already trained to step {start_step} >= steps={config.steps}; nothing to do")
        completed = True
        return {"step": start_step}

      step_fn = run.train_step_fn()
      eval_fn = run.evaluate_fn()
      batch = _global_batch(next(train_data), run.batch_sharding)
      compile_start = time.perf_counter()
      step_fn = step_fn.lower(state, batch).compile()
      result["compile_seconds"] = time.perf_counter() - compile_start
      logger.message(f"compiled the train step in {result['compile_seconds']:.1f} s")

      step = start_step
      trace = profiler.Profiler(config, start_step, logger.message)
      window = metrics.MetricWindow(step, tokens_per_step, flops_per_token, config.num_devices, peak)

      def log_window():
        row = window.fetch()
        if row is not None:
          logged_step = row.pop("step")
          logger.log(logged_step, row)
          result.update(step=logged_step, **row)

      while step < config.steps:
        trace.maybe_start(step)
        if step > start_step:
          batch = _global_batch(next(train_data), run.batch_sharding)
        state, step_metrics = step_fn(state, batch)
        step += 1
        trace.maybe_stop(step, step_metrics)
        log_window()  # the previous window's values, now that this step is queued behind them
        window.add(step_metrics)
        if step % config.log_period == 0 or step == config.steps:
          window.close(step)
          logger.advance(step)
        if config.eval_interval and step % config.eval_interval == 0 and step < config.steps:
          log_window()
          row = run.evaluate(eval_fn, state["params"], config.eval_split)
          logger.log(step, row, prefix="eval")
          result.update({f"eval_{k}": v for k, v in row.items()})
          window.restart_clock(step)
        if checkpointer is not None:
          checkpointer.save(step, state, train_data.get_state())
        if _stop_agreed(stop.requested, step, config):
          logger.message(f"SIGTERM: stopping at step {step} after a checkpoint")
          break
      log_window()
      if step == config.steps and config.eval_interval:
        row = run.evaluate(eval_fn, state["params"], config.eval_split)
        logger.log(step, row, prefix="eval")
        result.update({f"eval_{k}": v for k, v in row.items()})
      if checkpointer is not None:
        checkpointer.save(step, state, train_data.get_state(), force=True)
      result["step"] = step
      completed = True
      return result
    finally:
      if trace is not None:
        trace.close()
      if checkpointer is not None:
        checkpointer.close()
      if logger is not None:
        logger.close()
      if not completed:
        _remove_empty(reversed(created))


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
  from MaxText import checkpointing, metrics, sharding, train_state  # noqa: PLC0415

  run = Run(config)
  split = config.eval_split if config.mode == "validation" else config.test_split
  with sharding.use_mesh(run.mesh, run.rules):
    abstract_params = train_state.with_shardings(run.spec.shapes, run.shardings["params"])
    params, step, _ = checkpointing.run_parameters(config, abstract_params, f"mode={config.mode}")
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
  from MaxText import train_state  # noqa: PLC0415

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

  from MaxText import train_state  # noqa: PLC0415

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
      train_and_evaluate(config)
    else:
      evaluate_checkpoint(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
