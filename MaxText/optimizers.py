"""Optimizer chain and learning-rate schedules.

AdamW is written out as its optax parts (clip -> Adam moments -> decoupled decay -> -lr) so that
per-parameter transforms (e.g. a parametrization's learning-rate multipliers) slot in without a fork.
Which parameters decay is decided by their role (see models/layers.py), not by their rank: stacked
layers make gains 2-D. `opt_type: adafactor` swaps the Adam moments for optax's factored second moments
(update clipping at RMS 1, steps relative to each parameter's RMS); the rest of the chain is shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from MaxText import parametrization

NO_DECAY_ROLES = ("gain", "bias")
# Parameters that hold running statistics (e.g. a VQ codebook's EMA sums and counts). Their gradient is a
# sum over the step's tokens of their update direction (a family's surrogate loss, aux["codebook_loss"]),
# so they take plain SGD with learning rate 1 in a partition of their own: no Adam, weight decay, clipping
# or schedule, and train_step does not divide their gradient by the token count.
STATISTICS_ROLES = ("codebook",)


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


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiply each update by its own constant (a tree shaped like the parameters)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create(config, roles) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for `opt_type`; `roles` mirrors the parameter tree with role strings.

  A parametrization's per-parameter LR multipliers (muP) scale the Adam update. Coupled weight decay is
  added before them, so it scales with each parameter's LR as in AdamW; `independent_weight_decay` adds it
  after them with coefficient adam_weight_decay / learning_rate, so the decay is
  adam_weight_decay x schedule / peak whatever the LR and its multipliers.
  """
  schedule = learning_rate_schedule(config)
  if config.opt_type not in ("adamw", "adafactor"):
    raise ValueError(f"unknown opt_type {config.opt_type!r}")
  statistics = any(role in STATISTICS_ROLES for role in jax.tree.leaves(roles))
  if statistics:
    labels = jax.tree.map(lambda role: "statistics" if role in STATISTICS_ROLES else "main", roles)
    # The main chain sees the other parameters only (optax.partition masks the rest with MaskedNode).
    roles = jax.tree.map(lambda role: optax.MaskedNode() if role in STATISTICS_ROLES else role, roles)
  parts = []
  if config.gradient_clipping_threshold > 0:
    parts.append(optax.clip_by_global_norm(config.gradient_clipping_threshold))
  if config.opt_type == "adafactor":
    # optax.adafactor's defaults, as the Transformer-VQ PG-19/ImageNet64 runs: factored second moments and
    # update clipping at RMS 1; the step is relative to the parameter's RMS (scale_by_param_block_rms).
    parts += [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]
  else:
    parts.append(optax.scale_by_adam(
        b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps, eps_root=config.adam_eps_root,
        mu_dtype=jnp.float32))
  multipliers = parametrization.lr_multipliers(config, roles)
  decay = None
  if config.adam_weight_decay > 0:
    rate = config.adam_weight_decay / config.learning_rate if config.independent_weight_decay else config.adam_weight_decay
    decay = optax.add_decayed_weights(rate, mask=decay_mask(config, roles))
  if decay is not None and not config.independent_weight_decay:
    parts.append(decay)
  if multipliers is not None:
    parts.append(scale_by_tree(multipliers))
  if decay is not None and config.independent_weight_decay:
    parts.append(decay)
  parts.append(optax.scale_by_learning_rate(schedule))
  if config.opt_type == "adafactor":
    parts.append(optax.scale_by_param_block_rms())
  tx = optax.chain(*parts)
  if statistics:
    tx = optax.partition({"main": tx, "statistics": optax.sgd(1.0)}, labels)
  return tx, schedule
