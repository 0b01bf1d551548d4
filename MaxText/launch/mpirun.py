r"""Train on GPU hosts with Open MPI's mpirun: one process per GPU on every host.

  python MaxText/launch/mpirun.py --hosts gpu1,gpu2 --gpus_per_host 8 -- run_name=mudd model_name=MUDDLlama2Medium \
      dataset_path=/data/pile
  python MaxText/launch/mpirun.py --hosts gpu1,gpu2 --gpus_per_host 8 --dry_run -- run_name=mudd ...

JAX joins the job from Open MPI's variables (OMPI_COMM_WORLD_*), and the trainer binds local rank i of a
host to that host's GPU i (MaxText/parallel/distributed.py), so no two processes share a GPU. The repository must
be at the same path on every host (--workdir). CPU hosts: --gpus_per_host 0 --processes_per_host N.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python MaxText/launch/x.py`: the repository root on the path
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MaxText.launch import common


def command(args, overrides) -> list[str]:
  per_host = args.processes_per_host or args.gpus_per_host
  hosts = [h for h in args.hosts.split(",") if h]
  out = ["mpirun", "-np", str(per_host * len(hosts)), "--host", ",".join(f"{h}:{per_host}" for h in hosts),
         "--map-by", f"ppr:{per_host}:node", "--bind-to", "none", "--wdir", str(args.workdir)]
  for name in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", *args.export):
    out += ["-x", name]
  out += ["-x", "PYTHONUNBUFFERED=1"]
  return out + [args.python, "MaxText/train.py", args.config, *overrides]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --hosts H1,H2 --gpus_per_host G [options] [-- key=value ...]")
  p.add_argument("--hosts", required=True, help="comma-separated host names")
  p.add_argument("--gpus_per_host", type=int, required=True)
  p.add_argument("--processes_per_host", type=int, default=0, help="default: one per GPU")
  p.add_argument("--export", action="append", default=[], metavar="NAME", help="another environment variable to pass")
  p.add_argument("--workdir", default=str(common.ROOT), help="the repository, at this path on every host")
  common.add_common(p)
  return p


def main(argv=None) -> int:
  args, overrides = common.parse(parser(), argv)
  if not (args.processes_per_host or args.gpus_per_host) or not [h for h in args.hosts.split(",") if h]:
    print("error: give --hosts and --gpus_per_host (or --processes_per_host on CPU hosts)", file=sys.stderr)
    return 2
  return common.run([command(args, overrides)], args.dry_run, interactive=True)


if __name__ == "__main__":
  sys.exit(main())
