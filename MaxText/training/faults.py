"""Kill points for fault injection (tools/fault_injection.py), off unless asked for.

    MAXTEXT_KILL_AT=<kind>:<step>[:<delay seconds>]

makes the process SIGKILL itself when the training loop reaches that point, after the delay (from a
timer thread, so the loop runs on meanwhile: a kill can land anywhere in a background save or a later
step). Kinds: `step` (step <step> was dispatched), `save` (the save of step <step> was started; its write
may still be running), `eval` (the evaluation at step <step> read its first batch). Unset, `reached` is
one comparison.
"""

from __future__ import annotations

import os
import signal
import threading

from MaxText.errors import ConfigError

KINDS = ("step", "save", "eval")
ENV = "MAXTEXT_KILL_AT"


def parse(text: str) -> tuple[str, int, float] | None:
  if not text:
    return None
  parts = text.split(":")
  try:
    kind, step, delay = parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0
  except (IndexError, ValueError):
    kind, step, delay = "", 0, 0.0
  if kind not in KINDS or len(parts) > 3 or delay < 0:
    raise ConfigError(f"{ENV}={text!r} must be <kind>:<step>[:<delay seconds>] with kind one of {', '.join(KINDS)}")
  return kind, step, delay


_TARGET = parse(os.environ.get(ENV, ""))


def _kill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def reached(kind: str, step: int) -> None:
  """Called by the loop at each point; kills the process at the one MAXTEXT_KILL_AT names."""
  if _TARGET is None or _TARGET[0] != kind or _TARGET[1] != step:
    return
  if _TARGET[2] <= 0:
    _kill()
  timer = threading.Timer(_TARGET[2], _kill)
  timer.daemon = True
  timer.start()
