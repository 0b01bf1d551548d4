"""Pure training and evaluation steps over the state pytree (see train_state.py)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from MaxText.training import cross_entropy
from MaxText.training.optimizers import STATISTICS_ROLES
from MaxText.training.train_state import ModelSpec, bind

BATCH_KEYS = ("inputs", "targets", "inputs_position", "inputs_segmentation", "targets_segmentation")
SUM_KEYS = ("nll_sum", "z_loss_sum", "aux_loss_sum", "tokens")


def loss_sums(model, batch: dict, z_loss_multiplier: float, vocab_tiles: int = 1) -> tuple[jax.Array, dict]:
  """Summed (not averaged) objective over the batch's target tokens, and the sums behind it.

  Sums make micro-batches add up exactly: the mean is taken once, over every token of the step.
  `vocab_tiles` > 1 computes the cross-entropy chunk by chunk (cross_entropy.py).
  """
  mask_BL = (batch["targets_segmentation"] != 0).astype(jnp.float32)
  nll_sum, z_loss_sum, aux = cross_entropy.sums(model, batch, mask_BL, z_loss_multiplier, vocab_tiles)
  tokens = jnp.sum(mask_BL)
  # A family's extra loss is a per-token mean; weighting by tokens keeps accumulation exact.
  aux_loss_sum = jnp.asarray(aux.get("aux_loss", 0.0), jnp.float32) * tokens
  # The gradient of a family's statistics surrogate (zero-valued) is already a sum over the micro-batch:
  # it is added unweighted, and only the statistics parameters see it (optimizers.STATISTICS_ROLES).
  statistics = jnp.asarray(aux.get("codebook_loss", 0.0), jnp.float32)
  sums = {"nll_sum": nll_sum, "z_loss_sum": z_loss_sum, "aux_loss_sum": aux_loss_sum, "tokens": tokens}
  return nll_sum + z_loss_sum + aux_loss_sum + statistics, sums


def split_micro_batches(batch: dict, n: int) -> dict:
  """[n*M, ...] -> [n, M, ...] taking rows n apart, so every micro-batch draws from every batch shard."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(config, spec: ModelSpec, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[dict, dict], tuple[dict, dict]]:
  """`nan_policy: skip` keeps the old parameters and optimizer state when the loss, the gradient norm or the
  new parameters are not finite, and reports `skipped_steps` (divergence.py reads the same metrics)."""
  accumulation = config.gradient_accumulation_steps
  # Unrolled, the micro-batches' gradients depend on nothing but the parameters, so XLA's runtime can
  # compute them at the same time; only their sum waits for all of them.
  unroll = bool(config.gradient_accumulation_unroll)
  skip_nonfinite = config.nan_policy == "skip"
  z_loss = config.z_loss_multiplier
  # Statistics parameters take their summed gradient whole; the rest the per-token mean.
  per_token = jax.tree.map(lambda role: role not in STATISTICS_ROLES, spec.roles)

  def grad_sums(params, batch):
    fn = lambda p: loss_sums(bind(spec, p), batch, z_loss, config.num_vocab_tiling)
    (_, sums), grads = jax.value_and_grad(fn, has_aux=True)(params)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), sums

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    params = state["params"]
    if accumulation == 1:
      grads, sums = grad_sums(params, batch)
    else:
      def body(carry, micro):
        grads, sums = grad_sums(params, micro)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params),
               {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
      (grads, sums), _ = jax.lax.scan(body, zeros, split_micro_batches(batch, accumulation), unroll=unroll)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g, mean: g / tokens if mean else g, grads, per_token)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_params = jax.tree.map(lambda new, old: new.astype(old.dtype), new_params, params)
    metrics = {
        "loss": sums["nll_sum"] / tokens,
        "z_loss": sums["z_loss_sum"] / tokens,
        "aux_loss": sums["aux_loss_sum"] / tokens,
        "tokens": sums["tokens"],
        "grad_norm": optax.global_norm(jax.tree.map(lambda g, mean: g if mean else jnp.zeros(()), grads, per_token)),
        "param_norm": optax.global_norm(new_params),
        "learning_rate": schedule(state["step"]),
    }
    if skip_nonfinite:
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics["param_norm"])
      keep = lambda new, old: jnp.where(finite, new, old)
      new_params = jax.tree.map(keep, new_params, params)
      opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
      metrics["skipped_steps"] = jnp.logical_not(finite).astype(jnp.float32)
    new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  return train_step


def make_eval_step(config, spec: ModelSpec, token_bytes=None) -> Callable[[dict, dict], dict]:
  """Summed loss and token count of a batch; with `token_bytes` ([V] bytes of text per token id) also the
  bytes the target tokens stand for, the denominator of bits per byte."""

  def eval_step(params: dict, batch: dict) -> dict:
    _, sums = loss_sums(bind(spec, params), batch, config.z_loss_multiplier, config.num_vocab_tiling)
    out = {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"]}
    if token_bytes is not None:
      bytes_BL = jnp.take(jnp.asarray(token_bytes, jnp.float32), batch["targets"], axis=0)
      out["bytes"] = jnp.sum(jnp.where(batch["targets_segmentation"] != 0, bytes_BL, 0.0))
    return out

  return eval_step
