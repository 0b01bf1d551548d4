"""What every entry point does first: join a multi-process job, parse the config, validate it.

    config = startup.load_config(sys.argv)                 # train.py, tools
    config = startup.load_config(sys.argv, for_run=True)   # decode.py, eval.py: the run's config.yml too

Parsing alone (`pyconfig`) starts nothing; `jax.distributed.initialize` must run before JAX first counts
devices, so it happens here, between reading the keys and deriving the batch sizes and the mesh.
`exit_now(status)` is how entry points leave: never hanging on a failed save's background threads.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Mapping, Sequence

from MaxText import distributed, pyconfig
from MaxText.errors import EXIT_OK


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False, **kwargs):
  """The validated Config of argv (= [program, config.yml, key=value, ...]) on this job's devices."""
  values = pyconfig.load(argv, env, for_run=for_run, **kwargs)
  distributed.initialize(values)
  import jax  # noqa: PLC0415 (after the job is joined)

  from MaxText import validation  # noqa: PLC0415 (imports every registry: models, data, optimizers)

  config = pyconfig.derive(values, jax.device_count(), distributed.num_slices())
  validation.validate(config)
  return config


def exit_now(status: int) -> None:
  """sys.exit(status), except that background threads left by a failed or abandoned save (Orbax's writers
  can wait on a folder that was never made) must not keep a failed process alive: it then leaves at once."""
  sys.stdout.flush()
  sys.stderr.flush()
  lingering = [t for t in threading.enumerate()
               if t is not threading.main_thread() and t.is_alive() and not t.daemon]
  if status != EXIT_OK and lingering:
    os._exit(status)
  sys.exit(status)
