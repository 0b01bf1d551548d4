"""The cross-entropy sums behind the training and evaluation losses: from the model's whole logits, or
(`num_vocab_tiling` > 1) chunk by chunk along the length, so the [B, L, V] float32 logits never exist at once.

Chunked, a `lax.scan` runs the family's output projection (`model.logits`) on one [B, L / tiles] chunk of
the final hidden states at a time, reduces it to its sums, and is rematerialised: the backward pass
recomputes each chunk's logits from its hidden states instead of keeping them. Peak memory then holds one
chunk's logits (and their gradient) instead of the whole batch's (benchmarks/chunked_loss_memory.py). The
sums are those of the whole logits, added in another order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from MaxText.models.layers import BLD, BLV
from MaxText.parallel.sharding import constrain


def logit_sums(logits_BLV, targets_BL, mask_BL) -> tuple[jax.Array, jax.Array]:
  """(sum of the targets' negative log-likelihoods, sum of logsumexp^2) over the masked tokens."""
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum((logz_BL - target_logit_BL) * mask_BL)
  return nll_sum, jnp.sum(jnp.square(logz_BL) * mask_BL)


def sums(model, batch: dict, mask_BL, z_loss_multiplier: float, tiles: int = 1):
  """(nll_sum, z_loss_sum, the model's aux) of a batch; tiles > 1 computes them chunk by chunk."""
  inputs = (batch["inputs"], batch["inputs_position"], batch["inputs_segmentation"])
  if tiles == 1:
    logits_BLV, aux = model(*inputs)
    nll_sum, square_sum = logit_sums(logits_BLV, batch["targets"], mask_BL)
    return nll_sum, z_loss_multiplier * square_sum, aux
  h_BLD, aux = model.hidden(*inputs)
  nll_sum, square_sum = chunked_sums(model.logits, h_BLD, batch["targets"], mask_BL, tiles)
  return nll_sum, z_loss_multiplier * square_sum, aux


def chunked_sums(logits_fn, h_BLD, targets_BL, mask_BL, tiles: int) -> tuple[jax.Array, jax.Array]:
  """logit_sums' two sums of logits_fn(h_BLD), over `tiles` length chunks, one chunk's logits at a time."""
  B, L = targets_BL.shape
  C = L // tiles

  def split(x):  # [B, L, ...] -> [tiles, B, C, ...]: every chunk keeps all the rows, so the batch sharding
    return jnp.swapaxes(x.reshape(B, tiles, C, *x.shape[2:]), 0, 1)

  # Nothing of a chunk is saved for the backward pass but its inputs: its logits are recomputed there.
  @jax.checkpoint
  def chunk(carry, xs):
    h_BCD, targets_BC, mask_BC = xs
    logits_BCV = constrain(logits_fn(constrain(h_BCD, BLD)), BLV)
    nll_sum, square_sum = logit_sums(logits_BCV, targets_BC, mask_BC)
    return (carry[0] + nll_sum, carry[1] + square_sum), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, square_sum), _ = jax.lax.scan(chunk, (zero, zero), (split(h_BLD), split(targets_BL), split(mask_BL)))
  return nll_sum, square_sum
