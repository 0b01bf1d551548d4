"""How a decoder picks the next token from its logits: the strategies of `decode_sampling_strategy`.

A strategy is a function registered in STRATEGIES, `strategy(logits_BV, rng, settings) -> token_B`, where
`settings` holds the traced values temperature, top_k and nucleus_p. `sample` runs the chosen one through
`lax.switch` over the registry, so the strategy itself may be a traced index: one compiled decode loop
serves every strategy and setting.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from MaxText.registry import Registry

STRATEGIES: Registry[Callable[..., jax.Array]] = Registry("decode_sampling_strategy", "sampling strategy")


def _categorical(logits_BV, rng):
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@STRATEGIES.register("greedy")
def greedy(logits_BV, rng, settings):
  del rng, settings
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@STRATEGIES.register("weighted")
def weighted(logits_BV, rng, settings):
  """Softmax of logits / temperature."""
  return _categorical(logits_BV / settings["temperature"], rng)


@STRATEGIES.register("topk")
def topk(logits_BV, rng, settings):
  """As weighted, among the k most likely tokens."""
  logits_BV = logits_BV / settings["temperature"]
  V = logits_BV.shape[-1]
  descending_BV = -jnp.sort(-logits_BV, axis=-1)
  kth_B1 = descending_BV[:, jnp.clip(settings["top_k"], 1, V) - 1][:, None]
  return _categorical(jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf), rng)


@STRATEGIES.register("nucleus")
def nucleus(logits_BV, rng, settings):
  """As weighted, among the fewest most likely tokens whose probabilities reach p (top-p)."""
  logits_BV = logits_BV / settings["temperature"]
  descending_BV = -jnp.sort(-logits_BV, axis=-1)
  probs_BV = jax.nn.softmax(descending_BV, axis=-1)
  # A token is kept while the probability mass before it is below p, so the most likely always is.
  kept_B1 = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < settings["nucleus_p"], axis=-1, keepdims=True)
  threshold_B1 = jnp.take_along_axis(descending_BV, kept_B1 - 1, axis=-1)
  return _categorical(jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf), rng)


def index(strategy: str) -> int:
  """The position of a strategy in the registry: the traced form of `decode_sampling_strategy`."""
  STRATEGIES.check(strategy)
  return STRATEGIES.names().index(strategy)


def sample(logits_BV: jax.Array, rng: jax.Array, strategy, *, temperature=1.0, top_k=40, nucleus_p=0.9) -> jax.Array:
  """One token id per row; `strategy` is a name or its (possibly traced) `index`. Only the chosen
  strategy's branch runs."""
  if isinstance(strategy, str):
    strategy = index(strategy)
  settings = {"temperature": temperature, "top_k": top_k, "nucleus_p": nucleus_p}
  branches = [lambda logits, fn=fn: fn(logits, rng, settings) for _, fn in STRATEGIES.items()]
  return jax.lax.switch(strategy, branches, logits_BV.astype(jnp.float32))
