"""Train-step time and memory against sequence length: Transformer-VQ vs full-attention Transformer++.

  flock /tmp/maxtext-bench.lock python benchmarks/vq_scaling.py [--lengths 1024,2048,4096,8192,16384]
      [--steps 3] [--full-max-length 16384]

One layer of each at width 128, batch 1, float32, on one CPU device (both ~0.26M matmul parameters per
token): Transformer-VQ is two single-head gated attention units (d_k 128, d_v 256, 512 codes, blocks of
512); Transformer++ is attention (2 heads of 64, jax.nn.dot_product_attention) plus a SwiGLU MLP of 512.
The step is the trainer's own (train_step.make_train_step: forward, backward and the AdamW update, jitted
and donated) on random tokens. Step time is the median of --steps steps after two warm-up steps, the two
models measured alternately at each length in one process; memory is the compiled step's
memory_analysis() (arguments + outputs + temporaries - aliased), i.e. the peak XLA plans for.
Prints a table, writes benchmarks/results/vq_scaling.json and plots assets/vq_scaling.png.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "vq_scaling.json"
PLOT = ROOT / "assets" / "vq_scaling.png"
COMMON = dict(base_emb_dim=128, base_num_decoder_layers=1, vocab_size=256, per_device_batch_size=1.0, num_devices=1,
              ici_fsdp_parallelism=1, dataset_type="synthetic", dtype="float32", steps=10, warmup_steps_fraction=0.0)
MODELS = {
    "transformer_vq": dict(decoder_block="transformer_vq", base_num_query_heads=1, base_num_kv_heads=1, head_dim=128,
                           vq_value_dim=256, vq_num_codes=512, vq_block_length=512),
    "transformer_pp": dict(decoder_block="llama2", base_num_query_heads=2, base_num_kv_heads=2, head_dim=64,
                           base_mlp_dim=512),
}


def measure(name: str, length: int, steps: int) -> dict:
  config = startup.load_config([None, str(loader.BASE_CONFIG)], env={}, max_target_length=length,
                               **COMMON, **MODELS[name])
  run = Run(config)
  rng = np.random.default_rng(length)
  tokens = rng.integers(4, config.vocab_size, (1, length + 1), dtype=np.int32)
  ones = np.ones((1, length), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "inputs_segmentation": ones,
           "inputs_position": np.arange(length, dtype=np.int32)[None], "targets_segmentation": ones}
  with sharding.use_mesh(run.mesh, run.rules):
    state = run.init_state()
    batch = run.global_batch(batch)
    start = time.perf_counter()
    compiled = run.compile_step(state, batch)
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for i in range(steps + 2):
      begin = time.perf_counter()
      state, out = compiled(state, batch)
      jax.block_until_ready(out)
      if i >= 2:
        times.append(time.perf_counter() - begin)
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes)
  return {"model": name, "length": length, "params": run.spec.num_params, "step_s": float(np.median(times)),
          "step_s_all": times, "compile_s": compile_s, "peak_mib": peak / 2**20,
          "temp_mib": memory.temp_size_in_bytes / 2**20, "loss": float(out["loss"])}


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {"transformer_vq": ("Transformer-VQ", "tab:blue", "o"),
            "transformer_pp": ("Transformer++ (full)", "tab:red", "s")}
  for key, (label, color, marker) in styles.items():
    mine = sorted((r for r in rows if r["model"] == key), key=lambda r: r["length"])
    if not mine:
      continue
    lengths = np.array([r["length"] for r in mine])
    for ax, field in zip(axes, ("step_s", "peak_mib")):
      ax.loglog(lengths, [r[field] for r in mine], marker=marker, color=color, label=label)
  for ax, field, unit in zip(axes, ("step_s", "peak_mib"), ("train step time (s)", "peak memory (MiB)")):
    vq = sorted((r for r in rows if r["model"] == "transformer_vq"), key=lambda r: r["length"])
    base_x, base_y = vq[0]["length"], vq[0][field]
    xs = np.array([r["length"] for r in vq], float)
    ax.loglog(xs, base_y * xs / base_x, ":", color="gray", label="linear")
    ax.loglog(xs, base_y * (xs / base_x) ** 2, "--", color="gray", label="quadratic")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(unit)
    ax.set_xticks(xs, [f"{int(x) // 1024}k" for x in xs])
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend()
  fig.suptitle("One layer, width 128, batch 1, float32, CPU: forward + backward + AdamW")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--full-max-length", type=int, default=16384,
                      help="longest length at which full attention is measured (it grows quadratically)")
  args = parser.parse_args()
  load_before = os.getloadavg()
  rows = []
  print(f"{'length':>7} {'model':<15} {'step s':>8} {'peak MiB':>9} {'compile s':>9}", flush=True)
  for length in (int(x) for x in args.lengths.split(",")):
    for name in MODELS:
      if name == "transformer_pp" and length > args.full_max_length:
        continue
      row = measure(name, length, args.steps)
      rows.append(row)
      print(f"{length:>7} {name:<15} {row['step_s']:>8.3f} {row['peak_mib']:>9.1f} {row['compile_s']:>9.1f}",
            flush=True)
  speedups = {}
  for length in sorted({r["length"] for r in rows}):
    pair = {r["model"]: r for r in rows if r["length"] == length}
    if len(pair) == 2:
      speedups[length] = {"time": pair["transformer_pp"]["step_s"] / pair["transformer_vq"]["step_s"],
                          "memory": pair["transformer_pp"]["peak_mib"] / pair["transformer_vq"]["peak_mib"]}
  print("\nfull attention / Transformer-VQ:")
  for length, ratio in speedups.items():
    print(f"  {length:>6}: {ratio['time']:.2f}x step time, {ratio['memory']:.2f}x peak memory")
  result = {"rows": rows, "speedup": {str(k): v for k, v in speedups.items()}, "config": {**COMMON, "models": MODELS},
            "steps": args.steps, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__}}
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(result, indent=2) + "\n")
  plot(rows, PLOT)
  print(f"\nwrote {RESULTS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}; "
        f"load average {load_before} -> {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
