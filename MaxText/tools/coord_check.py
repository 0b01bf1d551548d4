"""Coordinate check: does the size of every activation stay put as the model gets wider?

For each width of the muP ladder (configs/models/MuTransformerW*.yml) and each parametrization, train a
few Adam steps on the same batches and record mean |activation| at every site the model reports
(embedding output, q, k, attention logits, attention output, MLP hidden, residual stream, output logits;
per-layer sites averaged over layers) before each update. For each site and step, the slope of
log mean|activation| against log width is fitted. Under muP every slope must stay at or below the
threshold; under sp some site must exceed it, or the check would prove nothing. Exit status 1 if either
fails.

  python MaxText/tools/coord_check.py                      # widths 64 ... 1024, default corpus
  python MaxText/tools/coord_check.py --widths 64 128 256 --steps 3 --dataset synthetic

Writes assets/coord_check_sp.png, assets/coord_check_mup.png and benchmarks/results/coord_check.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

from MaxText.tools import mup_runs

PARAMETRIZATIONS = ("sp", "mup")
# The slope of log mean|activation| against log width that counts as growing with width. An update that
# is Theta(1) per coordinate gives 0; sp's fixed-LR Adam updates give about 1 (q, k, logits) and more.
THRESHOLD = 0.25
SITES = ("embed", "q", "k", "attn_logits", "attn_out", "mlp_hidden", "residual", "logits")


def measure(make_config: Callable[[int, str], object], widths, steps: int, batches: list[dict],
            parametrizations=PARAMETRIZATIONS) -> dict:
  """records[parametrization][str(width)][site] = mean |activation| before update t, for t = 0..steps-1."""
  records = {}
  for parametrization in parametrizations:
    records[parametrization] = {}
    for width in widths:
      config = make_config(width, parametrization)
      per_site: dict[str, list[float]] = {}
      with mup_runs.WidthRun(config) as run:
        for t in range(steps):
          metrics = run.step(run.put(batches[t % len(batches)]))
          for site, value in metrics["activations"].items():
            per_site.setdefault(site, []).append(value)
      records[parametrization][str(width)] = per_site
  return records


def slopes(widths, records: dict) -> dict:
  """slopes[parametrization][site][t]: least-squares slope of log value on log width (None where a value is 0)."""
  x = np.log(np.asarray(widths, np.float64))
  out = {}
  for parametrization, by_width in records.items():
    sites = by_width[str(widths[0])]
    out[parametrization] = {}
    for site in sites:
      values = np.asarray([by_width[str(w)][site] for w in widths], np.float64)  # [widths, steps]
      per_step = []
      for t in range(values.shape[1]):
        column = values[:, t]
        per_step.append(float(np.polyfit(x, np.log(column), 1)[0]) if np.all(column > 0) else None)
      out[parametrization][site] = per_step
  return out


def worst(site_slopes: dict) -> tuple[float, str, int]:
  """(largest slope, its site, its step) over every site and step."""
  best = (-math.inf, "", -1)
  for site, per_step in site_slopes.items():
    for t, s in enumerate(per_step):
      if s is not None and s > best[0]:
        best = (s, site, t)
  return best


def verdict(all_slopes: dict, threshold: float) -> tuple[bool, list[str]]:
  """muP must keep every slope <= threshold; sp must exceed it somewhere."""
  lines, ok = [], True
  if "mup" in all_slopes:
    s, site, t = worst(all_slopes["mup"])
    good = s <= threshold
    ok &= good
    lines.append(f"mup: largest slope {s:+.3f} ({site}, step {t}) {'<=' if good else '>'} threshold {threshold} "
                 f"-> {'PASS' if good else 'FAIL: an activation grows with width'}")
  if "sp" in all_slopes:
    s, site, t = worst(all_slopes["sp"])
    good = s > threshold
    ok &= good
    grown = sorted(site for site, per in all_slopes["sp"].items() if any(v is not None and v > threshold for v in per))
    lines.append(f"sp:  largest slope {s:+.3f} ({site}, step {t}) {'>' if good else '<='} threshold {threshold} "
                 f"-> {'violated as expected at ' + ', '.join(grown) if good else 'FAIL: sp does not violate it'}")
  return ok, lines


def table(widths, all_slopes: dict) -> str:
  parametrizations = list(all_slopes)
  sites = [s for s in SITES if s in all_slopes[parametrizations[0]]]
  sites += [s for s in all_slopes[parametrizations[0]] if s not in sites]
  steps = len(next(iter(all_slopes[parametrizations[0]].values())))
  head = f"{'site':<12}" + "".join(f"{p + ' t=' + str(t):>10}" for p in parametrizations for t in range(steps))
  rows = [f"slope of log mean|activation| vs log width, widths {list(widths)}", head]
  for site in sites:
    cells = []
    for p in parametrizations:
      for v in all_slopes[p][site]:
        cells.append(f"{'-' if v is None else f'{v:+.2f}':>10}")
    rows.append(f"{site:<12}" + "".join(cells))
  return "\n".join(rows)


def plot(widths, records: dict, all_slopes: dict, parametrization: str, threshold: float, path: str) -> None:
  import matplotlib  # noqa: PLC0415 (optional: the plots extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the plots extra)
  import matplotlib.ticker  # noqa: PLC0415 (optional: the plots extra)
  by_width = records[parametrization]
  sites = [s for s in SITES if s in by_width[str(widths[0])]]
  steps = len(by_width[str(widths[0])][sites[0]])
  cols = 4
  rows = math.ceil(len(sites) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, steps))
  for ax, site in zip(axes.flat, sites):
    for t in range(steps):
      ys = [by_width[str(w)][site][t] for w in widths]
      ax.plot(widths, ys, marker="o", ms=3, color=colors[t], label=f"t={t}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    per_step = [v for v in all_slopes[parametrization][site] if v is not None]
    top = max(per_step, default=float("nan"))
    last = per_step[-1] if per_step else float("nan")
    ax.set_title(f"{site}: slope max {top:+.2f}, last {last:+.2f}", fontsize=9,
                 color="red" if top > threshold else "black")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    # Label minor ticks only on axes spanning less than a decade, where there would be no major tick.
    minor = matplotlib.ticker.FormatStrFormatter("%.3g") if high < 10 * low else matplotlib.ticker.NullFormatter()
    ax.yaxis.set_minor_formatter(minor)
    ax.tick_params(labelsize=7, which="both")
  for ax in list(axes.flat)[len(sites):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(f"coordinate check, {parametrization}: mean |activation| vs width, steps 0..{steps - 1} "
               f"(red: slope > {threshold})", fontsize=10)
  fig.supxlabel("width", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--widths", type=int, nargs="+", default=list(mup_runs.LADDER))
  parser.add_argument("--steps", type=int, default=5, help="recorded steps (t=0 is the init)")
  parser.add_argument("--log2-lr", type=float, default=-6.0, help="Adam learning rate 2^x (constant, no warmup)")
  parser.add_argument("--threshold", type=float, default=THRESHOLD)
  parser.add_argument("--dataset", choices=("corpus", "synthetic"), default="corpus",
                      help="corpus: the embedded default corpus (real text)")
  parser.add_argument("--parametrizations", nargs="+", choices=PARAMETRIZATIONS, default=list(PARAMETRIZATIONS))
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
  parser.add_argument("--out", default="coord_check", help="name of the JSON and the plots")
  args = parser.parse_args(argv)
  widths = sorted(args.widths)
  if len(widths) < 2:
    parser.error("--widths needs at least two widths")
  mup_runs.enable_compilation_cache()
  overrides = dict(record_activations=True, learning_rate=2.0**args.log2_lr, lr_schedule_type="constant",
                   warmup_steps_fraction=0.0, steps=args.steps)
  if args.dataset == "synthetic":
    overrides["dataset_type"] = "synthetic"

  def make_config(width, parametrization):
    return mup_runs.ladder_config(width, parametrization, *args.set, **overrides)

  start = time.perf_counter()
  batches = mup_runs.fetch_batches(make_config(widths[0], "sp"), "train", args.steps)
  records = measure(make_config, widths, args.steps, batches, args.parametrizations)
  fitted = slopes(widths, records)
  ok, lines = verdict(fitted, args.threshold)
  print(table(widths, fitted))
  print("\n".join(lines))
  for parametrization in args.parametrizations:
    plot(widths, records, fitted, parametrization, args.threshold,
         os.path.join(mup_runs.ASSETS_DIR, f"{args.out}_{parametrization}.png"))
  result = {"widths": widths, "steps": args.steps, "learning_rate": 2.0**args.log2_lr, "dataset": args.dataset,
            "overrides": args.set,
            "threshold": args.threshold, "passed": ok, "verdict": lines, "slopes": fitted, "records": records,
            "seconds": time.perf_counter() - start, "loadavg": mup_runs.loadavg()}
  os.makedirs(mup_runs.RESULTS_DIR, exist_ok=True)
  with open(os.path.join(mup_runs.RESULTS_DIR, f"{args.out}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {mup_runs.ASSETS_DIR}/{args.out}_{{sp,mup}}.png and {mup_runs.RESULTS_DIR}/{args.out}.json "
        f"({result['seconds']:.0f} s, load average {result['loadavg']})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
