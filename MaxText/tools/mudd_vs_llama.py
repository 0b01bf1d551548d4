"""MUDDLlama2Tiny against its Transformer++ twin Llama2Tiny on real text: same steps, tokens and seeds.

  python MaxText/tools/mudd_vs_llama.py [--seeds 0,1,2] [--steps 600] [--out ~/mudd_vs_llama] [key=value ...]

Each (model, seed) is a real `train.py` run (train_and_evaluate) on the embedded default corpus (leave
dataset_path empty) unless dataset_path= is given; a seed sets both the parameter init and the data
shuffle, so within a seed both models see the same batches, and the final evaluation reads the same
`--eval-batches` validation batches for every run. Finished runs are reused (delete --out to start over),
so the seeds can be run one command at a time and a last command draws the figure from all of them.
Writes assets/mudd_vs_llama.png, benchmarks/results/mudd_vs_llama.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

from MaxText import startup, train
from MaxText.config import loader
from MaxText.training import train_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("Llama2Tiny", "MUDDLlama2Tiny")
DONE = "mudd_vs_llama.json"  # written in a run dir once the run finished


def run_one(model: str, seed: int, args) -> dict:
  """Train one (model, seed) unless a finished run is in --out; its loss curve and final eval."""
  run_name = f"{model}_seed{seed}"
  run_dir = os.path.join(os.path.expanduser(args.out), run_name)
  done = os.path.join(run_dir, DONE)
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
  config = startup.load_config(
      [None, str(loader.BASE_CONFIG), f"model_name={model}", f"run_name={run_name}",
       f"base_output_directory={args.out}", f"steps={args.steps}", f"log_period={args.log_period}",
       f"eval_interval={args.steps}", f"eval_steps={args.eval_batches}", f"init_weights_seed={seed}",
       f"data_shuffle_seed={seed}", "enable_checkpointing=false", "num_devices=1", *args.overrides], env={})
  start = time.perf_counter()
  result = train.train_and_evaluate(config, progress=False)
  seconds = time.perf_counter() - start
  curve = []
  with open(os.path.join(run_dir, config.metrics_file)) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        curve.append((row["step"], row["train/loss"], row["train/tokens_per_s"]))
  out = {"model": model, "seed": seed, "steps": args.steps, "params": None, "seconds": seconds,
         "tokens": args.steps * config.global_batch_size_to_train_on * config.max_target_length,
         "eval_loss": result["eval_loss"], "eval_tokens": result["eval_tokens"],
         "eval_bits_per_byte": result.get("eval_bits_per_byte"),
         "curve": [{"step": s, "loss": loss, "tokens_per_s": tps} for s, loss, tps in curve]}

  out["params"] = train_state.model_spec(config).num_params
  with open(done, "w") as f:
    json.dump(out, f)
  return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over `window` points (shorter at the start), so noisy per-batch losses read as curves."""
  cumsum = np.cumsum(np.insert(values, 0, 0.0))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot(runs: list[dict], path: str, window: int) -> None:
  import matplotlib  # noqa: PLC0415 (optional: the plots extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the plots extra)
  fig, (ax, bar) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
  colors = {"Llama2Tiny": "tab:blue", "MUDDLlama2Tiny": "tab:red"}
  for model in MODELS:
    mine = [r for r in runs if r["model"] == model]
    if not mine:
      continue
    steps = np.array([p["step"] for p in mine[0]["curve"]])
    curves = np.stack([smooth(np.array([p["loss"] for p in r["curve"]]), window) for r in mine])
    ax.plot(steps, curves.mean(0), color=colors[model], label=f"{model} (mean of {len(mine)} seeds)")
    ax.fill_between(steps, curves.min(0), curves.max(0), color=colors[model], alpha=0.2)
    evals = [r["eval_loss"] for r in mine]
    bar.errorbar([MODELS.index(model)], [np.mean(evals)], yerr=[[np.mean(evals) - min(evals)],
                                                                [max(evals) - np.mean(evals)]],
                 fmt="o", color=colors[model], capsize=6)
    bar.scatter([MODELS.index(model)] * len(evals), evals, color=colors[model], s=12, alpha=0.6)
  lows = [np.min(smooth(np.array([p["loss"] for p in r["curve"]]), window)) for r in runs]
  ax.set_ylim(min(lows) - 0.1, min(lows) + 1.5)
  ax.set_xlabel("step")
  ax.set_ylabel(f"train loss (nats/token, trailing mean of {window} logs)")
  ax.set_title("Default corpus (Python stdlib), same batches per seed; band = min..max over seeds")
  ax.legend()
  ax.grid(alpha=0.3)
  bar.set_xticks(range(len(MODELS)), MODELS, rotation=10)
  bar.set_xlim(-0.6, len(MODELS) - 0.4)
  bar.set_ylabel("final validation loss")
  bar.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)


@startup.cli
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--log-period", type=int, default=10)
  parser.add_argument("--eval-batches", type=int, default=50, help="validation batches of the final evaluation")
  parser.add_argument("--out", default="~/mudd_vs_llama", help="base_output_directory of the runs")
  parser.add_argument("--smooth", type=int, default=5, help="logged points per trailing mean in the plot")
  parser.add_argument("--plot", default=os.path.join(ROOT, "assets", "mudd_vs_llama.png"))
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "mudd_vs_llama.json"))
  parser.add_argument("overrides", nargs="*", help="config key=value for both models (e.g. dataset_path=...)")
  args = parser.parse_args(argv)
  load_before = os.getloadavg()[0]
  runs = [run_one(model, int(seed), args) for seed in args.seeds.split(",") for model in MODELS]
  plot(runs, args.plot, args.smooth)

  by_seed = {}
  for r in runs:
    by_seed.setdefault(r["seed"], {})[r["model"]] = r
  lines = ["| seed | Llama2Tiny eval loss | MUDDLlama2Tiny eval loss | MUDD - T++ | T++ tokens/s | MUDD tokens/s |",
           "|---|---|---|---|---|---|"]
  deltas = []
  for seed, pair in sorted(by_seed.items()):
    twin, mudd = pair["Llama2Tiny"], pair["MUDDLlama2Tiny"]
    deltas.append(mudd["eval_loss"] - twin["eval_loss"])
    rate = lambda r: np.median([p["tokens_per_s"] for p in r["curve"][1:]])
    lines.append(f"| {seed} | {twin['eval_loss']:.4f} | {mudd['eval_loss']:.4f} | {deltas[-1]:+.4f} | "
                 f"{rate(twin):,.0f} | {rate(mudd):,.0f} |")
  mean = lambda m: np.mean([r["eval_loss"] for r in runs if r["model"] == m])
  lines.append(f"| mean | {mean('Llama2Tiny'):.4f} | {mean('MUDDLlama2Tiny'):.4f} | {np.mean(deltas):+.4f} "
               f"(seeds {sum(d < 0 for d in deltas)}/{len(deltas)} better) | | |")
  print("\n".join(lines))
  first = runs[0]
  print(f"\n{args.steps} steps x {first['tokens'] // args.steps:,} tokens; final eval on {first['eval_tokens']:,.0f} "
        f"validation tokens; parameters: " + ", ".join(f"{m} {next(r['params'] for r in runs if r['model'] == m):,}"
                                                      for m in MODELS))
  print(f"{os.cpu_count()} CPU cores; load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w") as f:
    json.dump({"runs": runs, "mean_delta": float(np.mean(deltas)), "args": vars(args),
               "load_average": [load_before, os.getloadavg()[0]]}, f, indent=1)
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
