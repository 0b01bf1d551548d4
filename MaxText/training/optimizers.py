"""Optimizer chain and learning-rate schedules.

AdamW is written out as its optax parts (clip -> Adam moments -> decoupled decay -> -lr) so that
per-parameter transforms (e.g. a parametrization's learning-rate multipliers) slot in without a fork.
Which parameters decay is decided by their role (see models/layers.py), not by their rank: stacked
layers make gains 2-D. `opt_type: adafactor` swaps the Adam moments for optax's factored second moments
(update clipping at RMS 1, steps relative to each parameter's RMS); the rest of the chain is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from MaxText.models import parametrization
from MaxText.registry import Registry

NO_DECAY_ROLES = ("gain", "bias")
# Parameters that hold running statistics (e.g. a VQ codebook's EMA sums and counts). Their gradient is a
# sum over the step's tokens of their update direction (a family's surrogate loss, aux["codebook_loss"]),
# so they take plain SGD with learning rate 1 in a partition of their own: no Adam, weight decay, clipping
# or schedule, and train_step does not divide their gradient by the token count.
STATISTICS_ROLES = ("codebook",)


# --- Schedules: (config, peak, floor, steps after warmup) -> the decay part of the schedule ---

SCHEDULES: Registry[Callable[..., optax.Schedule]] = Registry("lr_schedule_type", "learning-rate schedule")


@SCHEDULES.register("cosine")
def cosine(config, peak: float, floor: float, steps: int) -> optax.Schedule:
  del floor  # alpha is the floor as a fraction of the peak; after `steps` the floor is held
  return optax.cosine_decay_schedule(peak, steps, alpha=config.learning_rate_final_fraction)


@SCHEDULES.register("linear")
def linear(config, peak: float, floor: float, steps: int) -> optax.Schedule:
  del config
  return optax.linear_schedule(peak, floor, steps)


@SCHEDULES.register("constant")
def constant(config, peak: float, floor: float, steps: int) -> optax.Schedule:
  del config, floor, steps
  return optax.constant_schedule(peak)


@SCHEDULES.register("wsd")
def warmup_stable_decay(config, peak: float, floor: float, steps: int) -> optax.Schedule:
  """Stable at the peak, then a linear decay over the last wsd_decay_steps_fraction of the schedule."""
  decay_steps = max(int(round(config.wsd_decay_steps_fraction * config.learning_rate_schedule_steps)), 1)
  stable = max(steps - decay_steps, 0)
  return optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
                              [stable])


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0, then the decay `lr_schedule_type` names."""
  total = config.learning_rate_schedule_steps
  peak = config.learning_rate
  floor = peak * config.learning_rate_final_fraction
  warmup = int(round(config.warmup_steps_fraction * total))
  decay = SCHEDULES.get(config.lr_schedule_type)(config, peak, floor, max(total - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


# --- Optimizers: config -> the update direction, before and after the learning rate ---

@dataclasses.dataclass(frozen=True)
class Direction:
  """What an `opt_type` contributes to the shared chain (clip -> direction -> decay -> LR multipliers ->
  -learning rate -> after_lr)."""

  direction: tuple[optax.GradientTransformation, ...]
  after_lr: tuple[optax.GradientTransformation, ...] = ()


OPTIMIZERS: Registry[Callable[..., Direction]] = Registry("opt_type", "optimizer")


@OPTIMIZERS.register("adamw")
def adamw(config) -> Direction:
  """Adam moments; the decoupled decay is the shared chain's."""
  return Direction((optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                                        eps_root=config.adam_eps_root, mu_dtype=jnp.float32),))


@OPTIMIZERS.register("adafactor")
def adafactor(config) -> Direction:
  """optax.adafactor's defaults, as the Transformer-VQ PG-19/ImageNet64 runs: factored second moments and
  update clipping at RMS 1; the step is relative to the parameter's RMS (scale_by_param_block_rms)."""
  del config
  return Direction((optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)),
                   (optax.scale_by_param_block_rms(),))


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
  optimizer = OPTIMIZERS.get(config.opt_type)(config)
  statistics = any(role in STATISTICS_ROLES for role in jax.tree.leaves(roles))
  if statistics:
    labels = jax.tree.map(lambda role: "statistics" if role in STATISTICS_ROLES else "main", roles)
    # The main chain sees the other parameters only (optax.partition masks the rest with MaskedNode).
    roles = jax.tree.map(lambda role: optax.MaskedNode() if role in STATISTICS_ROLES else role, roles)
  parts = []
  if config.gradient_clipping_threshold > 0:
    parts.append(optax.clip_by_global_norm(config.gradient_clipping_threshold))
  parts += optimizer.direction
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
  parts += optimizer.after_lr
  tx = optax.chain(*parts)
  if statistics:
    tx = optax.partition({"main": tx, "statistics": optax.sgd(1.0)}, labels)
  return tx, schedule
