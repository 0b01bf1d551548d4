"""Checks and helpers shared by the model families' tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText import models
from MaxText.models import parametrization
from MaxText.training import train_state


def fast_init(config, spec):
  """The family's own initialisation (and the parametrization's), jitted with counter-based "rbg" keys,
  which compile in a third of the time of the default threefry keys: tests need such parameters, not
  the exact draws of a seed."""

  def build():
    model = models.build(config, nnx.Rngs(jax.random.key(config.init_weights_seed, impl="rbg")))
    return parametrization.init_params(config, spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  return jax.jit(build)()


def assert_causal(config, spec, params, t: int):
  """Over one document of distinct tokens, output t depends on every input up to t and on none after it:
  the gradient of |logits_t|^2 with respect to each position's embedding row is zero exactly after t."""
  L = config.max_target_length
  tokens = jnp.arange(L, dtype=jnp.int32)[None] % config.vocab_size  # a distinct token per position
  positions = jnp.arange(L, dtype=jnp.int32)[None]
  segment_ids = jnp.ones((1, L), jnp.int32)

  def output_t(embedding):
    logits, _ = train_state.bind(spec, {**params, "embed": {"embedding": embedding}})(tokens, positions, segment_ids)
    return jnp.sum(logits[0, t] ** 2)

  row_norms = jnp.linalg.norm(jax.jit(jax.grad(output_t))(params["embed"]["embedding"])[tokens[0]], axis=-1)
  assert jnp.all(row_norms[t + 1:] == 0.0), "an output depends on a later input"
  assert jnp.all(row_norms[: t + 1] > 0.0), "an output ignores an earlier input"
