"""Optimizer chain and learning-rate schedules.

AdamW is written out as its optax parts (clip -> Adam moments -> decoupled decay -> -lr) so that
per-parameter transforms (e.g. a parametrization's learning-rate multipliers) slot in without a fork.
Which parameters decay is decided by their role (see models/layers.py), not by their rank: stacked
layers make gains 2-D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NO_DECAY_ROLES = ("gain", "bias")


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0, then cosine / linear decay to a floor, constant, or warmup-stable-decay."""
  total = config.learning_rate_schedule_steps
  peak = config.learning_rate
  floor = peak * config.learning_rate_final_fraction
  warmup = int(round(config.warmup_steps_fraction * total))
  rest = max(total - warmup, 1)
  kind = config.lr_schedule_type
  if kind == "cosine":
    # alpha is the floor as a fraction of the peak; after `total` steps the floor is held.
    decay = optax.cosine_decay_schedule(peak, rest, alpha=config.learning_rate_final_fraction)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, floor, rest)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  elif kind == "wsd":
    decay_steps = max(int(round(config.wsd_decay_steps_fraction * total)), 1)
    stable = max(rest - decay_steps, 0)
    decay = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)], [stable])
  else:
    raise ValueError(f"unknown lr_schedule_type {kind!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(config, roles):
  """True for parameters that weight decay applies to."""
  return jax.tree.map(lambda role: config.weight_decay_on_gains or role not in NO_DECAY_ROLES, roles)


def create(config, roles) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for `opt_type`; `roles` mirrors the parameter tree with role strings."""
  schedule = learning_rate_schedule(config)
  if config.opt_type != "adamw":
    raise ValueError(f"unknown opt_type {config.opt_type!r}")
  parts = []
  if config.gradient_clipping_threshold > 0:
    parts.append(optax.clip_by_global_norm(config.gradient_clipping_threshold))
  parts.append(optax.scale_by_adam(
      b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps, eps_root=config.adam_eps_root,
      mu_dtype=jnp.float32))
  if config.adam_weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.adam_weight_decay, mask=decay_mask(config, roles)))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
