"""Training throughput of the CPU presets: step time, tokens/s, compile time, peak memory, MFU.

  python benchmarks/train_throughput.py [--models Llama2Tiny,Llama2Small] [--steps 10] [key=value ...]

The step is the trainer's own (Run.compile_step: jitted and donated) on batches from the real input
pipeline (the embedded default corpus unless dataset_path= is given). MFU's denominator is the float32
matmul peak measured in this same run (a 2048^3 jitted matmul, median of 5; the larger of two
measurements, before and after the models, so MFU is not flattered by a slow moment). The input
pipeline is also timed alone, so its rate can be compared with the trainer's.
Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from MaxText import input_pipeline, models, startup
from MaxText.config import loader
from MaxText.observe import metrics
from MaxText.parallel import sharding
from MaxText.training.run import Run

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def pipeline_rate(config, seconds: float = 5.0) -> float:
  """Tokens per second the input pipeline alone delivers (after its first batch)."""
  data = input_pipeline.create_iterator(config, config.train_split)
  next(data)
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(data)
    batches += 1
  return batches * config.global_batch_size_to_train_on * config.max_target_length / (time.perf_counter() - start)


def measure(model_name: str, steps: int, overrides: list[str]) -> dict:
  config = startup.load_config([None, str(loader.BASE_CONFIG), f"model_name={model_name}", "num_devices=1",
                                "ici_fsdp_parallelism=1", *overrides], env={})
  run = Run(config)
  family = models.get_family(config.decoder_block)
  flops_per_token = family.flops_per_token(config)
  tokens_per_step = config.global_batch_size_to_train_on * config.max_target_length
  with sharding.use_mesh(run.mesh, run.rules):
    state = run.init_state()
    data = run.data(config.train_split)
    batches = [run.global_batch(next(data)) for _ in range(4)]
    start = time.perf_counter()
    compiled = run.compile_step(state, batches[0])
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak_bytes = None
    if memory is not None:
      peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                    - memory.alias_size_in_bytes)
    times = []
    for i in range(steps + 3):
      begin = time.perf_counter()
      state, out = compiled(state, batches[i % len(batches)])
      jax.block_until_ready(out)
      if i >= 3:  # warm-up steps excluded
        times.append(time.perf_counter() - begin)
  step_s = float(np.median(times))
  return {
      "model": model_name, "params": run.spec.num_params, "flops_per_token": flops_per_token,
      "batch": config.global_batch_size_to_train_on, "length": config.max_target_length, "dtype": config.dtype,
      "scan_layers": config.scan_layers, "compile_s": compile_s, "step_s": step_s,
      "step_s_min": float(np.min(times)), "tokens_per_s": tokens_per_step / step_s,
      "achieved_tflops": tokens_per_step * flops_per_token / step_s / 1e12,
      "peak_memory_mb": peak_bytes / 2**20 if peak_bytes is not None else None,
      "pipeline_tokens_per_s": pipeline_rate(config),
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="Llama2Tiny,Llama2Small")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 3 warm-up steps)")
  parser.add_argument("overrides", nargs="*", help="config key=value applied to every model")
  args = parser.parse_args()

  peak_before = metrics.measure_matmul_peak("float32")
  rows = [measure(name, args.steps, args.overrides) for name in args.models.split(",")]
  peak_after = metrics.measure_matmul_peak("float32")
  peak = max(peak_before, peak_after)
  for row in rows:
    row["mfu"] = row["achieved_tflops"] * 1e12 / peak
    row["pipeline_over_trainer"] = row["pipeline_tokens_per_s"] / row["tokens_per_s"]

  header = ("model", "params", "batch x len", "compile s", "step s (median)", "tokens/s", "TFLOP/s", "MFU",
            "peak MiB", "pipeline tok/s", "pipeline / trainer")
  table = [header] + [(
      r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['batch']} x {r['length']}", f"{r['compile_s']:.1f}",
      f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['achieved_tflops']:.3f}", f"{r['mfu']:.1%}",
      f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "n/a",
      f"{r['pipeline_tokens_per_s']:,.0f}", f"{r['pipeline_over_trainer']:.0f}x") for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  print("\n".join(lines))
  print(f"\nfloat32 matmul peak: {peak / 1e12:.3f} TFLOP/s (before {peak_before / 1e12:.3f}, after "
        f"{peak_after / 1e12:.3f}); {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.2f}; "
        f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({
      "rows": rows, "peak_flops": peak, "peak_flops_before": peak_before, "peak_flops_after": peak_after,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind, "load_average": os.getloadavg()[0]},
      "overrides": args.overrides, "steps": args.steps}, indent=2))
  print(f"wrote {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
