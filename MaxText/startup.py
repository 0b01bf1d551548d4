"""What every entry point does: join a multi-process job, parse and validate the config, and leave with one of
the exit statuses of `errors` after printing any error in one line.

    @startup.cli
    def main(argv: list[str] | None = None) -> int: ...   # returns EXIT_OK or EXIT_CHECK_FAILED

    if __name__ == "__main__":
      startup.exit_now(main())

    config = startup.load_config(sys.argv)                 # train.py, tools
    config = startup.load_config(sys.argv, for_run=True)   # decode.py, eval.py: the run's config.yml too
    config, tpu, devices = startup.load_topology_config(sys.argv)  # train_compile.py: a TPU slice's devices

Parsing alone (`config.loader`) starts nothing; `jax.distributed.initialize` must run before JAX first counts
devices, so it happens here, between reading the keys and deriving the batch sizes and the mesh.
`exit_now(status)` is how entry points leave: never hanging on a failed save's background threads.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

import jax

from MaxText import errors
from MaxText.config import loader, validation
from MaxText.errors import EXIT_OK, ConfigError
from MaxText.parallel import distributed, topology


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False, **kwargs):
  """The validated Config of argv (= [program, config.yml, key=value, ...]) on this job's devices."""
  values = loader.load(argv, env, for_run=for_run, **kwargs)
  distributed.initialize(values)


  config = loader.derive(values, jax.device_count(), distributed.num_slices())
  validation.validate(config)
  return config


def load_topology_config(argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs):
  """(Config, topology.Slice, devices) for train_compile.py: the config laid out on the compile-only devices
  of `compile_topology` x `compile_topology_num_slices` (from libtpu; this host needs no TPU and joins no job)."""
  if not os.environ.get("JAX_PLATFORMS"):
    # The program runs on no local accelerator: leave a TPU or GPU of this host to whoever trains on it.
    jax.config.update("jax_platforms", "cpu")
  values = loader.load(argv, env, **kwargs)
  if not values["compile_topology"]:
    raise ConfigError("train_compile.py needs compile_topology=<Cloud TPU slice>, e.g. compile_topology=v5p-8")
  tpu = topology.parse(values["compile_topology"])
  devices = topology.devices(tpu.name, values["compile_topology_num_slices"])
  config = loader.derive(values, len(devices), values["compile_topology_num_slices"])
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


def cli(main: Callable[..., int | None] | None = None, *, usage: str = ""):
  """An entry point's `main(argv)` that returns an exit status instead of raising: every error a user can cause
  is one line on stderr (`error: ...`, `stopped: ...`, `interrupted`), never a traceback. With `usage`
  (`@startup.cli(usage=__doc__)`), `--help` or `-h` prints it; `argv` is then sys.argv when None."""
  if main is None:
    return functools.partial(cli, usage=usage)

  @functools.wraps(main)
  def wrapper(argv: Sequence[str] | None = None) -> int:
    if usage:
      argv = list(sys.argv if argv is None else argv)
      if "--help" in argv[1:] or "-h" in argv[1:]:
        print(usage)
        return EXIT_OK
    try:
      status = main(argv)
    except (ConfigError, errors.PrepareError) as e:
      print(f"error: {e}", file=sys.stderr)
      return errors.EXIT_ERROR
    except errors.DivergenceError as e:
      print(f"error: {e}", file=sys.stderr)
      return errors.EXIT_DIVERGED
    except errors.Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      return errors.EXIT_PREEMPTED
    except OSError as e:  # a disk or permission fault outside the paths checked before starting
      where = f" {e.filename}" if e.filename else ""
      print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
      return errors.EXIT_ERROR
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return errors.EXIT_INTERRUPTED
    return EXIT_OK if status is None else int(status)

  return wrapper
