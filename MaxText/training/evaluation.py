"""`mode=validation|test` (and eval.py): the loss of a run's latest checkpoint, or of `load_parameters_path`, on
that split; only the parameters are read."""

from __future__ import annotations

import sys

from MaxText.checkpoint import checkpointing
from MaxText.observe import metrics
from MaxText.parallel import sharding
from MaxText.training.run import Run


def evaluate_checkpoint(config) -> dict[str, float]:
  run = Run(config)
  split = config.eval_split if config.mode == "validation" else config.test_split
  with sharding.use_mesh(run.mesh, run.rules):
    params, step, _ = checkpointing.run_parameters(config, run.abstract_params(), f"mode={config.mode}",
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
