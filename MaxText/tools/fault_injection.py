"""Kill a training run at N random points (during steps, saves and evaluations), rerun it after each kill,
and check that it ends exactly where an uninterrupted run ends.

  python MaxText/tools/fault_injection.py --kills 5 --seed 0 --workdir /tmp/fi [key=value ...]

Both runs get the same key=value arguments (on top of a tiny synthetic-data model, 12 steps, a checkpoint
every 2 steps and an evaluation every 4; any key can be overridden). The faulted run is killed with SIGKILL
at each chosen point: the process kills itself when its loop reaches the point (`MAXTEXT_KILL_AT`,
MaxText/training/faults.py), after a random delay of up to --max-delay seconds, so the kill lands inside that step,
background save or evaluation, or a little later. Points are drawn in turn from the three kinds, each after
the step the previous kill left a checkpoint for, so every kill interrupts work the run still has to do.

Checked at the end: the final train state (parameters, optimizer state, step) is bit for bit the
uninterrupted run's, and metrics.jsonl holds every step's training row and every evaluation row exactly once,
with the uninterrupted run's losses. Prints a table of the kills and writes report.json; exits 0 when every
check holds, 1 when one fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax
import numpy as np
import orbax.checkpoint as ocp

from MaxText import startup
from MaxText.checkpoint import integrity
from MaxText.config import loader
from MaxText.errors import ConfigError
from MaxText.training import faults

DEFAULTS = ["base_emb_dim=32", "base_num_decoder_layers=2", "base_num_query_heads=2", "base_num_kv_heads=2",
            "base_mlp_dim=64", "vocab_size=128", "max_target_length=16", "per_device_batch_size=2", "steps=12",
            "log_period=1", "checkpoint_period=2", "eval_interval=4", "eval_steps=2", "dataset_type=synthetic",
            "enable_tensorboard=false", "learning_rate=1e-2"]
# Values that depend on time, not on the computation.
TIMING = ("tokens_per_s", "tflops_per_device", "mfu", "step_time")


def _argv(workdir: Path, run_name: str, overrides: list[str]) -> list[str]:
  keys = {o.split("=", 1)[0] for o in overrides}
  base = [d for d in DEFAULTS if d.split("=", 1)[0] not in keys]
  return [sys.executable, str(ROOT / "MaxText/train.py"), str(loader.BASE_CONFIG), *base, *overrides,
          f"base_output_directory={workdir}", f"run_name={run_name}"]


def _launch(argv: list[str], kill_at: str = "", log: Path | None = None) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith("M_") and k != faults.ENV}
  env["XLA_FLAGS"] = ""  # one device, as a user's run
  if kill_at:
    env[faults.ENV] = kill_at
  out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
  return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def committed_steps(run_dir: Path) -> list[int]:
  folder = run_dir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def candidate_points(kind: str, after: int, values: dict) -> list[int]:
  """Steps after `after` where a point of `kind` happens in a run of these config values."""
  steps, period, every = values["steps"], values["checkpoint_period"] or values["steps"], values["eval_interval"]
  if kind == "step":
    return list(range(after + 1, steps + 1))
  if kind == "save":
    return [s for s in range(after + 1, steps + 1) if s % period == 0 or s == steps]
  return [s for s in range(after + 1, steps + 1) if every and s % every == 0]


def choose_point(rng: random.Random, turn: int, after: int, values: dict, max_delay: float) -> tuple[str, int, float]:
  kinds = ["step", "save", "eval"]
  kind = kinds[turn % 3]
  steps = candidate_points(kind, after, values) or candidate_points("step", after, values)
  if not candidate_points(kind, after, values):
    kind = "step"
  step, delay = rng.choice(steps), round(rng.uniform(0.0, max_delay), 3)
  if step == values["steps"]:
    delay = 0.0  # the run may be gone before a delayed kill at its last step's point: kill at the point itself
  return kind, step, delay


def load_state(step_dir: Path) -> dict:
  """{path: numpy array} of a checkpoint's train state, read without a model."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tree = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {integrity.leaf_name(path): np.asarray(leaf) for path, leaf in flat}


def metric_rows(run_dir: Path) -> dict[tuple[int, str], list[dict]]:
  rows: dict[tuple[int, str], list[dict]] = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    prefixes = {k.split("/", 1)[0] for k in row if "/" in k}
    for prefix in prefixes:
      rows.setdefault((row["step"], prefix), []).append(
          {k: v for k, v in row.items() if k.startswith(prefix + "/") and k.split("/", 1)[1] not in TIMING})
  return rows


