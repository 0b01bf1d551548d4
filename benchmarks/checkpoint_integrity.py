"""What saving a checkpoint with checksums costs a training step, side by side in one run.

  python benchmarks/checkpoint_integrity.py [--model Llama2Small] [--steps 36] [--every 3] [key=value ...]

The trainer's own pieces (Run.compile_step, the jitted donated train step, checkpointing.Checkpointer with
asynchronous saves) run one loop: every `--every`-th step saves, alternately with checksums (as the
trainer does) and without (the checksum call replaced by an empty record), and the other steps do not
save. A step's time is one loop iteration as the trainer's loop spends it: dispatch the step, start the
save if it is one (the checksums are computed here, the write goes on in the background), wait for the
step's result. Medians per kind are compared; the issue's target is a saving step at most 5% slower
than a step that does not save. The step after a save is shown too (it shares the CPU with the
background write). Prints a table and writes benchmarks/results/checkpoint_integrity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from MaxText import startup
from MaxText.checkpoint import checkpointing, integrity
from MaxText.config import loader
from MaxText.parallel import sharding
from MaxText.training.run import Run

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_integrity.json"


def measure(model: str, steps: int, every: int, overrides: list[str], folder: str) -> dict:
  config = startup.load_config([None, str(loader.BASE_CONFIG), f"model_name={model}", "num_devices=1",
                                "ici_fsdp_parallelism=1", "dataset_type=synthetic", *overrides], env={})
  run = Run(config)
  real_checksums = integrity.checksums
  kinds, times, checksum_s = [], [], []
  with sharding.use_mesh(run.mesh, run.rules):
    state = run.init_state()
    data = run.data(config.train_split)
    batches = [run.global_batch(next(data)) for _ in range(4)]
    step_fn = run.compile_step(state, batches[0])
    checkpointer = checkpointing.Checkpointer(folder, period=1, keep=2, use_async=True)
    warmup = 3
    saves = 0
    try:
      for i in range(warmup + steps):
        timed = i - warmup
        saving = timed >= 0 and timed % every == every - 1
        with_sums = saving and saves % 2 == 0
        begin = time.perf_counter()
        state, out = step_fn(state, batches[i % len(batches)])
        if saving or i == warmup - 1:  # one untimed save in the warm-up
          integrity.checksums = real_checksums if (with_sums or not saving) else (lambda tree: {})
          start = time.perf_counter()
          checkpointer.save(i + 1, state, {}, {}, force=True)
          checksum_s.append(time.perf_counter() - start) if with_sums else None
          integrity.checksums = real_checksums
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - begin
        if timed < 0:
          continue
        if saving:
          kinds.append("save with checksums" if with_sums else "save without checksums")
          saves += 1
        elif kinds and kinds[-1].startswith("save"):
          kinds.append("step after a save")
        else:
          kinds.append("no save")
        times.append(elapsed)
      checkpointer.close()
    finally:
      integrity.checksums = real_checksums
  # the checksums alone on this state (the part of a save that this issue adds), median of 5
  sums = []
  for _ in range(5):
    start = time.perf_counter()
    integrity.checksums(state)
    sums.append(time.perf_counter() - start)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  by_kind = {k: [t for t, kk in zip(times, kinds) if kk == k] for k in dict.fromkeys(kinds)}
  return {"model": model, "params": run.spec.num_params, "state_mb": nbytes / 2**20,
          "batch": config.global_batch_size_to_train_on, "length": config.max_target_length,
          "median_s": {k: float(np.median(v)) for k, v in by_kind.items()},
          "count": {k: len(v) for k, v in by_kind.items()}, "times": list(zip(kinds, times)),
          "checksums_alone_s": float(np.median(sums))}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("overrides", nargs="*", help="config key=value")
  parser.add_argument("--model", default="Llama2Small")
  parser.add_argument("--every", type=int, default=3, help="every this many steps saves")
  parser.add_argument("--steps", type=int, default=36, help="timed steps (after 3 warm-up steps)")
  args = parser.parse_args()
  folder = tempfile.mkdtemp(prefix="checkpoint-integrity-")
  try:
    r = measure(args.model, args.steps, args.every, args.overrides, os.path.join(folder, "checkpoints"))
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  base = r["median_s"]["no save"]
  header = ("step kind", "steps", "median s", "vs no save")
  table = [header] + [(k, str(r["count"][k]), f"{v:.4f}", f"{v / base - 1:+.1%}") for k, v in r["median_s"].items()]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  print(f"{r['model']}: {r['params'] / 1e6:.1f}M parameters, train state {r['state_mb']:.0f} MiB, batch "
        f"{r['batch']} x {r['length']}")
  print("\n".join(lines))
  saving = r["median_s"].get("save with checksums")
  r["saving_step_slowdown"] = saving / base - 1 if saving else None
  r["target"] = 0.05
  r["meets_target"] = bool(saving is not None and saving / base - 1 <= 0.05)
  without = r["median_s"].get("save without checksums")
  r["checksums_share_of_step"] = r["checksums_alone_s"] / base
  r["with_vs_without_checksums"] = saving / without - 1 if saving and without else None
  print(f"\nchecksums alone: {r['checksums_alone_s'] * 1e3:.1f} ms for {r['state_mb']:.0f} MiB "
        f"({r['checksums_share_of_step']:.1%} of a step); a saving step with checksums vs one without: "
        f"{r['with_vs_without_checksums']:+.1%}")
  print(f"a saving step is "
        f"{r['saving_step_slowdown']:+.1%} vs a step that does not save (target: at most +5%: "
        f"{'met' if r['meets_target'] else 'MISSED'}); {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.2f}")
  r["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind, "load_average": os.getloadavg()[0]}
  r["args"] = vars(args)
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(r, indent=2))
  print(f"wrote {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
