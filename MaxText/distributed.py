"""Multi-process start-up: jax.distributed on TPU pods, Slurm, Open MPI or an explicit coordinator."""

from __future__ import annotations

import os
from typing import Any, Mapping


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
  """True when the environment describes a job of several processes that JAX can join on its own."""
  env = os.environ if env is None else env
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  # A TPU pod slice lists every worker host; a single host lists one (or none).
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(values: Mapping[str, Any]) -> None:
  """Call jax.distributed.initialize once, before any JAX computation, when the config asks for it."""
  import jax  # noqa: PLC0415

  if jax.distributed.is_initialized():
    return
  mode = values["jax_distributed_initialization"]
  address = values["coordinator_address"]
  if mode == "off":
    return
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=values["num_processes"] or None,
        process_id=None if values["process_id"] < 0 else values["process_id"],
    )
  elif mode == "on" or cluster_detected():
    jax.distributed.initialize()


def num_slices() -> int:
  """Groups of devices joined by the slow network: TPU slices when devices say so, else processes."""
  import jax  # noqa: PLC0415

  devices = jax.devices()
  if devices[0].platform == "tpu":  # only TPU slice indices describe the data-centre network
    return len({getattr(d, "slice_index", 0) for d in devices})
  return jax.process_count()
