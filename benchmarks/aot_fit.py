"""Does each large preset fit the TPU slice it is meant for? The train step compiled ahead of time on this host.

  python benchmarks/aot_fit.py [--models MUDDLlama2Medium,Llama2Medium] [--timeout 3600] [key=value ...]

Every preset of 400M parameters and more (counted from its abstract model, nothing allocated) is compiled
by MaxText/train_compile.py, one process per preset, for its intended slice: Cloud TPU v5p, the chips the
MUDDFormer paper trained on, and the smallest v5p slice whose HBM holds the train state comfortably:
v5p-8 (4 chips) below 1B parameters, v5p-16 (8 chips) from 1B to 3B, v5p-64 (32 chips) above. The preset's
own per_device_batch_size and sequence length are kept; the mesh is train.py's default (all fsdp).
Prints a table (markdown, for docs/results.md) and writes benchmarks/results/aot_fit.json, merged with the rows
already there, so `--models` can redo a few rows. `--state_only` skips the compile (seconds for every
preset): the train state per chip, from the abstract state and its shardings, without the activations.
`--add REPORT.json` merges a report that `train_compile.py --json` wrote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "aot_fit.json"
MIN_PARAMS = 400e6
GiB = 1 << 30


def intended_topology(num_params: int) -> str:
  if num_params < 1e9:
    return "v5p-8"
  if num_params < 3e9:
    return "v5p-16"
  return "v5p-64"


def preset_sizes() -> dict[str, int]:
  """Parameters of every preset (abstract shapes only)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from MaxText.config import loader  # noqa: PLC0415
  from MaxText.training import train_state  # noqa: PLC0415

  sizes = {}
  for path in sorted((ROOT / "MaxText" / "configs" / "models").glob("*.yml")):
    values = loader.load([None, str(loader.BASE_CONFIG)], env={}, model_name=path.stem)
    sizes[path.stem] = train_state.model_spec(loader.derive(values, 1, 1)).num_params
  return sizes


def compile_preset(model: str, topology: str, overrides: list[str], timeout: float) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "report.json"
    cmd = [sys.executable, "MaxText/train_compile.py", "MaxText/configs/base_v2.yml", f"model_name={model}",
           f"compile_topology={topology}", *overrides, "--json", str(out)]
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"model_name": model, "topology": topology, "error": f"compile took over {timeout:.0f} s"}
    seconds = time.perf_counter() - start
    if out.exists():
      r = json.loads(out.read_text())
      r["wall_seconds"] = round(seconds, 1)
      return r
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model_name": model, "topology": topology, "error": last}


def state_report(model: str, topology: str, overrides: list[str]) -> dict:
  """The train state per chip (abstract: nothing compiled or allocated), as train_compile.py reports it."""
  from MaxText import startup  # noqa: PLC0415
  from MaxText.parallel import sharding_report  # noqa: PLC0415
  from MaxText.training.run import Run  # noqa: PLC0415

  config, tpu, devices = startup.load_topology_config(
      [None, "MaxText/configs/base_v2.yml", f"model_name={model}", f"compile_topology={topology}", *overrides])
  run = Run(config, devices)
  return {"model_name": model, "topology": tpu.name, "num_slices": config.compile_topology_num_slices,
          "chips": run.mesh.size, "hbm_bytes_per_chip": tpu.hbm_bytes, "mesh": dict(run.mesh.shape),
          "num_params": run.spec.num_params, "global_batch": config.global_batch_size_to_train_on,
          "max_target_length": config.max_target_length,
          "state_bytes_per_device": sharding_report.bytes_per_device(run.abstract, run.shardings),
          "fits": None}


def row(r: dict) -> str:
  if "error" in r:
    return f"| {r['model_name']} | | {r['topology']} | | | | | | error: {r['error']} |"
  fits = "?" if r["fits"] is None else "yes" if r["fits"] else "no"
  mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
  if "memory" in r:
    need = f"{r['memory']['total'] / GiB:.1f}"
  else:
    # The compiler's out-of-HBM message says what the temporaries alone would take.
    over = re.search(r"temporaries \(([\d.]+)G\)", r.get("compiler_error", ""))
    need = ("not compiled yet" if r["fits"] is None else
            f"> {float(over.group(1)):.1f} (temporaries alone)" if over else "over (compiler: out of HBM)")
  return (f"| {r['model_name']} | {r['num_params'] / 1e9:.2f}B | {r['topology']} ({r['chips']} chips) | {mesh} | "
          f"{r['global_batch']} x {r['max_target_length']} | {r['state_bytes_per_device'] / GiB:.2f} | {need} | "
          f"{r['hbm_bytes_per_chip'] / GiB:.0f} | {fits} |")


def table(rows: list[dict]) -> str:
  head = ["| preset | parameters | slice | mesh | global batch (sequences x tokens) | "
          "train state GiB/chip | compiled step GiB/chip | HBM GiB/chip | fits |",
          "|---|---|---|---|---|---|---|---|---|"]
  return "\n".join(head + [row(r) for r in rows])


def save(done: dict, sizes: dict) -> None:
  ordered = sorted(done.values(), key=lambda x: (x.get("num_params", sizes.get(x["model_name"], 0)), x["model_name"]))
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({"command": "python benchmarks/aot_fit.py", "rows": ordered}, indent=2) + "\n")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="", help="comma-separated presets (default: all of 400M and more)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  parser.add_argument("--state_only", action="store_true", help="no compile: the train state per chip only, for "
                      "presets without a compiled row")
  parser.add_argument("--add", default="", help="merge this train_compile.py --json report")
  args, overrides = parser.parse_known_args()
  sizes = preset_sizes()
  models = [m for m in args.models.split(",") if m] or [m for m, n in sizes.items() if n >= MIN_PARAMS]
  unknown = [m for m in models if m not in sizes]
  if unknown:
    parser.error(f"--models: unknown preset(s) {', '.join(unknown)}")
  previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
  done = {r["model_name"]: r for r in previous["rows"]}
  if args.add:
    r = json.loads(Path(args.add).read_text())
    models = []
    done[r["model_name"]] = {**r, "date": datetime.date.today().isoformat(), "overrides": overrides}
  for model in models:
    topology = intended_topology(sizes[model])
    if args.state_only:
      if "memory" not in done.get(model, {}):
        done[model] = {**state_report(model, topology, overrides), "date": datetime.date.today().isoformat(),
                       "overrides": overrides}
    else:
      print(f"{model} ({sizes[model] / 1e9:.2f}B) on {topology} ...", flush=True)
      r = compile_preset(model, topology, overrides, args.timeout)
      r.update(date=datetime.date.today().isoformat(), overrides=overrides)
      done[model] = r
      print(row(r), flush=True)
    save(done, sizes)
  save(done, sizes)
  rows = json.loads(RESULTS.read_text())["rows"]
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
