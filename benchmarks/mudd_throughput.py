"""MUDDFormer against its Transformer++ twin: training throughput side by side, and compile time by depth.

  flock /tmp/maxtext-bench.lock python benchmarks/mudd_throughput.py [--pairs Llama2Tiny:MUDDLlama2Tiny,...]
      [--rounds 7] [--steps 5] [--depths 6,12,24] [key=value ...]

Throughput: both models of a pair are compiled in one process (the trainer's jitted, donated train step on
one device, the same fixed batch of real tokens from the default corpus), then timed in alternating rounds
of `--steps` steps, so a slow moment of a shared machine hits both; the ratio is of the median step times.
Compile time: the train step of a narrow model (width 64) at each depth, compiled three ways: Transformer++
scanned, Transformer++ unrolled, MUDD (always unrolled). Prints two tables and writes
benchmarks/results/mudd_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from MaxText import startup
from MaxText.config import loader
from MaxText.parallel import sharding
from MaxText.training.run import Run

RESULTS = Path(__file__).resolve().parent / "results" / "mudd_throughput.json"


def build(model_name: str, overrides: list[str]):
  """(config, compiled step, state, batch) for one model on one device."""
  config = startup.load_config([None, str(loader.BASE_CONFIG), f"model_name={model_name}", "num_devices=1",
                                "ici_fsdp_parallelism=1", "enable_checkpointing=false", *overrides], env={})
  run = Run(config)
  with sharding.use_mesh(run.mesh, run.rules):
    state = run.init_state()
    batch = run.global_batch(next(run.data(config.train_split)))
    start = time.perf_counter()
    compiled = run.compile_step(state, batch)
    compile_s = time.perf_counter() - start
  return {"config": config, "step": compiled, "state": state, "batch": batch, "compile_s": compile_s,
          "params": run.spec.num_params, "times": []}


def run_steps(entry: dict, steps: int) -> float:
  """Seconds per step over `steps` consecutive steps."""
  state = entry["state"]
  begin = time.perf_counter()
  for _ in range(steps):
    state, out = entry["step"](state, entry["batch"])
  jax.block_until_ready(out)
  entry["state"] = state
  return (time.perf_counter() - begin) / steps


def throughput(pairs: list[tuple[str, str]], rounds: int, steps: int, overrides: list[str]) -> list[dict]:
  rows = []
  for twin_name, mudd_name in pairs:
    twin, mudd = build(twin_name, overrides), build(mudd_name, overrides)
    for entry in (twin, mudd):
      run_steps(entry, 2)  # warm-up
    for r in range(rounds):
      order = (twin, mudd) if r % 2 == 0 else (mudd, twin)
      for entry in order:
        entry["times"].append(run_steps(entry, steps))
    c = twin["config"]
    tokens = c.global_batch_size_to_train_on * c.max_target_length
    row = {"twin": twin_name, "mudd": mudd_name, "batch": c.global_batch_size_to_train_on,
           "length": c.max_target_length, "rounds": rounds, "steps_per_round": steps}
    for key, entry in (("twin", twin), ("mudd", mudd)):
      median = float(np.median(entry["times"]))
      row.update({f"{key}_params": entry["params"], f"{key}_step_s": median,
                  f"{key}_tokens_per_s": tokens / median, f"{key}_compile_s": entry["compile_s"],
                  f"{key}_round_s": entry["times"]})
    row["mudd_over_twin"] = row["twin_step_s"] / row["mudd_step_s"]
    rows.append(row)
  return rows


def compile_times(depths: list[int], overrides: list[str]) -> list[dict]:
  narrow = ["base_emb_dim=64", "base_num_query_heads=2", "base_num_kv_heads=2", "head_dim=32", "base_mlp_dim=256",
            "vocab_size=8192", "max_target_length=64", "per_device_batch_size=2"]
  rows = []
  for depth in depths:
    row = {"layers": depth}
    for key, model, extra in (("llama_scan_s", "Llama2Tiny", ["scan_layers=true"]),
                              ("llama_unrolled_s", "Llama2Tiny", ["scan_layers=false"]),
                              ("mudd_s", "MUDDLlama2Tiny", [])):
      entry = build(model, [*narrow, f"base_num_decoder_layers={depth}", *extra, *overrides])
      row[key] = entry["compile_s"]
    rows.append(row)
  return rows


def markdown(header, table) -> str:
  table = [header] + table
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", default="Llama2Tiny:MUDDLlama2Tiny,Llama2Small:MUDDLlama2Small")
  parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per pair")
  parser.add_argument("--steps", type=int, default=5, help="steps per round")
  parser.add_argument("--depths", default="6,12,24", help="layer counts of the compile-time table ('' = skip)")
  parser.add_argument("overrides", nargs="*", help="config key=value applied to every model")
  args = parser.parse_args()
  load_before = os.getloadavg()[0]
  pairs = [tuple(p.split(":")) for p in args.pairs.split(",") if p]
  rows = throughput(pairs, args.rounds, args.steps, args.overrides)
  print(markdown(("twin", "MUDD", "batch x len", "params (twin / MUDD)", "step s (twin / MUDD)",
                  "tokens/s (twin / MUDD)", "MUDD / twin"),
                 [(r["twin"], r["mudd"], f"{r['batch']} x {r['length']}",
                   f"{r['twin_params'] / 1e6:.2f}M / {r['mudd_params'] / 1e6:.2f}M",
                   f"{r['twin_step_s']:.3f} / {r['mudd_step_s']:.3f}",
                   f"{r['twin_tokens_per_s']:,.0f} / {r['mudd_tokens_per_s']:,.0f}", f"{r['mudd_over_twin']:.1%}")
                  for r in rows]))
  depths = [int(d) for d in args.depths.split(",") if d]
  compiles = compile_times(depths, args.overrides) if depths else []
  if compiles:
    print()
    print(markdown(("layers", "T++ scanned: compile s", "T++ unrolled: compile s", "MUDD (unrolled): compile s"),
                   [(str(r["layers"]), f"{r['llama_scan_s']:.1f}", f"{r['llama_unrolled_s']:.1f}",
                     f"{r['mudd_s']:.1f}") for r in compiles]))
  load_after = os.getloadavg()[0]
  print(f"\n{os.cpu_count()} CPU cores; load average {load_before:.2f} before, {load_after:.2f} after")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({
      "throughput": rows, "compile": compiles,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind, "load_average_before": load_before,
                  "load_average_after": load_after},
      "args": vars(args)}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
