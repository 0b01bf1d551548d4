"""MUDD dense connections: the sizes of every layer's connection and the module that makes and mixes them.

After layer i (0-based) the states so far are X_0 (the embedding) .. X_{i+1} (the layer's output), J = i + 2
of them. A dense-aggregation (DA) module turns them into the next layer's inputs, one aggregate per stream
group c:
    A_i = GELU(RMSNorm(X_{i+1}) W1) W2 + a_i          [B, L, C, J]   (static only: A_i = a_i)
    stream_c = sum_j A_i[..., c, j] X_j
Everything mixes positions only with themselves, so decoding needs no cache beyond the attention's.
Pure helpers here (no parameters) size the modules, so flops_per_token and the tools agree with the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText.errors import ConfigError
from MaxText.models import layers
from MaxText.models.layers import BLD
from MaxText.parallel.sharding import constrain

STREAMS = "qkvr"  # query, key, value and residual inputs of a block
GENERATOR_ROUND = 64  # generator widths round as the reference: (n // 64 + 1) * 64, so 64 becomes 128
MLP_ROUND = 128
POST_NORM_SCALE = 1e-3  # the post-norm starts nearly closed, so the residual stream starts as X_{i+1}


def parse_streams(spec: str) -> tuple[str, ...]:
  """'q,k,v,r' -> ('q', 'k', 'v', 'r'); 'qkvr' -> ('qkvr',): each group shares one aggregate."""
  if not spec.strip():
    return ()
  groups = tuple(g.strip() for g in spec.split(","))
  letters = "".join(groups)
  if any(not g for g in groups) or any(s not in STREAMS for s in letters) or len(set(letters)) != len(letters):
    raise ConfigError(f"config key 'mudd_streams' must be comma-separated groups of the letters q, k, v, r, each "
                      f"used at most once (e.g. 'q,k,v,r', 'qkvr' or ''), got {spec!r}")
  return groups


def layer_groups(config, layer: int) -> tuple[str, ...]:
  """Stream groups aggregated after `layer`: all of them, but after the last only the residual's."""
  groups = parse_streams(config.mudd_streams)
  if layer == config.base_num_decoder_layers - 1:
    return tuple(g for g in groups if "r" in g)
  return groups


