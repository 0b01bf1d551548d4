"""Cloud TPU slice names -> chip counts, physical shapes, HBM, and compile-only devices for ahead-of-time compiles.

Cloud TPU names count TensorCores on v4 and v5p (two per chip: `v5p-8` is 4 chips, 2x2x1) and chips on
v5e and v6e (`v5e-8` is 8 chips, 2x4); JAX sees one device per chip on all four (v4 and v5p run their two
cores as one "megacore" device). `devices(name, num_slices)` asks libtpu (the `libtpu` package, no TPU
needed) for the devices of such a slice, which `jax.jit(...).lower(...).compile()` can target from a CPU host.
Pure Python apart from `devices`, so launchers may import it.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jax.experimental import topologies

from MaxText.errors import ConfigError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
  cloud: str  # name prefix in Cloud TPU accelerator types
  libtpu: str  # name prefix in libtpu topology strings
  dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  cores_per_chip: int  # what the number in the Cloud name counts, per chip
  hbm_bytes: int  # HBM per chip, as the Cloud TPU documentation states it
  chip_config: str  # "megacore": one JAX device per chip on two-core chips
  runtime: str  # TPU VM software version for `gcloud compute tpus tpu-vm create --version`


GENERATIONS = {
    "v4": Generation("v4", "v4", 3, 2, 32 * GiB, "megacore", "tpu-ubuntu2204-base"),
    "v5p": Generation("v5p", "v5", 3, 2, 95 * GiB, "megacore", "v2-alpha-tpuv5"),
    "v5e": Generation("v5e", "v5e", 2, 1, 16 * GiB, "default", "v2-alpha-tpuv5-lite"),
    "v6e": Generation("v6e", "v6e", 2, 1, 32 * GiB, "default", "v2-alpha-tpuv6e"),
}
ALIASES = {"v5litepod": "v5e"}  # the API's name for v5e slices


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice, e.g. `v5p-8`: 4 chips in a 2x2x1 torus."""

  name: str
  generation: Generation
  chips: int
  shape: tuple[int, ...]

  @property
  def topology(self) -> str:
    """libtpu's name for it, e.g. "v5:2x2x1"."""
    return f"{self.generation.libtpu}:{'x'.join(map(str, self.shape))}"

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_bytes

  @property
  def wrap(self) -> tuple[bool, ...]:
    """Wrap-around links: a 3-D slice is a torus along every side of length >= 4 (full cubes of 4x4x4
    chips and up); a 2-D slice only as a whole 16x16 pod."""
    if self.generation.dims == 3:
      full = all(n >= 4 for n in self.shape)
      return tuple(full for _ in self.shape)
    return (self.shape == (16, 16),) * 2 + (False,)


def _shape(generation: Generation, chips: int) -> tuple[int, ...] | None:
  if generation.dims == 2:
    shapes = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
    return shapes.get(chips)
  # 3-D slices grow from one host's 2x2x1 by doubling the shortest side, last axis first on ties:
  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (the shapes Cloud TPU offers for these names).
  x, y, z = 2, 2, 1
  while x * y * z < chips:
    if x < y:
      x *= 2
    elif y < z:
      y *= 2
    else:
      z *= 2
  return (x, y, z) if x * y * z == chips else None


def names(generation: str) -> list[str]:
  """Every slice name of a generation this table knows, smallest first."""
  g = GENERATIONS[generation]
  counts = [1, 4, 8, 16, 32, 64, 128, 256] if g.dims == 2 else [4 << k for k in range(11)]
  return [f"{g.cloud}-{c * g.cores_per_chip}" for c in counts]


def parse(name: str, what: str = "compile_topology") -> Slice:
  """`v5p-8`, `v4-32`, `v5e-256` (or `v5litepod-256`), `v6e-8` -> Slice; anything else is a ConfigError
  that names `what` (the key or flag that gave the name)."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  if not m:
    raise ConfigError(f"{what} {name!r} is not a Cloud TPU slice name like v5p-8, v4-32 or v5e-256 "
                      f"(known: {known})")
  prefix, count = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
  if prefix not in GENERATIONS:
    raise ConfigError(f"{what} {name!r}: unknown TPU generation {m.group(1)!r} (known: {known})")
  g = GENERATIONS[prefix]
  shape = _shape(g, count // g.cores_per_chip) if count % g.cores_per_chip == 0 else None
  if shape is None:
    raise ConfigError(f"{what} {name!r} is not a {g.cloud} slice this table knows "
                      f"({', '.join(names(prefix))})")
  return Slice(f"{g.cloud}-{count}", g, count // g.cores_per_chip, shape)


def devices(name: str, num_slices: int = 1) -> list:
  """The compile-only JAX devices of `num_slices` slices `name` (one per chip), from libtpu on any host."""
  # libtpu takes a host-wide lock file when it loads, meant for the chips; a topology description claims
  # no chip, so concurrent compiles (and a TPU VM's own training run) must not exclude each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  tpu = parse(name)
  # Off a TPU VM libtpu looks for the VM's own accelerator and workers and warns when it finds none; the
  # described slice needs neither, so name them to keep stderr for real problems.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if num_slices < 1:
    raise ConfigError(f"compile_topology_num_slices must be at least 1, got {num_slices}")
  # A single chip is its own host; everything else is simulated as hosts of 2x2 chips, as on Cloud TPU VMs
  # (v5e-8 and v6e-8 hosts hold 8 chips, which changes nothing for the compiled program).
  per_host = (1, 1, 1) if tpu.chips == 1 else (2, 2, 1)
  try:
    topo = topologies.get_topology_desc(
        topology_name=tpu.topology, platform="tpu", chip_config_name=tpu.generation.chip_config,
        chips_per_host_bounds=per_host, wrap=tpu.wrap, num_slices=num_slices)
  except RuntimeError as e:
    if "not installed" in str(e):
      raise ConfigError("compile_topology needs libtpu (pip install -r requirements.txt installs it); "
                        "no TPU is needed") from None
    raise ConfigError(f"libtpu cannot describe compile_topology {name!r} ({tpu.topology}): "
                      f"{' '.join(str(e).split())[:200]}") from None
  return list(topo.devices)
