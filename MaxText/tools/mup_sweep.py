"""Learning-rate transfer and "wider is better": an LR sweep over widths under sp and under muP.

Every run trains a width of the CPU ladder (configs/models/MuTransformerW<width>.yml) on the same batches
of the embedded default corpus (real text) for `--steps` steps at Adam learning rate 2^k, then takes the
loss on the same held-out validation batches. Reported per parametrization:
  * the best log2 LR of every width, and whether they agree (muP: the same grid point or one step apart);
  * at the best LR of the base width (mup_base_width), whether the wider model has the lower training
    loss (mean over each logged window, same batches for every width, averaged over `--curve-seeds` init
    seeds) at every logged step after warmup.

  python MaxText/tools/mup_sweep.py                                   # widths 64 128 256, LR 2^-10 .. 2^-4
  python MaxText/tools/mup_sweep.py --parametrizations mup --resume   # add to / reuse an earlier JSON

Writes benchmarks/results/mup_sweep.json, assets/mup_lr_transfer.png and assets/wider_is_better.png.
Runs already in the JSON with the same steps are reused with --resume, so a sweep can be split in parts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np

from MaxText.tools import mup_runs

PARAMETRIZATIONS = ("sp", "mup")


def run_key(parametrization: str, width: int, log2_lr: float, seed: int = 0) -> str:
  return f"{parametrization}/w{width}/lr{log2_lr:g}" + (f"/seed{seed}" if seed else "")


def train_one(parametrization: str, width: int, log2_lr: float, steps: int, log_every: int, batches, eval_batches,
              seed: int = 0):
  """One run: window-mean training loss every `log_every` steps and the final held-out loss."""
  config = mup_runs.ladder_config(width, parametrization, learning_rate=2.0**log2_lr, steps=steps,
                                  init_weights_seed=seed)
  start = time.perf_counter()
  losses = []
  with mup_runs.WidthRun(config) as run:
    for t in range(steps):
      losses.append(run.step(run.put(batches[t]))["loss"])
      if (t + 1) % log_every == 0 and not math.isfinite(float(losses[-1])):
        break  # diverged: the rest of the run cannot recover, and its time is better spent elsewhere
    losses = [float(x) for x in jax.device_get(losses)]
    diverged = len(losses) < steps or not all(math.isfinite(x) for x in losses)
    eval_loss = float("nan") if diverged else run.evaluate(eval_batches)
  windows = [float(np.mean(losses[i - log_every:i])) for i in range(log_every, len(losses) + 1, log_every)]
  return {"parametrization": parametrization, "width": width, "log2_lr": log2_lr, "seed": seed, "steps": steps,
          "warmup_steps": int(round(config.warmup_steps_fraction * steps)), "log_every": log_every,
          "logged_steps": list(range(log_every, len(losses) + 1, log_every)), "train_loss": windows,
          "eval_loss": eval_loss, "diverged": diverged, "seconds": time.perf_counter() - start}


def best_lrs(runs: dict, parametrization: str, widths, lrs) -> dict[int, float | None]:
  """The log2 LR of the lowest held-out loss per width (None if every run of that width diverged)."""
  out = {}
  for w in widths:
    scored = [(runs[run_key(parametrization, w, k)]["eval_loss"], k) for k in lrs
              if run_key(parametrization, w, k) in runs]
    scored = [(loss, k) for loss, k in scored if math.isfinite(loss)]
    out[w] = min(scored)[1] if scored else None
  return out


def mean_curve(runs: dict, parametrization: str, width: int, log2_lr: float, seeds) -> list[float] | None:
  """The training-loss curve at one LR averaged over init seeds (None unless every seed finished)."""
  found = [runs.get(run_key(parametrization, width, log2_lr, seed)) for seed in seeds]
  if any(r is None or r["diverged"] for r in found):
    return None
  return [float(x) for x in np.mean([r["train_loss"] for r in found], axis=0)]


def wider_is_better(runs: dict, parametrization: str, widths, log2_lr: float, seeds=(0,)) -> tuple[bool, list[str]]:
  """At one LR: at every logged step after warmup, each width's (seed-mean) loss <= the next narrower one's."""
  curves = [mean_curve(runs, parametrization, w, log2_lr, seeds) for w in widths]
  if any(c is None for c in curves):
    return False, [f"not every width has finished runs at 2^{log2_lr:g} for seeds {list(seeds)}"]
  first = runs[run_key(parametrization, widths[0], log2_lr)]
  violations = []
  for i, step in enumerate(first["logged_steps"]):
    if step <= first["warmup_steps"]:
      continue
    for narrow, wide, w_n, w_w in zip(curves, curves[1:], widths, widths[1:]):
      if wide[i] > narrow[i]:
        violations.append(f"step {step}: width {w_w} {wide[i]:.4f} > width {w_n} {narrow[i]:.4f}")
  return not violations, violations


def summarize(runs: dict, widths, lrs, base_width: int, seeds) -> tuple[dict, list[str]]:
  summary, lines = {}, []
  step = lrs[1] - lrs[0] if len(lrs) > 1 else 1.0
  for p in PARAMETRIZATIONS:
    if not any(r["parametrization"] == p for r in runs.values()):
      continue
    best = best_lrs(runs, p, widths, lrs)
    found = [k for k in best.values() if k is not None]
    spread = (max(found) - min(found)) / step if found else float("nan")
    base_lr = best.get(base_width)
    wider, violations = (wider_is_better(runs, p, widths, base_lr, seeds) if base_lr is not None
                         else (False, ["no base LR"]))
    per_seed = {str(seed): len(wider_is_better(runs, p, widths, base_lr, [seed])[1]) if base_lr is not None else None
                for seed in seeds}
    summary[p] = {"best_log2_lr": {str(w): k for w, k in best.items()}, "best_lr_spread_grid_steps": spread,
                  "best_lr_agrees": bool(found) and len(found) == len(widths) and spread <= 1,
                  "base_width": base_width, "base_best_log2_lr": base_lr, "seeds": list(seeds),
                  "wider_is_better": wider, "wider_is_better_violations": violations,
                  "violations_per_single_seed": per_seed}
    lines.append(f"{p}: best log2 LR per width " + ", ".join(f"{w}: {k if k is None else f'{k:g}'}"
                                                            for w, k in best.items())
                 + f" -> spread {spread:g} grid steps; agrees (<= 1 step): "
                 + ("yes" if summary[p]["best_lr_agrees"] else "no"))
    lines.append(f"{p}: wider is better at every logged step after warmup at the base width's best LR "
                 f"(2^{base_lr if base_lr is None else f'{base_lr:g}'}, loss averaged over {len(seeds)} init seeds): "
                 + ("yes" if wider else f"no ({len(violations)} violations; first: {violations[0]})")
                 + f"; violations of single seeds: {per_seed}")
  return summary, lines


def loss_table(runs: dict, widths, lrs) -> str:
  rows = [f"{'':<10}" + "".join(f"{f'2^{k:g}':>9}" for k in lrs)]
  for p in PARAMETRIZATIONS:
    for w in widths:
      cells = []
      for k in lrs:
        r = runs.get(run_key(p, w, k))
        text = "" if r is None else "div" if r["diverged"] else f"{r['eval_loss']:.3f}"
        cells.append(f"{text:>9}")
      rows.append(f"{p + ' ' + str(w):<10}" + "".join(cells))
  return "held-out loss after training, per parametrization and width (columns: Adam LR)\n" + "\n".join(rows)


def plot(runs: dict, widths, lrs, summary: dict, assets: str, seeds) -> None:
  import matplotlib  # noqa: PLC0415 (optional: the plots extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the plots extra)
  present = [p for p in PARAMETRIZATIONS if p in summary]
  colors = plt.cm.plasma(np.linspace(0.1, 0.8, len(widths)))
  fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 4.0), squeeze=False, sharey=True)
  finite = [r["eval_loss"] for r in runs.values() if math.isfinite(r["eval_loss"])]
  top = min(max(finite), min(finite) + 3.0) if finite else 10.0
  for ax, p in zip(axes[0], present):
    for color, w in zip(colors, widths):
      ks = [k for k in lrs if run_key(p, w, k) in runs]
      ys = [runs[run_key(p, w, k)]["eval_loss"] for k in ks]
      ys = [y if math.isfinite(y) else np.nan for y in ys]
      ax.plot(ks, ys, marker="o", ms=4, color=color, label=f"width {w}")
      best = summary[p]["best_log2_lr"][str(w)]
      if best is not None:
        ax.plot([best], [runs[run_key(p, w, best)]["eval_loss"]], marker="*", ms=13, color=color, mec="black")
    best = ", ".join(f"{w}: {k:g}" for w, k in summary[p]["best_log2_lr"].items() if k is not None)
    verdict = "agrees (within one grid step)" if summary[p]["best_lr_agrees"] else "shifts"
    ax.set_title(f"{p}: best LR {verdict}\nbest log2 LR per width {best}", fontsize=10)
    ax.set_xlabel("log2 learning rate")
    ax.set_ylim(top=top)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("held-out loss after training")
  axes[0][-1].legend()
  fig.tight_layout()
  os.makedirs(assets, exist_ok=True)
  fig.savefig(os.path.join(assets, "mup_lr_transfer.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 4.0), squeeze=False, sharey=True)
  for ax, p in zip(axes[0], present):
    k = summary[p]["base_best_log2_lr"]
    for color, w in zip(colors, widths):
      r = runs.get(run_key(p, w, k)) if k is not None else None
      curve = mean_curve(runs, p, w, k, seeds) if k is not None else None
      if r is not None and curve is not None:
        ax.plot(r["logged_steps"], curve, color=color, label=f"width {w}")
        for seed in seeds[1:] if len(seeds) > 1 else ():
          ax.plot(r["logged_steps"], runs[run_key(p, w, k, seed)]["train_loss"], color=color, lw=0.5, alpha=0.4)
        if len(seeds) > 1:
          ax.plot(r["logged_steps"], r["train_loss"], color=color, lw=0.5, alpha=0.4)
    if k is not None and run_key(p, widths[0], k) in runs:
      ax.axvline(runs[run_key(p, widths[0], k)]["warmup_steps"], color="gray", ls=":", lw=1)
    verdict = "wider is better throughout" if summary[p]["wider_is_better"] else "wider is not always better"
    ax.set_title(f"{p} at LR 2^{k if k is None else f'{k:g}'} (base width's best), mean of {len(seeds)} seeds:\n"
                 f"{verdict}", fontsize=9)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel("training loss (10-step window mean, same batches)")
  axes[0][-1].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(assets, "wider_is_better.png"), dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
  parser.add_argument("--log2-lrs", type=float, nargs="+", default=[float(k) for k in range(-10, -3)])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--log-every", type=int, default=10)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--curve-seeds", type=int, default=3,
                      help="init seeds averaged in the wider-is-better curves (seeds 1.. are extra runs at one LR)")
  parser.add_argument("--parametrizations", nargs="+", choices=PARAMETRIZATIONS, default=list(PARAMETRIZATIONS))
  parser.add_argument("--resume", action="store_true", help="reuse finished runs of the JSON (same steps)")
  parser.add_argument("--out", default="mup_sweep")
  args = parser.parse_args(argv)
  widths, lrs = sorted(args.widths), sorted(args.log2_lrs)
  if len(widths) < 2 or len(lrs) < 2:
    parser.error("need at least two widths and two learning rates")
  path = os.path.join(mup_runs.RESULTS_DIR, f"{args.out}.json")
  runs = {}
  if args.resume and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      runs = {k: r for k, r in json.load(f)["runs"].items() if r["steps"] == args.steps}
  mup_runs.enable_compilation_cache()
  first = mup_runs.ladder_config(widths[0], "sp", steps=args.steps)
  base_width = first.mup_base_width if first.mup_base_width in widths else widths[0]
  batches = mup_runs.fetch_batches(first, first.train_split, args.steps)
  eval_batches = mup_runs.fetch_batches(first, first.eval_split, args.eval_batches)
  start = time.perf_counter()
  todo = [(p, w, k) for p in args.parametrizations for w in widths for k in lrs if run_key(p, w, k) not in runs]
  for i, (p, w, k) in enumerate(todo):
    runs[run_key(p, w, k)] = r = train_one(p, w, k, args.steps, args.log_every, batches, eval_batches)
    loss = "diverged" if r["diverged"] else f"{r['eval_loss']:.4f}"
    print(f"[{i + 1}/{len(todo)}] {p:>3} width {w:>4} LR 2^{k:<5g} held-out loss {loss} ({r['seconds']:.0f} s)",
          flush=True)
    os.makedirs(mup_runs.RESULTS_DIR, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:  # after every run, so an interrupted sweep can --resume
      json.dump({"runs": runs}, f)
  # Wider is better is judged on curves averaged over init seeds: one seed's trajectory wobbles by more than
  # the gap between neighbouring widths early in training.
  seeds = list(range(args.curve_seeds))
  for p in args.parametrizations:
    base_lr = best_lrs(runs, p, [base_width], lrs)[base_width]
    extra = [(w, seed) for w in widths for seed in seeds[1:] if run_key(p, w, base_lr, seed) not in runs]
    for w, seed in extra if base_lr is not None else ():
      runs[run_key(p, w, base_lr, seed)] = r = train_one(p, w, base_lr, args.steps, args.log_every, batches,
                                                         eval_batches, seed)
      print(f"[seed {seed}] {p:>3} width {w:>4} LR 2^{base_lr:<5g} ({r['seconds']:.0f} s)", flush=True)
      with open(path, "w", encoding="utf-8") as f:
        json.dump({"runs": runs}, f)
  summary, lines = summarize(runs, widths, lrs, base_width, seeds)
  print(loss_table(runs, widths, lrs))
  print("\n".join(lines))
  plot(runs, widths, lrs, summary, mup_runs.ASSETS_DIR, seeds)
  meta = {"widths": widths, "log2_lrs": lrs, "steps": args.steps, "curve_seeds": args.curve_seeds, "tokens_per_step": first.global_batch_size_to_train_on
          * first.max_target_length, "seconds_this_invocation": time.perf_counter() - start,
          "seconds_of_all_runs": sum(r["seconds"] for r in runs.values()),
          "loadavg": mup_runs.loadavg()}
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
  print(f"wrote {path}, {mup_runs.ASSETS_DIR}/mup_lr_transfer.png, {mup_runs.ASSETS_DIR}/wider_is_better.png "
        f"({meta['seconds_this_invocation']:.0f} s, load average {meta['loadavg']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
