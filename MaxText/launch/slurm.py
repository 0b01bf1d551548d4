r"""Train on a Slurm GPU cluster: write an sbatch script (one process per GPU) and submit it.

  python MaxText/launch/slurm.py --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 -- \
      run_name=mudd model_name=MUDDLlama2Medium dataset_path=/data/pile
  python MaxText/launch/slurm.py --nodes 2 --gpus_per_node 8 --dry_run -- run_name=mudd ...   # print, submit nothing

Each task is one process driving one GPU: JAX joins the job from Slurm's variables and the trainer binds
process i of a node to that node's GPU i (MaxText/parallel/distributed.py), so no two processes share a GPU.
Slurm sends SIGTERM two minutes before the time limit (--signal), on which the trainer saves a
checkpoint and exits; submitting the same script again resumes the run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python MaxText/launch/x.py`: the repository root on the path
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MaxText.launch import common


def sbatch_script(args, overrides) -> str:
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={args.gpus_per_node}",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --chdir={args.workdir}",
           # Slurm opens this before the job starts: an absolute path into a folder that exists (main makes it).
           f"#SBATCH --output={Path(args.workdir, args.log_dir).absolute()}/%x-%j.out",
           "#SBATCH --signal=TERM@120"]
  for flag in ("partition", "time", "account"):
    if getattr(args, flag):
      lines.append(f"#SBATCH --{flag}={getattr(args, flag)}")
  lines += [f"#SBATCH {extra}" for extra in args.sbatch]
  lines += ["set -euo pipefail",
            # Unbuffered, so the log shows each process's lines as they come.
            f"srun --kill-on-bad-exit=1 env PYTHONUNBUFFERED=1 "
            f"{common.train_command(args.python, args.config, overrides)}"]
  return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --nodes N --gpus_per_node G [options] [-- key=value ...]")
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, required=True)
  p.add_argument("--cpus_per_task", type=int, default=8)
  p.add_argument("--partition", default="")
  p.add_argument("--time", default="", help="time limit, e.g. 24:00:00")
  p.add_argument("--account", default="")
  p.add_argument("--job_name", default="maxtext")
  p.add_argument("--sbatch", action="append", default=[], metavar="FLAG", help="another #SBATCH line, e.g. --qos=high")
  p.add_argument("--workdir", default=str(common.ROOT), help="the repository on the cluster's shared disk")
  p.add_argument("--log_dir", default="slurm_logs", help="where Slurm writes the job's output (under --workdir)")
  p.add_argument("--script", default="", help="where to write the sbatch script (default: <log_dir>/<job_name>.sbatch)")
  common.add_common(p)
  return p


def main(argv=None) -> int:
  args, overrides = common.parse(parser(), argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    print("error: --nodes and --gpus_per_node must be at least 1", file=sys.stderr)
    return 2
  script = sbatch_script(args, overrides)
  path = Path(args.script or Path(args.workdir) / args.log_dir / f"{args.job_name}.sbatch")
  if args.dry_run:
    print(f"# {path}\n{script}", end="")
    return common.run([["sbatch", str(path)]], dry_run=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  try:
    subprocess.run(["bash", "-n", str(path)], check=True)  # a syntax error is cheaper here than in a queue
  except subprocess.CalledProcessError:
    print(f"error: {path} is not a valid bash script", file=sys.stderr)
    return 2
  return common.run([["sbatch", str(path)]], dry_run=False)


if __name__ == "__main__":
  sys.exit(main())