def compare(reference: Path, faulted: Path, steps: int) -> list[str]:
  """The differences between the two runs' final states and metrics (empty when they agree)."""
  problems = []
  if steps not in committed_steps(faulted):
    return [f"the faulted run has no checkpoint of step {steps}"]
  want, got = load_state(reference / "checkpoints" / str(steps)), load_state(faulted / "checkpoints" / str(steps))
  if set(want) != set(got):
    problems.append(f"the final states hold different arrays: {sorted(set(want) ^ set(got))[:3]}")
  for name in sorted(set(want) & set(got)):
    a, b = want[name], got[name]
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      differ = int(np.sum(a != b)) if a.shape == b.shape else "all"
      problems.append(f"{name}: {differ} of {a.size} values differ from the uninterrupted run")
  ref_rows, rows = metric_rows(reference), metric_rows(faulted)
  for key, found in sorted(rows.items()):
    if len(found) > 1:
      problems.append(f"metrics.jsonl holds step {key[0]}'s {key[1]} row {len(found)} times")
  for key in sorted(set(ref_rows) | set(rows)):
    if key not in rows:
      problems.append(f"metrics.jsonl lacks step {key[0]}'s {key[1]} row")
    elif key not in ref_rows:
      problems.append(f"metrics.jsonl has a {key[1]} row at step {key[0]} that the uninterrupted run does not")
    elif rows[key][0] != ref_rows[key][0]:
      problems.append(f"step {key[0]}'s {key[1]} row differs from the uninterrupted run's: {rows[key][0]} vs "
                      f"{ref_rows[key][0]}")
  return problems


def run(kills: int, seed: int, workdir: Path, overrides: list[str], max_delay: float = 0.5,
        timeout: float = 600.0, progress=print) -> dict:
  """Reference and faulted runs in `workdir`; returns the report (`ok`, `kills`, `problems`)."""
  values = loader.load([None, str(loader.BASE_CONFIG), *[d for d in DEFAULTS
                          if d.split("=", 1)[0] not in {o.split("=", 1)[0] for o in overrides}], *overrides], env={})
  workdir.mkdir(parents=True, exist_ok=True)
  rng = random.Random(seed)
  reference = _launch(_argv(workdir, "reference", overrides), log=workdir / "reference.log")
  faulted_dir = workdir / "faulted"
  report = {"seed": seed, "kills": [], "problems": []}
  start = time.time()
  try:
    for turn in range(kills):
      after = max(committed_steps(faulted_dir), default=0)
      if after >= values["steps"]:
        break
      kind, step, delay = choose_point(rng, turn, after, values, max_delay)
      point = f"{kind}:{step}:{delay}"
      proc = _launch(_argv(workdir, "faulted", overrides), kill_at=point, log=workdir / f"faulted-{turn}.log")
      code = proc.wait(timeout=timeout)
      landed = code == -9
      entry = {"point": point, "resumed_from": after, "exit": code, "landed": landed,
               "checkpoints_after": committed_steps(faulted_dir)}
      report["kills"].append(entry)
      progress(f"kill {turn + 1}: {point:<16} resumed from step {after:<3} exit {code:<4} "
               f"checkpoints then {entry['checkpoints_after']}")
      if not landed:
        if code != 0:
          report["problems"].append(f"run {turn} (kill point {point}) failed with exit {code}; see "
                                    f"{workdir / f'faulted-{turn}.log'}")
        break
    final = _launch(_argv(workdir, "faulted", overrides), log=workdir / "faulted-final.log").wait(timeout=timeout)
    if final != 0:
      report["problems"].append(f"the final rerun exited {final}; see {workdir / 'faulted-final.log'}")
    ref_code = reference.wait(timeout=timeout)
    if ref_code != 0:
      report["problems"].append(f"the uninterrupted run exited {ref_code}; see {workdir / 'reference.log'}")
  finally:
    if reference.poll() is None:
      reference.kill()
  if not report["problems"]:
    report["problems"] = compare(workdir / "reference", faulted_dir, values["steps"])
  report["landed"] = sum(k["landed"] for k in report["kills"])
  report["ok"] = not report["problems"]
  report["seconds"] = round(time.time() - start, 1)
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  return report


@startup.cli
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=5, help="how many times to kill the run")
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill points and delays")
  parser.add_argument("--workdir", default="", help="folder of both runs (default: a new temporary folder)")
  parser.add_argument("--max-delay", type=float, default=0.5, help="longest delay after a point, in seconds")
  parser.add_argument("overrides", nargs="*", help="key=value for both runs")
  args = parser.parse_args(argv)
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fault-injection-")).resolve()
  if args.kills < 1 or args.max_delay < 0:
    raise ConfigError("--kills must be at least 1 and --max-delay not negative")
  report = run(args.kills, args.seed, workdir, args.overrides, max_delay=args.max_delay)
  print(f"{report['landed']} kills landed; final state {'identical to' if report['ok'] else 'DIFFERENT from'} "
        f"the uninterrupted run's ({report['seconds']} s); report: {workdir / 'report.json'}")
  for problem in report["problems"]:
    print(f"  {problem}")
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  startup.exit_now(main())
