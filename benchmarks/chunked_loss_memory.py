"""Peak memory of the train step at a 128k vocabulary, whole logits vs chunked cross-entropy (num_vocab_tiling).

  python benchmarks/chunked_loss_memory.py [--tiles 1,4,16] [--no-measure] [key=value ...]

A narrow, shallow Llama (width 256, 2 layers) with vocab_size=131072, so the output side dominates: at
batch 2 x 1024 the whole float32 logits are 2048 x 131072 x 4 B = 1 GiB, and the backward pass holds their
gradient too. For each tiling the trainer's own step (Run.compile_step: jitted, state donated) is
compiled and XLA's memory analysis read (arguments + outputs + temporaries - donated aliases); then, unless
--no-measure, each tiling runs 3 steps in a fresh process and reports its peak resident memory
(ru_maxrss, which includes the JAX runtime and the compiler) and the median step time of the last 2 steps.
Prints a table and writes benchmarks/results/chunked_loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "chunked_loss_memory.json"
MODEL = ["vocab_size=131072", "base_emb_dim=256", "base_num_decoder_layers=2", "base_num_query_heads=4",
         "base_num_kv_heads=4", "base_mlp_dim=1024", "max_target_length=1024", "per_device_batch_size=2",
         "num_devices=1", "ici_fsdp_parallelism=1", "dataset_type=synthetic", "enable_checkpointing=false",
         "enable_tensorboard=false"]
MiB = 2**20


def load(tiles: int, overrides: list[str]):
  from MaxText import startup  # noqa: PLC0415
  from MaxText.config import loader  # noqa: PLC0415

  return startup.load_config([None, str(loader.BASE_CONFIG), *MODEL, f"num_vocab_tiling={tiles}", *overrides],
                             env={})


def compile_step(config):
  """(the compiled, donated train step, a state, a batch) of the config's run."""

  from MaxText.parallel import sharding  # noqa: PLC0415
  from MaxText.training.run import Run  # noqa: PLC0415

  run = Run(config)
  with sharding.use_mesh(run.mesh, run.rules):
    state = run.init_state()
    batch = run.global_batch(next(run.data(config.train_split)))
    return run.compile_step(state, batch), state, batch


def analysis(tiles: int, overrides: list[str]) -> dict:
  config = load(tiles, overrides)
  compiled, _, _ = compile_step(config)
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  tokens = config.global_batch_size_to_train_on * config.max_target_length
  return {"tiles": tiles, "tokens": tokens, "vocab": config.vocab_size,
          "whole_logits_mib": tokens * config.vocab_size * 4 / MiB, "arguments_mib": m.argument_size_in_bytes / MiB,
          "temporaries_mib": m.temp_size_in_bytes / MiB, "compiled_peak_mib": peak / MiB}


def child(tiles: int, overrides: list[str]) -> None:
  """Run 3 steps in this (fresh) process; print one JSON line."""
  import jax  # noqa: PLC0415

  config = load(tiles, overrides)
  compiled, state, batch = compile_step(config)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  times = []
  for _ in range(3):
    start = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  print(json.dumps({"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "max_rss_before_steps_mib": rss_before / 1024, "step_s": sorted(times[1:])[0],
                    "loss": float(out["loss"])}))


def measure(tiles: int, overrides: list[str]) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(tiles), *overrides], capture_output=True,
                       text=True, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise SystemExit(f"error: the tiles={tiles} run failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiles", default="1,4,16", help="num_vocab_tiling values to compare (1 = whole logits)")
  parser.add_argument("--no-measure", action="store_true", help="compiled memory analysis only, run nothing")
  parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
  parser.add_argument("overrides", nargs="*", help="config key=value applied to every variant")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.child is not None:
    child(args.child, args.overrides)
    return 0

  import jax  # noqa: PLC0415

  rows = []
  for tiles in (int(t) for t in args.tiles.split(",")):
    row = analysis(tiles, args.overrides)
    if not args.no_measure:
      row.update(measure(tiles, args.overrides))
    rows.append(row)
    print(f"tiles={tiles}: {row}", flush=True)

  header = ("num_vocab_tiling", "tokens x vocab", "whole logits MiB", "compiled peak MiB", "temporaries MiB",
            "measured max RSS MiB", "step s")
  table = [header] + [(
      str(r["tiles"]), f"{r['tokens']} x {r['vocab']}", f"{r['whole_logits_mib']:.0f}", f"{r['compiled_peak_mib']:.0f}",
      f"{r['temporaries_mib']:.0f}", f"{r['max_rss_mib']:.0f}" if "max_rss_mib" in r else "-",
      f"{r['step_s']:.2f}" if "step_s" in r else "-") for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  print("\n".join(lines))
  base = rows[0]
  for r in rows[1:]:
    ratio = f"compiled peak {r['compiled_peak_mib'] / base['compiled_peak_mib']:.2f}x"
    if "max_rss_mib" in r:
      ratio += f", measured max RSS {r['max_rss_mib'] / base['max_rss_mib']:.2f}x"
    print(f"tiles={r['tiles']} vs tiles={base['tiles']}: {ratio}")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({
      "rows": rows, "model": MODEL, "overrides": args.overrides,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind, "load_average": os.getloadavg()[0]}}, indent=2))
  print(f"wrote {RESULTS}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
