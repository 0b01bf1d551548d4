r"""Train on a Cloud TPU VM slice (every worker of a pod) through `gcloud compute tpus tpu-vm`.

  # create a v5p-8, put this commit on every worker, install, start training in a tmux session:
  python MaxText/launch/tpu_pod.py --tpu mudd --zone us-east5-a --accelerator_type v5p-8 launch -- \
      run_name=mudd model_name=MUDDLlama2Medium dataset_path=gs://BUCKET/pile base_output_directory=gs://BUCKET/runs
  python MaxText/launch/tpu_pod.py --tpu mudd --zone us-east5-a attach          # watch worker 0 (Ctrl-b d detaches)
  python MaxText/launch/tpu_pod.py --tpu mudd --zone us-east5-a logs --worker 1 # the last lines of worker 1's log
  python MaxText/launch/tpu_pod.py --tpu mudd --zone us-east5-a stop            # SIGTERM: save a checkpoint, exit
  python MaxText/launch/tpu_pod.py --tpu mudd --zone us-east5-a delete

Actions: create, install (clone or update the repository at one commit on every worker, then
`pip install -r requirements_tpu.txt`), start (the trainer in a detached tmux session on every worker,
its output also appended to ~/<session>.log), launch (create when --accelerator_type is given, then install
and start), attach, logs, stop, kill (end the tmux sessions), delete. `--dry_run` prints the gcloud commands.
Every worker runs the same command; JAX finds the pod's other workers on its own (TPU_WORKER_HOSTNAMES).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python MaxText/launch/x.py`: the repository root on the path
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MaxText.launch import common

ACTIONS = ("create", "install", "start", "launch", "attach", "logs", "stop", "kill", "delete")


def _topology():
  from MaxText.parallel import topology  # noqa: PLC0415 (pure Python: names, chips, runtime versions)

  return topology


def _git(*args: str) -> str:
  out = subprocess.run(["git", "-C", str(common.ROOT), *args], capture_output=True, text=True)
  return out.stdout.strip() if out.returncode == 0 else ""


def gcloud(args, *rest: str) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", *rest]
  if args.project:
    command.append(f"--project={args.project}")
  return command


def ssh(args, worker: str, remote: str) -> list[str]:
  return gcloud(args, "ssh", args.tpu, f"--zone={args.zone}", f"--worker={worker}", f"--command={remote}")


def create(args) -> list[str]:
  tpu = _topology().parse(args.accelerator_type, "--accelerator_type")  # a wrong name fails here, not after a quota request
  command = gcloud(args, "create", args.tpu, f"--zone={args.zone}", f"--accelerator-type={tpu.name}",
                   f"--version={args.version or tpu.generation.runtime}")
  return command + (["--spot"] if args.spot else [])


def install_script(repo: str, commit: str, directory: str, python: str) -> str:
  """Clone (or fetch) `repo` into `directory`, check out `commit`, install the TPU requirements."""
  d = shlex.quote(directory)
  get = (f"if [ -d {d}/.git ]; then git -C {d} fetch --quiet origin; "
         f"else git clone --quiet {shlex.quote(repo)} {d}; fi")
  return (f"set -e; {get}; git -C {d} checkout --quiet {shlex.quote(commit)}; "
          f"cd {d} && {shlex.quote(python)} -m pip install --quiet -r requirements_tpu.txt")


def start_script(args, overrides) -> str:
  """A detached tmux session running the trainer; its pid goes to ~/<session>.pid for `stop`, its output
  to the pane and to ~/<session>.log, and the pane stays open (a shell) after the trainer exits."""
  session, train = args.session, common.train_command(args.python, args.config, overrides)
  env = " ".join(shlex.quote(e) for e in args.env)
  runner = (f"{'env ' + env + ' ' if env else ''}{train} & echo $! > ~/{session}.pid; wait $!; "
            f"echo trainer exited with code $?; exec bash")
  return (f"cd {shlex.quote(args.dir)} && tmux new-session -d -s {shlex.quote(session)} {shlex.quote(runner)} && "
          f"tmux pipe-pane -o -t {shlex.quote(session)} {shlex.quote(f'cat >> ~/{session}.log')}")


def commands(args, overrides) -> list[list[str]]:
  action, session = args.action, shlex.quote(args.session)
  out = []
  if action == "create" or (action == "launch" and args.accelerator_type):
    if not args.accelerator_type:
      raise SystemExit("error: create needs --accelerator_type (a Cloud TPU name such as v5p-8)")
    out.append(create(args))
  if action in ("install", "launch"):
    repo = args.repo or _git("remote", "get-url", "origin")
    commit = args.commit or _git("rev-parse", "HEAD")
    if not repo or not commit:
      raise SystemExit("error: no git remote 'origin' or commit here; pass --repo URL and --commit REV")
    out.append(ssh(args, "all", install_script(repo, commit, args.dir, args.python)))
  if action in ("start", "launch"):
    common.check_overrides(overrides)
    out.append(ssh(args, "all", start_script(args, overrides)))
  if action == "attach":
    out.append(gcloud(args, "ssh", args.tpu, f"--zone={args.zone}", f"--worker={args.worker}", "--",
                      "-t", f"tmux attach -t {session}"))
  if action == "logs":
    out.append(ssh(args, args.worker, f"tail -n {args.lines} ~/{args.session}.log"))
  if action == "stop":
    # SIGTERM: the trainer saves a checkpoint at the next log step (all workers agree) and exits.
    out.append(ssh(args, "all", f"kill -TERM $(cat ~/{args.session}.pid) 2>/dev/null || true"))
  if action == "kill":
    out.append(ssh(args, "all", f"tmux kill-session -t {session} 2>/dev/null || true"))
  if action == "delete":
    out.append(gcloud(args, "delete", args.tpu, f"--zone={args.zone}", "--quiet"))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --tpu NAME --zone ZONE [options] ACTION [-- key=value ...]")
  p.add_argument("action", choices=ACTIONS)
  p.add_argument("--tpu", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="", help="Google Cloud project (default: gcloud's)")
  p.add_argument("--accelerator_type", default="", help="create: the slice, e.g. v5p-8, v4-32, v5e-256, v6e-8")
  p.add_argument("--version", default="", help="create: TPU VM software version (default: per generation)")
  p.add_argument("--spot", action="store_true", help="create: a Spot (preemptible) TPU")
  p.add_argument("--repo", default="", help="install: git URL (default: this checkout's origin)")
  p.add_argument("--commit", default="", help="install: commit or branch (default: this checkout's HEAD)")
  p.add_argument("--dir", default="maxtext", help="the repository's folder on each worker (under ~)")
  p.add_argument("--session", default="maxtext", help="tmux session name")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="start: environment for the trainer")
  p.add_argument("--worker", default="0", help="attach / logs: which worker")
  p.add_argument("--lines", type=int, default=100, help="logs: how many lines")
  common.add_common(p)
  return p


def main(argv=None) -> int:
  options, overrides = common.split_argv(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(options)
  try:
    cmds = commands(args, overrides)
  except ValueError as e:  # MaxText's ConfigError (an unknown accelerator type) is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  return common.run(cmds, args.dry_run, interactive=args.action == "attach")


if __name__ == "__main__":
  sys.exit(main())
