"""What the launchers share: the train command line, the key=value overrides after `--`, and running (or,
with --dry_run, printing) a list of commands. Standard library only: launchers run on a laptop."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "MaxText/configs/base_v2.yml"


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(launcher options, trainer key=value overrides): the overrides follow a `--`."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  at = argv.index("--")
  return argv[:at], argv[at + 1:]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
  """(the launcher's options, the trainer's key=value overrides after `--`), both checked."""
  options, overrides = split_argv(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(options)
  check_overrides(overrides)
  return args, overrides


def check_overrides(overrides: Sequence[str]) -> None:
  for item in overrides:
    if "=" not in item or item.startswith("-"):
      raise SystemExit(f"error: trainer argument {item!r} is not key=value (put them after `--`)")


def train_command(python: str, config: str, overrides: Sequence[str], script: str = "MaxText/train.py") -> str:
  """The shell line that every process runs, relative to the repository root."""
  return shlex.join([python, script, config, *overrides])


def _quote(arg: str) -> str:
  """One argument for bash: bare if safe, else single quotes, else (it holds a single quote) double quotes,
  which read better than shlex's '"'"' splices."""
  if shlex.quote(arg) == arg or "'" not in arg:
    return shlex.quote(arg)
  return '"' + "".join("\\" + c if c in '\\"$`' else c for c in arg) + '"'


def shell_line(command: Sequence[str]) -> str:
  """The command as a bash line a user can paste; `--flag=value` keeps the flag outside the quotes."""
  out = []
  for arg in command:
    flag, eq, value = arg.partition("=")
    if eq and flag.startswith("--") and shlex.quote(flag) == flag:
      out.append(f"{flag}={_quote(value)}")
    else:
      out.append(_quote(arg))
  return " ".join(out)


def add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="the trainer's YAML, relative to the repository")
  parser.add_argument("--python", default="python3", help="the Python interpreter on the machines")


def run(commands: Sequence[Sequence[str]], dry_run: bool, interactive: bool = False) -> int:
  """Run each command in turn (stop at the first failure), or print them as shell lines."""
  for command in commands:
    if dry_run:
      print(shell_line(command), flush=True)
      continue
    print(f"+ {shell_line(command)}", file=sys.stderr, flush=True)
    try:
      code = subprocess.call(list(command), stdin=None if interactive else subprocess.DEVNULL)
    except FileNotFoundError:
      print(f"error: {command[0]} is not installed or not on PATH", file=sys.stderr)
      return 2
    if code:
      print(f"error: {command[0]} exited with code {code}", file=sys.stderr)
      return code
  return 0
