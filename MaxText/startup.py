"""What every entry point does first: join a multi-process job, parse the config, validate it.

    config = startup.load_config(sys.argv)                 # train.py, tools
    config = startup.load_config(sys.argv, for_run=True)   # decode.py, eval.py: the run's config.yml too

Parsing alone (`pyconfig`) starts nothing; `jax.distributed.initialize` must run before JAX first counts
devices, so it happens here, between reading the keys and deriving the batch sizes and the mesh.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from MaxText import distributed, pyconfig


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None, *, for_run: bool = False, **kwargs):
  """The validated Config of argv (= [program, config.yml, key=value, ...]) on this job's devices."""
  values = pyconfig.load(argv, env, for_run=for_run, **kwargs)
  distributed.initialize(values)
  import jax  # noqa: PLC0415 (after the job is joined)

  from MaxText import validation  # noqa: PLC0415 (imports every registry: models, data, optimizers)

  config = pyconfig.derive(values, jax.device_count(), distributed.num_slices())
  validation.validate(config)
  return config
