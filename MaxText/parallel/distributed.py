"""Multi-process start-up: jax.distributed on TPU pods, Slurm, Open MPI or an explicit coordinator; which
local devices each process drives."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import jax


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
  """True when the environment describes a job of several processes that JAX can join on its own."""
  env = os.environ if env is None else env
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  # A TPU pod slice lists every worker host; a single host lists one (or none).
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def _local_rank_and_size(env: Mapping[str, str]) -> tuple[int, int] | None:
  """(this process's rank among the processes on its host, how many there are), from Slurm or Open MPI."""
  if "OMPI_COMM_WORLD_LOCAL_RANK" in env and "OMPI_COMM_WORLD_LOCAL_SIZE" in env:
    return int(env["OMPI_COMM_WORLD_LOCAL_RANK"]), int(env["OMPI_COMM_WORLD_LOCAL_SIZE"])
  if "SLURM_LOCALID" in env:
    # SLURM_TASKS_PER_NODE reads like "8(x2)" or "4,3": this node's count is not in it for uneven jobs,
    # but SLURM_NTASKS_PER_NODE is set whenever --ntasks-per-node was (what the launchers pass).
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
    return int(env["SLURM_LOCALID"]), int(per_node)
  return None


def local_gpu_count(env: Mapping[str, str] | None = None) -> int:
  """GPUs this process may use: CUDA_VISIBLE_DEVICES when set (Slurm sets it per task), else the NVIDIA
  device files of the host."""
  env = os.environ if env is None else env
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
  return len(glob.glob("/dev/nvidia[0-9]*"))


def local_device_ids(env: Mapping[str, str] | None = None, gpus: int | None = None) -> list[int] | None:
  """The GPUs (indices among those visible) this process drives when a launcher started several per host:
  an equal contiguous share each, so no two processes land on the same GPU. None when there is nothing to
  choose: no GPU, one process per host, or a launcher that already gave each process only its own GPUs."""
  env = os.environ if env is None else env
  gpus = local_gpu_count(env) if gpus is None else gpus
  ranks = _local_rank_and_size(env)
  if not gpus or ranks is None:
    return None
  rank, size = ranks
  if size <= 1:
    return list(range(gpus))  # one process per host drives every GPU (JAX alone would bind it to GPU 0)
  if gpus < size:
    if gpus == 1:
      return None  # the launcher bound each process to a GPU of its own (e.g. srun --gpus-per-task=1)
    raise ValueError(f"{size} processes on this host but only {gpus} GPUs visible to each")
  if gpus % size:
    raise ValueError(f"{gpus} GPUs do not split evenly over the {size} processes on this host")
  share = gpus // size
  return list(range(rank * share, (rank + 1) * share))


def skip_absent_tpu(env: Mapping[str, str] | None = None) -> bool:
  """Keep JAX from loading libtpu on a host without a TPU; returns whether it did.

  requirements.txt installs libtpu (train_compile.py compiles for TPUs from any host), and JAX otherwise
  loads it at start-up wherever it is installed: 700 MB, warnings on stderr, and a lock file that a second
  process on the same host then fails to take. Only when the user chose no platforms (JAX_PLATFORMS) and
  no GPU plugin is installed (those hosts pick their own platforms).
  """
  env = os.environ if env is None else env
  if env.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return False

  if jax.config.jax_platforms or importlib.metadata.entry_points(group="jax_plugins"):
    return False
  try:
    from jax._src import hardware_utils, xla_bridge  # noqa: PLC0415 (JAX's own test for TPU chips on this host)

    if xla_bridge.backends_are_initialized() or hardware_utils.num_available_tpu_chips_and_device_id()[0]:
      return False
  except Exception:  # noqa: BLE001 (private helpers: if they moved, leave JAX's defaults alone)
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


def initialize(values: Mapping[str, Any]) -> None:
  """Call jax.distributed.initialize once, before any JAX computation, when the config asks for it."""
  if jax.distributed.is_initialized():
    return
  skip_absent_tpu()
  mode = values["jax_distributed_initialization"]
  address = values["coordinator_address"]
  if mode == "off":
    return
  if address or mode == "on" or cluster_detected():
    jax.distributed.initialize(
        coordinator_address=address or None,
        num_processes=values["num_processes"] or None,
        process_id=None if values["process_id"] < 0 else values["process_id"],
        local_device_ids=local_device_ids(),
    )


def num_slices() -> int:
  """Groups of devices joined by the slow network: TPU slices when devices say so, else processes."""
  devices = jax.devices()
  if devices[0].platform == "tpu":  # only TPU slice indices describe the data-centre network
    return len({getattr(d, "slice_index", 0) for d in devices})
  return jax.process_count()
