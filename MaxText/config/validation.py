"""The checks that need more than the config's own values: registered names, the family, the parametrization,
the mesh. `startup.load_config` runs them after resolving the config; every entry point goes through it.

Keys declared with `registry=True` (`decoder_block`, `dataset_type`, `tokenizer_type`, `opt_type`, ...) accept
exactly the names registered for them, so a new family, source, tokenizer or optimizer needs no edit here.
"""

from __future__ import annotations

from MaxText import models
from MaxText.config import schema
from MaxText.errors import ConfigError
from MaxText.inference import sampling
from MaxText.input_pipeline import sources, tokenizer
from MaxText.models import attention, layers, parametrization
from MaxText.parallel import sharding
from MaxText.registry import Registry, registries
from MaxText.training import optimizers

# The modules that create the registries of config keys (importing them creates and fills them).
REGISTRY_MODULES = (models, attention, layers, optimizers, sampling, sources, tokenizer)


def _registered() -> dict[str, Registry]:
  """Config key -> its registry, for every key declared `registry=True`."""
  found = registries()
  missing = [key for key in schema.registry_keys() if key not in found]
  if missing:
    raise ConfigError(f"config key {missing[0]!r} is declared with registry=True but no registry serves it")
  return {key: found[key] for key in schema.registry_keys()}


def choices() -> dict[str, list[str]]:
  """Config key -> its registered names (for --help)."""
  return {key: reg.names() for key, reg in _registered().items()}


def validate(config) -> None:
  """Raise a one-line ConfigError for the first problem found."""
  for key, reg in _registered().items():
    value = getattr(config, key)
    for name in value if isinstance(value, tuple) else (value,):
      reg.check(name)
  parametrization.validate(config)
  models.check_config(config)
  attention.check_config(config)
  batch_ways = sharding.batch_shards(config)
  for key in ("micro_batch_size", "eval_batch_size"):
    if getattr(config, key) % batch_ways:
      raise ConfigError(
          f"{key}={getattr(config, key)} sequences do not split over the {batch_ways} batch shards of the mesh "
          f"(rule 'activation_batch' of logical_axis_rules)")
