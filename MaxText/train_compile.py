r"""Compile the real train step for a TPU slice on this host (no TPU needed) and report its memory per chip.

  python MaxText/train_compile.py MaxText/configs/base_v2.yml model_name=MUDDLlama2Medium compile_topology=v5p-8
  python MaxText/train_compile.py MaxText/configs/base_v2.yml model_name=Llama2XL compile_topology=v5e-256 \
      compile_topology_num_slices=2 dcn_data_parallelism=2

The mesh, model, optimizer and shardings are the trainer's (`training.run.Run`) on the compile-only devices
libtpu describes for `compile_topology`; the step is lowered with the abstract state and a global batch and
compiled by the TPU compiler. It prints the memory each chip needs (arguments, outputs, temporaries,
generated code, total against the chip's HBM) and the arrays that take the most of it. Exit code 0: it fits;
1: it does not (one line on stderr says by how much); 2: a configuration error. `--json PATH` also writes
the report as JSON (benchmarks/aot_fit.py collects them).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

if __package__ in (None, ""):  # `python MaxText/train_compile.py` puts MaxText/ itself on the path, not the repo
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from MaxText import errors, startup
from MaxText.parallel import (
  sharding,
  sharding_report,
)
from MaxText.training import train_state, train_step
from MaxText.training.run import Run

# The TPU compiler's words when a program needs more HBM than a chip has.
_OUT_OF_MEMORY = re.compile(r"resource_exhausted|ran out of memory|exceeds? (the )?(available )?hbm", re.IGNORECASE)


class DoesNotFit(Exception):
  """The compiled step needs more memory per chip than the chip has; the message says how much."""


def compile_step(run) -> tuple[object, float]:
  """(the compiled train step of a Run, seconds to compile)."""
  config = run.config
  state = train_state.with_shardings(run.abstract, run.shardings)
  rows = (config.global_batch_size_to_train_on, config.max_target_length)
  batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=run.batch_sharding) for k in train_step.BATCH_KEYS}
  start = time.perf_counter()
  with sharding.use_mesh(run.mesh, run.rules):
    try:
      compiled = run.compile_step(state, batch)
    except Exception as e:
      message = " ".join(str(e).split())
      if _OUT_OF_MEMORY.search(message):
        raise DoesNotFit(message[:400]) from None
      raise
  return compiled, time.perf_counter() - start


def report(run, tpu) -> dict:
  """Compile the train step of `run` (built on the compile-only devices of the slice `tpu`, times
  compile_topology_num_slices) and measure it; the dict says whether it fits. A compile that runs out of
  HBM is reported as not fitting, with the compiler's message."""
  config, devices = run.config, run.mesh.devices.flat
  first = next(iter(devices))
  out = {"model_name": config.model_name, "topology": tpu.name, "num_slices": config.compile_topology_num_slices,
         "chips": run.mesh.size, "device_kind": first.device_kind, "hbm_bytes_per_chip": tpu.hbm_bytes,
         "mesh": dict(run.mesh.shape), "num_params": run.spec.num_params,
         "global_batch": config.global_batch_size_to_train_on, "max_target_length": config.max_target_length,
         "state_bytes_per_device": sharding_report.bytes_per_device(run.abstract, run.shardings),
         "largest": sharding_report.largest(run.abstract, run.shardings)}
  try:
    compiled, seconds = compile_step(run)
  except DoesNotFit as e:
    return {**out, "fits": False, "compiler_error": str(e)}
  memory = sharding_report.compiled_memory(compiled)
  out.update(compile_seconds=round(seconds, 1), memory=memory, fits=memory["total"] <= tpu.hbm_bytes)
  return out


def format_report(r: dict) -> str:
  gib = sharding_report.GiB
  slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
  compiled = f"; compiled in {r['compile_seconds']:.1f} s" if "compile_seconds" in r else ""
  lines = [f"{r['model_name']} on {r['topology']}{slices}: {r['chips']} chips of {r['device_kind']}, "
           f"{r['hbm_bytes_per_chip'] / gib:.0f} GiB HBM each",
           f"  mesh {r['mesh']}, {r['num_params']:,} parameters, global batch {r['global_batch']} x "
           f"{r['max_target_length']} tokens{compiled}"]
  if "memory" in r:
    lines += ["memory per chip:", sharding_report.format_memory(r["memory"], r["hbm_bytes_per_chip"])]
  lines += [f"train state (parameters + optimizer): {r['state_bytes_per_device'] / gib:.2f} GiB per chip; "
            "its largest arrays, per chip:", sharding_report.format_largest(r["largest"])]
  return "\n".join(lines)


def verdict(r: dict) -> str:
  gib = 1 << 30
  where = f"{r['topology']}" + (f" x {r['num_slices']}" if r["num_slices"] > 1 else "")
  have = r["hbm_bytes_per_chip"] / gib
  if "memory" not in r:
    state = r["state_bytes_per_device"] / gib
    alone = f" (its train state alone takes {state:.2f} GiB per chip)" if state > have else ""
    return (f"{r['model_name']} does not fit {where}{alone}: the TPU compiler ran out of HBM: "
            f"{r['compiler_error']}")
  need = r["memory"]["total"] / gib
  if r["fits"]:
    return f"fits: {r['model_name']} needs {need:.2f} GiB per chip of {where}'s {have:.0f} GiB"
  return f"{r['model_name']} does not fit {where}: needs {need:.2f} GiB per chip, has {have:.0f} GiB"


@startup.cli(usage=__doc__)
def main(argv: list[str]) -> int:
  json_path, rest = None, argv[:1]
  args = iter(argv[1:])
  for arg in args:
    if arg == "--json":
      json_path = next(args, None)
    elif arg.startswith("--json="):
      json_path = arg.split("=", 1)[1]
    else:
      rest.append(arg)
  argv = rest
  config, tpu, devices = startup.load_topology_config(argv)

  run = Run(config, devices)
  if config.print_sharding:
    print(sharding_report.format_parameters(run.spec, run.abstract, run.shardings), flush=True)
  r = report(run, tpu)
  print(format_report(r), flush=True)
  if json_path:
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(r, f, indent=2)
      f.write("\n")
  if not r["fits"]:
    print(f"error: {verdict(r)}", file=sys.stderr)
    return errors.EXIT_CHECK_FAILED
  print(verdict(r))
  return 0


if __name__ == "__main__":
  startup.exit_now(main())
