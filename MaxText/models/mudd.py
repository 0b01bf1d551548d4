"""MUDDFormer (`decoder_block: mudd`): Transformer++ layers joined by multiway dynamic dense connections.

Xiao et al. 2025 (arXiv:2502.12170), as the reference JAX code (Caiyun-AI/MUDDFormer) computes it. Each
block takes four inputs: queries, keys and values from their own pre-norms and projections, and the
residual stream, to which the attention and MLP outputs are added. After every layer a dense connection
(models/mudd_dense.py) mixes all earlier states into those inputs. `mudd_streams`, `mudd_dynamic`,
`mudd_prepostnorm` and `mlp_dim_scale_with_depth` express the paper's ablations (docs/mudd.md).

The layers are unrolled, each a submodule `layer_<i>` of its own: layer i mixes i + 2 states, so their
shapes differ and a layer scan does not fit (docs/mudd.md weighs pad-and-mask against this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText.config.keys import Bool, Int, Str, key
from MaxText.errors import ConfigError
from MaxText.models import decoder, hf_mudd, layers, mudd_dense, register, transformer_pp
from MaxText.models.layers import BLD
from MaxText.parallel.sharding import constrain


class Keys(transformer_pp.Keys):
  """MUDD (decoder_block: mudd, docs/mudd.md)"""

  mudd_streams: Str = key("q,k,v,r", "comma-separated groups of block inputs (q, k, v, r), one dense aggregate each; "
                          "inputs in no group read the previous layer's output; \"\" = no dense connections")
  mudd_dynamic: Bool = key(True, "per-position weights GELU(RMSNorm(X) W1) W2 + static bias; false: the bias alone")
  mudd_prepostnorm: Bool = key(False, "RMSNorm each aggregated state, add the aggregate to the layer output, "
                               "post-norm (scale 1e-3) the residual stream's")
  mudd_last_layer_hidden_expand: Int = key(4, "the last layer's generator (residual stream only) is this much wider",
                                           gt=0)
  mlp_dim_scale_with_depth: Bool = key(False, "MLP width 0.5x to 1.5x base_mlp_dim over depth, rounded to 128")
  mlp_dim_scale_exact_total: Bool = key(True, "mlp_dim_scale_with_depth: the widths must sum to N x base_mlp_dim; "
                                        "false takes them as rounded (the MUDDFormer release)")
  mudd_generator_activation: Str = key("gelu", "activation of the weight generator: gelu (tanh form, the JAX "
                                       "reference) | gelu_exact (erf, the PyTorch release) | any MLP activation")
  mudd_generator_round64: Bool = key(True, "generator width (C*J*expand // 64 + 1) * 64; false keeps C*J*expand")
  mudd_layer0_shared_norm: Bool = key(False, "layer 0 (whose q, k, v inputs are all the embedding) has one "
                                      "pre-attention norm, not three (the release)")


class Layer(nnx.Module):
  """A multiway block (its own MLP width) and the dense connection after it (None when nothing is mixed)."""

  def __init__(self, config, index: int, mlp_dim: int, *, rngs: nnx.Rngs):
    dtype, weight_dtype = layers.dtypes(config)
    D = config.base_emb_dim
    norm = dict(eps=config.normalization_layer_epsilon, dtype=dtype, weight_dtype=weight_dtype, rngs=rngs,
                use_scale=config.use_norm_gains)
    self.shared_input = mudd_dense.shared_attention_input(config, index)
    if self.shared_input:
      self.pre_attention_norm = layers.RMSNorm(D, **norm)
    else:
      self.pre_query_norm, self.pre_key_norm, self.pre_value_norm = (layers.RMSNorm(D, **norm) for _ in range(3))
    self.attention = transformer_pp.Attention(config, rngs=rngs)
    self.pre_mlp_norm = layers.RMSNorm(D, **norm)
    self.mlp = layers.MLP(D, mlp_dim, config.mlp_activations, init=layers.normal(config.init_weights_std),
                          dtype=dtype, weight_dtype=weight_dtype, rngs=rngs)
    has_dense = bool(mudd_dense.layer_groups(config, index))
    self.dense = mudd_dense.DenseConnection(config, index, rngs=rngs) if has_dense else None

  def __call__(self, streams, positions_BL, segment_ids_BL, cache=None, key_segment_BS=None, stats=None):
    if self.shared_input:
      xq_BLD = xk_BLD = xv_BLD = self.pre_attention_norm(streams["q"])
    else:
      xq_BLD = self.pre_query_norm(streams["q"])
      xk_BLD = self.pre_key_norm(streams["k"])
      xv_BLD = self.pre_value_norm(streams["v"])
    h_BLD, cache = self.attention(xq_BLD, positions_BL, segment_ids_BL, cache, key_segment_BS, stats,
                                  xk_BLD=xk_BLD, xv_BLD=xv_BLD)
    x_BLD = constrain(streams["r"] + h_BLD, BLD)
    x_BLD = constrain(x_BLD + self.mlp(self.pre_mlp_norm(x_BLD), stats), BLD)
    if stats is not None:
      stats["residual"] = layers.mean_abs(x_BLD)
    return x_BLD, cache


@register("mudd")
class MUDDFormer(decoder.Decoder):
  """Embedding -> N multiway layers, each followed by a dense connection -> RMSNorm -> vocabulary logits.

  aux["dense_weights"] holds each layer's connection weights A_i: [B, L, C_i, i + 2] (dynamic) or
  [C_i, i + 2] (static), for inspection; training never reads them.
  """

  keys = Keys
  hf = hf_mudd  # the released PyTorch MUDDFormer's checkpoints

  def make_inputs(self, rngs: nnx.Rngs) -> None:
    # The normalised copy of the embedding (X_0) that the pre/post-norm variant aggregates.
    c = self.config
    self.embed_source_norm = None
    if c.mudd_prepostnorm and mudd_dense.parse_streams(c.mudd_streams):
      self.embed_source_norm = nnx.data(self.make_norm(rngs))

  def make_layers(self, rngs: nnx.Rngs) -> None:
    # Traced (eval_shape, the sharded init), each layer is built in a nested jit, a short trace of its own:
    # in one long trace every RNG draw makes flax look up a tracer's sharding, whose error message walks
    # the whole trace so far: the 405M model took 3.4 s instead of 1.2 s. Eager builds need no such help
    # and would pay a compile per layer.
    traced = isinstance(rngs.params.key[...], jax.core.Tracer)
    for i, mlp_dim in enumerate(mudd_dense.mlp_widths(self.config)):  # string keys, so Orbax sees a plain dict
      make = lambda r, i=i, f=mlp_dim: Layer(self.config, i, f, rngs=r)
      setattr(self, f"layer_{i}", nnx.jit(make)(rngs) if traced else make(rngs))

  def run_layers(self, x_BLD, positions_BL, segment_ids_BL, layer_cache, key_segment_BS, record: bool):
    c = self.config
    sources = [self.embed_source_norm(x_BLD) if self.embed_source_norm is not None else x_BLD]
    w = None
    previous = None  # the dense connection whose weights `w` are
    new_k, new_v, dense_weights, layer_stats = [], [], [], []

    for i in range(c.base_num_decoder_layers):
      layer = getattr(self, f"layer_{i}")
      graphdef, state = nnx.split((previous, layer))

      # One remat unit per layer: the previous layer's mix, this block, this layer's weights. Its inputs
      # are the states kept for later layers anyway, so full remat saves no per-layer stream tensors.
      def unit(state, sources, x_BLD, w, one_cache):
        previous, layer = nnx.merge(graphdef, state)
        streams = dict.fromkeys(mudd_dense.STREAMS, x_BLD)
        if previous is not None:
          streams.update(previous.mix(w, sources, x_BLD))
        stats = {} if record else None
        x_BLD, one_cache = layer(streams, positions_BL, segment_ids_BL, one_cache, key_segment_BS, stats)
        if layer.dense is None:
          return x_BLD, None, None, one_cache, stats
        return x_BLD, layer.dense.source(x_BLD), layer.dense.weights(x_BLD), one_cache, stats

      unit = layers.remat(unit, c.remat_policy, prevent_cse=True)
      one_cache = None if layer_cache is None else {"k": layer_cache["k"][i], "v": layer_cache["v"][i]}
      x_BLD, source, w, one_cache, stats = unit(state, sources, x_BLD, w, one_cache)
      if layer.dense is not None:
        sources.append(source)
        dense_weights.append(w)
      previous = layer.dense
      if layer_cache is not None:
        new_k.append(one_cache["k"])
        new_v.append(one_cache["v"])
      layer_stats.append(stats)

    if previous is not None:  # after the last layer only the residual stream is mixed
      x_BLD = previous.mix(w, sources, x_BLD)["r"]
    new_cache = None if layer_cache is None else {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}
    stacked_stats = jax.tree.map(lambda *a: jnp.stack(a), *layer_stats) if record else None
    return x_BLD, new_cache, stacked_stats, {"dense_weights": tuple(dense_weights)}

  @classmethod
  def validate(cls, config) -> None:
    if config.scan_layers:
      raise ConfigError("config key 'scan_layers' must be false for decoder_block 'mudd': layer i mixes i + 2 "
                        "states, so the layers are unrolled (docs/mudd.md)")
    transformer_pp.Attention.validate(config)
    mudd_dense.parse_streams(config.mudd_streams)
    if config.mudd_generator_activation not in layers.ACTIVATIONS:
      raise ConfigError(f"config key 'mudd_generator_activation' must be one of {', '.join(layers.ACTIVATIONS.names())}, "
                        f"got {config.mudd_generator_activation!r}")
    mudd_dense.mlp_widths(config)

  @staticmethod
  def flops_per_token(config) -> float:
    """6 x matmul parameters (blocks and weight generators) + 6 x the mixing multiply-adds + attention + unembedding."""
    D, N = config.base_emb_dim, config.base_num_decoder_layers
    attention_macs = decoder.attention_macs(D, config.base_num_query_heads, config.base_num_kv_heads,
                                            config.head_dim)
    matmul = sum(attention_macs + decoder.mlp_macs(D, F, len(config.mlp_activations))
                 for F in mudd_dense.mlp_widths(config))
    if config.mudd_dynamic:
      for i in range(N):
        C, M = len(mudd_dense.layer_groups(config, i)), mudd_dense.generator_width(config, i)
        matmul += (D * M + M * C * (i + 2)) if C else 0
    return decoder.training_flops(config, matmul) + 6 * mudd_dense.mixing_macs_per_token(config)
