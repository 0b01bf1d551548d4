"""How a parametrization scales a model, decided from parameter roles and widths, never by family.

`parametrization: sp` (standard) leaves every parameter as its family made it (N(0, init_weights_std^2)
matrices and embeddings) with one learning rate. `parametrization: mup` is the maximal update
parametrization with Adam, in the "relative" form of lucaslingle/mu_transformer (TP5 Table 3), where
w = base_emb_dim / mup_base_width is the width ratio:

  role        init                      Adam LR multiplier
  embedding   N(0, 1)                   1
  hidden      N(0, 1/fan_in)            1/w
  readout     N(0, 1/fan_in^2)          1/w
  gain, bias  the family's (1 and 0)    1

and attention logits are q.k / head_dim instead of q.k / sqrt(head_dim). With a tied readout (the
embedding table reused as the output projection) the logits are divided by w instead, which gives the
readout the same Theta(1) updates. Families ask this module only for the attention scale and the output
multiplier; init and learning rates come from the `role`, `fan_in` and `tag` each parameter records
(models/layers.py), so any family that records them gets muP by construction.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp

from MaxText.errors import ConfigError


def validate(config) -> None:
  """Cross-key checks of the parametrization keys."""
  if config.mup_base_width <= 0:
    raise ConfigError(f"config key 'mup_base_width' must be positive, got {config.mup_base_width}")
  if not config.output_logits_multiplier > 0:
    raise ConfigError(f"config key 'output_logits_multiplier' must be positive, got {config.output_logits_multiplier}")
  if config.zero_init_readout and config.logits_via_embedding:
    raise ConfigError("config key 'zero_init_readout' needs an untied readout: it would zero the input embedding "
                      "too (set logits_via_embedding=false)")


def is_mup(config) -> bool:
  return config.parametrization == "mup"


def width_ratio(config) -> float:
  """w = base_emb_dim / mup_base_width: how many times wider than the width the learning rate was tuned at."""
  return config.base_emb_dim / config.mup_base_width


def attention_scale(config, head_dim: int) -> float:
  """Multiplier of q.k in attention logits: 1/sqrt(head_dim) (sp), 1/head_dim (mup).

  Under muP, q and k become correlated as they train, so q.k grows like head_dim rather than its root.
  """
  if is_mup(config):
    return 1.0 / head_dim
  return head_dim**-0.5


def logits_multiplier(config) -> float:
  """Multiplier of the output logits (1.0: none, and the model skips the multiply)."""
  multiplier = config.output_logits_multiplier
  if is_mup(config) and config.logits_via_embedding:
    # A tied table keeps the embedding's N(0, 1) init and LR 1, so the readout is scaled in the forward pass.
    multiplier = multiplier / width_ratio(config)
  return multiplier


def init_std(config, role: str, fan_in: int | None) -> float | None:
  """muP init std of a parameter; None keeps the family's init (gains and biases)."""
  del config
  if role == "embedding":
    return 1.0
  if role == "hidden":
    return fan_in**-0.5
  if role == "readout":
    return 1.0 / fan_in
  return None


def lr_multiplier(config, role: str) -> float:
  """Factor on the Adam learning rate of a parameter of this role."""
  if is_mup(config) and role in ("hidden", "readout"):
    return 1.0 / width_ratio(config)
  return 1.0


def lr_multipliers(config, roles: dict) -> dict | None:
  """The params-shaped tree of LR multipliers, or None when every one is 1 (sp keeps its optax chain)."""
  if not is_mup(config):
    return None
  return jax.tree.map(lambda role: lr_multiplier(config, role), roles)


def _leaves(tree: dict) -> list:
  return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


def init_params(config, spec, params: dict) -> dict:
  """The family's freshly built `params`, redrawn under muP and zeroed where a zero-init option asks.

  Under sp with no zero-init option this returns `params` itself, so sp runs are the foundation's bit for
  bit. Each redrawn parameter gets its own key folded from its path, so its init does not depend on which
  other parameters the family has.
  """
  mup = is_mup(config)
  if not (mup or config.zero_init_query or config.zero_init_readout):
    return params
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  roles, fan_ins, tags = _leaves(spec.roles), _leaves(spec.fan_in), _leaves(spec.tags)
  if not len(flat) == len(roles) == len(fan_ins) == len(tags):
    raise ValueError("the parameter tree does not match the model spec")
  root = jax.random.key(config.init_weights_seed)
  out = []
  for (path, x), role, fan_in, tag in zip(flat, roles, fan_ins, tags):
    if (config.zero_init_query and tag == "query") or (config.zero_init_readout and role == "readout"):
      x = jnp.zeros_like(x)
    elif mup and tag != "keep_init" and (std := init_std(config, role, fan_in)) is not None:
      key = jax.random.fold_in(root, zlib.crc32(jax.tree_util.keystr(path).encode()))
      x = (std * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def check_spec(config, spec) -> None:
  """Options that need something of the model: a one-line ConfigError when the family lacks it."""
  if config.zero_init_query and "query" not in _leaves(spec.tags):
    raise ConfigError(f"config key 'zero_init_query': model family {config.decoder_block!r} tags no query projection")
  if config.zero_init_readout and "readout" not in jax.tree.leaves(spec.roles):
    raise ConfigError(f"config key 'zero_init_readout': model family {config.decoder_block!r} has no readout parameter")


def table(config, spec) -> list[dict[str, Any]]:
  """One row per parameter: path, shape, role, fan_in, tag, init (a std, 'zero' or 'family') and LR multiplier."""
  shapes = jax.tree_util.tree_flatten_with_path(spec.shapes)[0]
  rows = []
  for (path, shape), role, fan_in, tag in zip(shapes, jax.tree.leaves(spec.roles), _leaves(spec.fan_in),
                                              _leaves(spec.tags)):
    if (config.zero_init_query and tag == "query") or (config.zero_init_readout and role == "readout"):
      init = "zero"
    elif is_mup(config) and tag != "keep_init" and init_std(config, role, fan_in) is not None:
      init = init_std(config, role, fan_in)
    else:
      init = "family"  # as the family draws it (under sp: N(0, init_weights_std^2) for most matrices)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    rows.append({"param": name, "shape": tuple(shape.shape), "role": role, "fan_in": fan_in, "tag": tag,
                 "init_std": init, "lr_multiplier": lr_multiplier(config, role)})
  return rows
