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
  keys                        (class attribute) the family's own config keys, a `config.keys.Group` declared
                              beside it (it may extend another family's group, as MUDD extends Transformer++'s);
                              another family's run that sets one away from its default is a config error
and, for the chunked loss (`num_vocab_tiling` > 1: the output projection and the loss run over length
chunks, so the [B, L, V] logits never exist at once):
  hidden(tokens_BL, positions_BL, segment_ids_BL) -> (h_BLD, aux)   the training forward pass up to the
                              output projection, with the same aux as __call__
  logits(h_BLD) -> logits_BLV float32, position by position, so that logits(hidden(...)[0]) == __call__'s
  cannot_chunk_logits(config) (classmethod) None, or why this family (with this config) cannot be chunked
and, optionally, checkpoint conversion to and from another code base's flat {name: tensor} layout
(`convert_checkpoint.py` only dispatches to these): the class attribute `hf`, a module (`models/hf_llama.py`,
`models/hf_mudd.py`) with MODEL_TYPE (the config.json `model_type`) and
  config_from_hf(hf_config)   (classmethod) an HF config.json dict -> {config key: value}
  hf_config(config)           (classmethod) the config.json dict of this model
  from_hf(config, tensors)    (classmethod) {name: array} (a lazy mapping) -> iterator of (our parameter
                              path "a/b/c", numpy array), one tensor at a time (`conversion.tree` nests them)
  to_hf(config, params)       (classmethod) parameter tree (its leaves may be lazy) -> iterator of (name,
                              numpy array), one tensor at a time
A setting the other side cannot express is a one-line ConfigError naming the key.
Families built from the shared skeleton (embedding, layers, final norm, logits, decode cache) subclass
`models.decoder.Decoder` and write only their layers.
`model_name` picks a preset YAML in configs/models/, and the preset's `decoder_block` picks the family.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flax import nnx

from MaxText.errors import ConfigError
from MaxText.registry import Registry


def _import_families() -> None:
  for module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{module.name}")


FAMILIES: Registry[type] = Registry("decoder_block", "model family", load=_import_families)


class ModelFamily(nnx.Module):
  """Defaults shared by every family."""

  keys: type | None = None
  family_name = ""

  @classmethod
  def validate(cls, config) -> None:
    del config

  @staticmethod
  def flops_per_token(config) -> float:
    raise NotImplementedError

  @classmethod
  def cannot_chunk_logits(cls, config) -> str | None:
    """None when `logits(hidden(...)[0])` are the model's logits, position by position; else why not."""
    del config
    return f"model family {cls.family_name!r} does not split its hidden states from its logits"

  def init_cache(self, batch: int, max_length: int):
    raise ConfigError(f"model family {type(self).__name__} has no decode cache")

  # --- Checkpoint conversion (optional): `hf` is a module with MODEL_TYPE and the four functions below ---
  hf: Any = None

  @classmethod
  def _hf(cls):
    if cls.hf is None:
      raise ConfigError(f"model family {cls.family_name!r} cannot convert Hugging Face checkpoints")
    return cls.hf

  @classmethod
  def hf_model_type(cls) -> str:
    """The config.json `model_type` this family converts ("" none)."""
    return cls.hf.MODEL_TYPE if cls.hf is not None else ""

  @classmethod
  def config_from_hf(cls, hf_config: Mapping[str, Any]) -> dict[str, Any]:
    return cls._hf().config_from_hf(hf_config)

  @classmethod
  def hf_config(cls, config) -> dict[str, Any]:
    return cls._hf().hf_config(config)

  @classmethod
  def from_hf(cls, config, tensors: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    return cls._hf().from_hf(config, tensors)

  @classmethod
  def to_hf(cls, config, params: dict) -> Iterator[tuple[str, Any]]:
    return cls._hf().to_hf(config, params)


def register(name: str) -> Callable[[type], type]:
  def wrap(cls: type) -> type:
    cls.family_name = name
    return FAMILIES.register(name)(cls)
  return wrap


def family_names() -> list[str]:
  return sorted(FAMILIES.names())


def get_family(name: str) -> type:
  return FAMILIES.get(name)


def check_config(config) -> None:
  """The family's own checks, and no key of another family set away from its default (it would be ignored).
  A key several families read (in each one's keys group) is an error only on the families that do not."""
  family = get_family(config.decoder_block)
  own = set(family.keys.model_fields) if family.keys is not None else set()
  for name, other in sorted(FAMILIES.items()):
    if other is family or other.keys is None:
      continue
    for key, declared in other.keys.model_fields.items():
      if key in own:
        continue
      if getattr(config, key) != declared.default:
        raise ConfigError(f"config key {key!r}={getattr(config, key)!r} applies to decoder_block {name!r} only; "
                          f"model {config.model_name!r} is decoder_block {config.decoder_block!r}")
  if config.num_vocab_tiling > 1 and (reason := family.cannot_chunk_logits(config)):
    raise ConfigError(f"num_vocab_tiling={config.num_vocab_tiling} computes the loss chunk by chunk, but {reason}; "
                      f"set num_vocab_tiling=1")
  family.validate(config)


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  return get_family(config.decoder_block)(config, rngs=rngs)
