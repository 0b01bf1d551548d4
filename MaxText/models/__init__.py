"""Model registry: a family is one module in this package that decorates its class with `@register`.

A family class is an `nnx.Module` with
  __init__(config, *, rngs)
  __call__(tokens_BL, positions_BL, segment_ids_BL, cache=None) -> (logits_BLV, aux)
      aux: dict; "aux_loss" (a scalar added to the training objective, token-weighted), "codebook_loss"
      (a zero-valued surrogate whose gradient is the update of the `codebook`-role parameters, added
      unweighted; see optimizers.STATISTICS_ROLES), "cache" (the updated decode cache when one was
      given), and any family-specific intermediates.
  init_cache(batch, max_length) -> cache pytree for decoding
  validate(config)            (classmethod) raise ConfigError for impossible family-specific settings
  flops_per_token(config)     (staticmethod) training FLOPs per token (forward + backward)
  config_keys                 (class attribute) the base_v2.yml keys only this family reads; another
                              family's run that sets one away from its default is a config error
`model_name` picks a preset YAML in configs/models/, and the preset's `decoder_block` picks the family.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from flax import nnx

from MaxText.pyconfig import ConfigError

_FAMILIES: dict[str, type] = {}


class ModelFamily(nnx.Module):
  """Defaults shared by every family."""

  config_keys: tuple[str, ...] = ()

  @classmethod
  def validate(cls, config) -> None:
    del config

  @staticmethod
  def flops_per_token(config) -> float:
    raise NotImplementedError

  def init_cache(self, batch: int, max_length: int):
    raise ConfigError(f"model family {type(self).__name__} has no decode cache")


def register(name: str) -> Callable[[type], type]:
  def wrap(cls: type) -> type:
    if name in _FAMILIES and _FAMILIES[name] is not cls:
      raise ValueError(f"model family {name!r} registered twice")
    _FAMILIES[name] = cls
    cls.family_name = name
    return cls
  return wrap


def family_names() -> list[str]:
  return sorted(_FAMILIES)


def get_family(name: str) -> type:
  if name not in _FAMILIES:
    raise ConfigError(f"unknown decoder_block {name!r}; registered families: {', '.join(family_names())}")
  return _FAMILIES[name]


def check_config(config, defaults: dict) -> None:
  """The family's own checks, and no key of another family set away from its default (it would be ignored)."""
  family = get_family(config.decoder_block)
  for name, other in sorted(_FAMILIES.items()):
    if other is family:
      continue
    for key in other.config_keys:
      if getattr(config, key) != defaults[key]:
        raise ConfigError(f"config key {key!r}={getattr(config, key)!r} applies to decoder_block {name!r} only; "
                          f"model {config.model_name!r} is decoder_block {config.decoder_block!r}")
  family.validate(config)


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  return get_family(config.decoder_block)(config, rngs=rngs)


for _module in pkgutil.iter_modules(__path__):
  if _module.name != "layers":
    importlib.import_module(f"{__name__}.{_module.name}")
