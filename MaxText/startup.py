"""What every entry point does first: join a multi-process job, parse the config, validate it.

    config = startup.load_config(sys.argv)                 # train.py, tools
    config = startup.load_config(sys.argv, for_run=True)   # decode.py, eval.py: the run's config.yml too
    config, tpu, devices = startup.load_topology_config(sys.argv)  # train_compile.py: a TPU slice's devices

Parsing alone (`pyconfig`) starts nothing; `jax.distributed.initialize` must run before JAX first counts
devices, so it happens here, between reading the keys and deriving the batch sizes and the mesh.
`exit_now(status)` is how entry points leave: never hanging on a failed save's background threads.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Mapping, Sequence

from MaxText import pyconfig
from MaxText.errors import EXIT_OK, ConfigError
from MaxText.parallel import distributed


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False, **kwargs):
  """The validated Config of argv (= [program, config.yml, key=value, ...]) on this job's devices."""
  values = pyconfig.load(argv, env, for_run=for_run, **kwargs)
  distributed.initialize(values)
  import jax  # noqa: PLC0415 (after the job is joined)

  from MaxText import validation  # noqa: PLC0415 (imports every registry: models, data, optimizers)

  config = pyconfig.derive(values, jax.device_count(), distributed.num_slices())
  validation.validate(config)
  return config


def load_topology_config(argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs):
  """(Config, topology.Slice, devices) for train_compile.py: the config laid out on the compile-only devices
  of `compile_topology` x `compile_topology_num_slices` (from libtpu; this host needs no TPU and joins no job)."""
  import jax  # noqa: PLC0415

  from MaxText import validation  # noqa: PLC0415
  from MaxText.parallel import topology  # noqa: PLC0415

  if not os.environ.get("JAX_PLATFORMS"):
    # The program runs on no local accelerator: leave a TPU or GPU of this host to whoever trains on it.
    jax.config.update("jax_platforms", "cpu")
  values = pyconfig.load(argv, env, **kwargs)
  if not values["compile_topology"]:
    raise ConfigError("train_compile.py needs compile_topology=<Cloud TPU slice>, e.g. compile_topology=v5p-8")
  tpu = topology.parse(values["compile_topology"])
  devices = topology.devices(tpu.name, values["compile_topology_num_slices"])
  config = pyconfig.derive(values, len(devices), values["compile_topology_num_slices"])
  validation.validate(config)
  return config, tpu, devices


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