def generator_width(config, layer: int) -> int:
  """Hidden width M of the weight generator after `layer`: C*J (x the last-layer expansion), rounded up."""
  C, J = len(layer_groups(config, layer)), layer + 2
  expand = config.mudd_last_layer_hidden_expand if layer == config.base_num_decoder_layers - 1 else 1
  if not config.mudd_generator_round64:
    return C * J * expand
  return (C * J * expand // GENERATOR_ROUND + 1) * GENERATOR_ROUND


def mlp_widths(config) -> list[int]:
  """Per-layer MLP widths: base_mlp_dim everywhere, or 0.5x -> 1.5x over depth (FFN re-allocation), whose total
  must be N x base_mlp_dim unless mlp_dim_scale_exact_total is false (the release does not check it)."""
  N, F = config.base_num_decoder_layers, config.base_mlp_dim
  if not config.mlp_dim_scale_with_depth:
    return [F] * N
  if N < 2:
    raise ConfigError("config key 'mlp_dim_scale_with_depth' needs base_num_decoder_layers >= 2")
  # Python's round (half to even) as the reference, so the widths match its checkpoints.
  widths = [round(F * (i / (N - 1) + 0.5) / MLP_ROUND) * MLP_ROUND for i in range(N)]
  problem = "a width of 0" if min(widths) <= 0 else f"a total of {sum(widths)}, not {N * F}"
  if min(widths) <= 0 or (config.mlp_dim_scale_exact_total and sum(widths) != N * F):
    raise ConfigError(
        f"config key 'mlp_dim_scale_with_depth': base_mlp_dim={F} over {N} layers, rounded to {MLP_ROUND}, gives "
        f"{problem} (widths {widths[0]}..{widths[-1]}); pick another base_mlp_dim")
  return widths


def shared_attention_input(config, layer: int | None = None) -> bool:
  """Whether q, k and v read one tensor through one norm: always when one group holds all three or none is
  aggregated; at layer 0 (whose inputs are all the embedding) also with mudd_layer0_shared_norm."""
  groups = parse_streams(config.mudd_streams)
  if any(set("qkv") <= set(g) for g in groups) or not any(s in g for g in groups for s in "qkv"):
    return True
  return layer == 0 and config.mudd_layer0_shared_norm


def mixing_macs_per_token(config) -> int:
  """Multiply-adds per token of the weighted sums over all layers: sum_i C_i * J_i * D."""
  return sum(len(layer_groups(config, i)) * (i + 2) * config.base_emb_dim
             for i in range(config.base_num_decoder_layers))


class DenseConnection(nnx.Module):
  """The DA module after one layer: weights from X_{i+1}, the copy of X_{i+1} that is aggregated, the mix."""

  def __init__(self, config, layer: int, *, rngs: nnx.Rngs):
    D = config.base_emb_dim
    self.groups = layer_groups(config, layer)
    C, J = len(self.groups), layer + 2
    self.dtype = jnp.dtype(config.dtype)
    weight_dtype = jnp.dtype(config.weight_dtype)
    prepost = config.mudd_prepostnorm
    gains = prepost and config.use_norm_gains
    norm = dict(eps=config.normalization_layer_epsilon, dtype=self.dtype, weight_dtype=weight_dtype, rngs=rngs)
    self.dynamic = config.mudd_dynamic
    self.activation = layers.ACTIVATIONS.get(config.mudd_generator_activation)
    if self.dynamic:
      M = generator_width(config, layer)
      # As the reference: the generator's norm has a learnable scale only with the pre/post norms.
      self.generator_norm = layers.RMSNorm(D, use_scale=gains, **norm)
      self.w1 = layers.param(rngs, layers.normal(D**-0.5), (D, M), ("embed", "mudd_hidden"), role="hidden",
                             dtype=weight_dtype, fan_in=D)
      # W2 = 0 makes A_i = a_i at init, so the model starts as a plain Transformer; no parametrization redraws it.
      self.w2 = layers.param(rngs, layers.constant(0.0), (M, C, J), ("mudd_hidden", "mudd_streams", "mudd_sources"),
                             role="hidden", dtype=weight_dtype, fan_in=M, tag="keep_init")
    # Without the pre/post norms, a_i = one-hot(X_{i+1}) passes the layer output on unchanged; with them the
    # output is added as a residual anyway, so a_i starts at 0.
    bias = jnp.zeros((C, J)) if prepost else jnp.zeros((C, J)).at[:, -1].set(1.0)
    self.bias = layers.param(rngs, lambda key, shape, dtype: bias.astype(dtype), (C, J),
                             ("mudd_streams", "mudd_sources"), role="bias", dtype=weight_dtype)
    self.prepostnorm = prepost
    if prepost:
      self.source_norm = layers.RMSNorm(D, use_scale=config.use_norm_gains, **norm)
      if any("r" in g for g in self.groups):
        # The post-norm's 1e-3 scale keeps the residual stream near X_{i+1} at init: always learnable.
        self.post_norm = layers.RMSNorm(D, scale_init=POST_NORM_SCALE, **norm)

  def weights(self, x_BLD: jax.Array) -> jax.Array:
    """A_i: [B, L, C, J] (dynamic) or [C, J] (static), in the activation dtype as the reference."""
    dt = self.dtype
    bias_CJ = self.bias[...].astype(dt)
    if not self.dynamic:
      return bias_CJ
    h_BLM = self.activation(jnp.einsum("bld,dm->blm", self.generator_norm(x_BLD), self.w1[...].astype(dt)))
    w_BLCJ = jnp.einsum("blm,mcj->blcj", h_BLM, self.w2[...].astype(dt)) + bias_CJ
    return constrain(w_BLCJ, layers.axes("BLCJ"))

  def source(self, x_BLD: jax.Array) -> jax.Array:
    """The copy of a layer output that later layers aggregate (normalised with the pre/post norms)."""
    return self.source_norm(x_BLD) if self.prepostnorm else x_BLD

  def mix(self, w, sources: list[jax.Array], x_BLD: jax.Array) -> dict[str, jax.Array]:
    """The aggregated inputs of the next block, keyed by stream letter (only the aggregated ones)."""
    B, L, _ = x_BLD.shape
    w_BLCJ = jnp.broadcast_to(w, (B, L, *w.shape[-2:]))  # a static [C, J] applies to every position
    mixed_BLCD = weighted_sum(w_BLCJ, tuple(sources))
    streams = {}
    for c, group in enumerate(self.groups):
      acc = mixed_BLCD[:, :, c]
      if self.prepostnorm:  # pre/post norms: the aggregate is a correction added to the output
        if "r" in group:
          acc = self.post_norm(acc).astype(jnp.float32)
        acc = x_BLD.astype(jnp.float32) + acc
      aggregate = constrain(acc.astype(self.dtype), BLD)
      streams.update(dict.fromkeys(group, aggregate))
    return streams


def _weighted_sum(w_BLCJ, sources):
  s_BLJD = jnp.stack(sources, axis=2)
  # Accumulated in float32: up to N + 1 bf16 terms would lose bits.
  return jnp.einsum("blcj,bljd->blcd", w_BLCJ, s_BLJD, preferred_element_type=jnp.float32)


@jax.custom_vjp
def weighted_sum(w_BLCJ: jax.Array, sources: tuple[jax.Array, ...]) -> jax.Array:
  """mixed[b, l, c] = sum_j w[b, l, c, j] * sources[j][b, l] as float32 [B, L, C, D].

  One contraction per layer keeps the program size linear in depth (a sum of J products per stream made
  the 24-layer train step compile 5x slower than its twin); the custom gradient keeps the J states as
  its residuals, which later layers hold anyway, where autodiff would save the stacked copy per layer.
  """
  return _weighted_sum(w_BLCJ, sources)


def _weighted_sum_fwd(w_BLCJ, sources):
  return _weighted_sum(w_BLCJ, sources), (w_BLCJ, sources)


def _weighted_sum_bwd(residuals, g_BLCD):
  w_BLCJ, sources = residuals
  s_BLJD = jnp.stack(sources, axis=2)
  gs_BLJD = jnp.einsum("blcj,blcd->bljd", w_BLCJ, g_BLCD, preferred_element_type=jnp.float32)
  gw_BLCJ = jnp.einsum("blcd,bljd->blcj", g_BLCD, s_BLJD, preferred_element_type=jnp.float32)
  return gw_BLCJ.astype(w_BLCJ.dtype), tuple(gs_BLJD[:, :, j].astype(s.dtype) for j, s in enumerate(sources))


weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)
