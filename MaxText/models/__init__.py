"""Model registry: a family is one module in this package that decorates its class with `@register`.

A family class is an `nnx.Module` with
  __init__(config, *, rngs)
  __call__(tokens_BL, positions_BL, segment_ids_BL, cache=None) -> (logits_BLV, aux)
      aux: dict; "aux_loss" (a scalar added to the training objective, token-weighted), "cache"
      (the updated decode cache when one was given), and any family-specific intermediates.
  init_cache(batch, max_length) -> cache pytree for decoding
  validate(config)            (classmethod) raise ConfigError for impossible family-specific settings
  flops_per_token(config)     (staticmethod) training FLOPs per token (forward + backward)
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


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  return get_family(config.decoder_block)(config, rngs=rngs)


for _module in pkgutil.iter_modules(__path__):
  if _module.name != "layers":
    importlib.import_module(f"{__name__}.{_module.name}")
