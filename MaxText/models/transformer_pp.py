"""Transformer++ (Llama-style): pre-norm RMSNorm, RoPE, SwiGLU, no biases, MHA or GQA.

As the MUDDFormer code base's Llama2 baseline: init N(0, init_weights_std^2) everywhere, activations in
`dtype`, parameters in `weight_dtype`, logits and softmax in float32. Under `parametrization: mup` the
init is redrawn from the parameters' roles (MaxText/parametrization.py); the model itself only asks for
the attention scale and the output multiplier, and tags the query projection.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText import parametrization
from MaxText.models import ModelFamily, register
from MaxText.models import layers
from MaxText.models.layers import BLD, BLHE, BLKE, BLV
from MaxText.sharding import constrain


class Attention(nnx.Module):
  """Multi-head (or grouped-query) attention with RoPE on queries and keys.

  Keys and values come from `x_BLD` too unless `xk_BLD` / `xv_BLD` are given (MUDD's multiway block).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    D, H, K, E = config.base_emb_dim, config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
    self.dtype, weight_dtype = layers.dtypes(config)
    init = layers.normal(config.init_weights_std)
    self.rope_max_timescale = config.rope_max_timescale
    self.implementation = config.attention
    self.scale = parametrization.attention_scale(config, E)
    hidden = dict(role="hidden", dtype=weight_dtype)
    self.wq = layers.param(rngs, init, (D, H, E), ("embed", "heads", "head_dim"), fan_in=D, tag="query", **hidden)
    self.wk = layers.param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"), fan_in=D, **hidden)
    self.wv = layers.param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"), fan_in=D, **hidden)
    self.wo = layers.param(rngs, init, (H, E, D), ("heads", "head_dim", "embed"), fan_in=H * E, **hidden)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache=None, key_segment_BS=None, stats=None,
               xk_BLD=None, xv_BLD=None):
    dt = self.dtype
    xk_BLD = x_BLD if xk_BLD is None else xk_BLD
    xv_BLD = x_BLD if xv_BLD is None else xv_BLD
    q_BLHE = checkpoint_name(jnp.einsum("bld,dhe->blhe", x_BLD, self.wq[...].astype(dt)), "query_proj")
    k_BLKE = checkpoint_name(jnp.einsum("bld,dke->blke", xk_BLD, self.wk[...].astype(dt)), "key_proj")
    v_BLKE = checkpoint_name(jnp.einsum("bld,dke->blke", xv_BLD, self.wv[...].astype(dt)), "value_proj")
    q_BLHE = constrain(layers.rope(q_BLHE, positions_BL, self.rope_max_timescale), BLHE)
    k_BLKE = constrain(layers.rope(k_BLKE, positions_BL, self.rope_max_timescale), BLKE)
    v_BLKE = constrain(v_BLKE, BLKE)
    if cache is None:
      k_BSKE, v_BSKE = k_BLKE, v_BLKE
      mask_BLS = layers.attention_mask(segment_ids_BL, positions_BL, segment_ids_BL, positions_BL)
    else:
      cache = {"k": layers.cache_write(cache["k"], k_BLKE, positions_BL),
               "v": layers.cache_write(cache["v"], v_BLKE, positions_BL)}
      k_BSKE, v_BSKE = cache["k"], cache["v"]
      key_positions_BS = layers.slot_positions(key_segment_BS)
      mask_BLS = layers.attention_mask(segment_ids_BL, positions_BL, key_segment_BS, key_positions_BS)
    out_BLHE = layers.dot_product_attention(
        q_BLHE, k_BSKE, v_BSKE, mask_BLS, scale=self.scale, implementation=self.implementation)
    out_BLD = jnp.einsum("blhe,hed->bld", out_BLHE.astype(dt), self.wo[...].astype(dt))
    layers.record_attention_stats(stats, q_BLHE, k_BLKE, k_BSKE, out_BLD, mask_BLS, self.scale)
    return checkpoint_name(out_BLD, "out_proj"), cache


class DecoderLayer(nnx.Module):
  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype, weight_dtype = layers.dtypes(config)
    D = config.base_emb_dim
    norm = dict(eps=config.normalization_layer_epsilon, dtype=dtype, weight_dtype=weight_dtype, rngs=rngs,
                use_scale=config.use_norm_gains)
    self.pre_attention_norm = layers.RMSNorm(D, **norm)
    self.attention = Attention(config, rngs=rngs)
    self.pre_mlp_norm = layers.RMSNorm(D, **norm)
    self.mlp = layers.MLP(D, config.base_mlp_dim, config.mlp_activations, init=layers.normal(config.init_weights_std),
                          dtype=dtype, weight_dtype=weight_dtype, rngs=rngs)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache=None, key_segment_BS=None, stats=None):
    h_BLD, cache = self.attention(self.pre_attention_norm(x_BLD), positions_BL, segment_ids_BL, cache, key_segment_BS,
                                  stats)
    x_BLD = constrain(x_BLD + h_BLD, BLD)
    x_BLD = constrain(x_BLD + self.mlp(self.pre_mlp_norm(x_BLD), stats), BLD)
    if stats is not None:
      stats["residual"] = layers.mean_abs(x_BLD)
    return x_BLD, cache


@register("llama2")
class TransformerPP(ModelFamily):
  """Embedding -> N pre-norm decoder layers (scanned or unrolled) -> RMSNorm -> vocabulary logits."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    dtype, weight_dtype = layers.dtypes(config)
    D, V = config.base_emb_dim, config.vocab_size
    init = layers.normal(config.init_weights_std)
    self.embed = layers.Embed(V, D, init=init, dtype=dtype, weight_dtype=weight_dtype, rngs=rngs)
    self.layers = layers.make_stack(config.base_num_decoder_layers, lambda r: DecoderLayer(config, rngs=r), rngs)
    self.final_norm = layers.RMSNorm(D, eps=config.normalization_layer_epsilon, dtype=dtype,
                                     weight_dtype=weight_dtype, rngs=rngs, use_scale=config.use_norm_gains)
    if not config.logits_via_embedding:
      self.unembed = layers.param(rngs, init, (V, D), ("vocab", "embed"), role="readout", dtype=weight_dtype,
                                  fan_in=D)

  def __call__(self, tokens_BL, positions_BL, segment_ids_BL, cache=None):
    c = self.config
    x_BLD = constrain(self.embed(tokens_BL), BLD)
    embed_size = layers.mean_abs(x_BLD) if c.record_activations else None
    key_segment_BS = None
    layer_cache = None
    if cache is not None:
      key_segment_BS = layers.cache_write(cache["segment_ids"], segment_ids_BL, positions_BL)
      layer_cache = {"k": cache["k"], "v": cache["v"]}

    def call(layer, x_BLD, layer_cache):
      if not c.record_activations:
        return layer(x_BLD, positions_BL, segment_ids_BL, layer_cache, key_segment_BS)
      stats = {}
      x_BLD, layer_cache = layer(x_BLD, positions_BL, segment_ids_BL, layer_cache, key_segment_BS, stats)
      return x_BLD, (layer_cache, stats)

    x_BLD, outs = layers.run_stack(self.layers, call, x_BLD, layer_cache, scan=c.scan_layers,
                                   remat_policy=c.remat_policy)
    layer_cache, layer_stats = outs if c.record_activations else (outs, None)
    logits_BLV = constrain(self.logits(self.final_norm(x_BLD)), BLV)
    aux = {}
    if c.record_activations:  # per-layer sites are [N] arrays (one entry per layer)
      aux["activations"] = {"embed": embed_size, **layer_stats,
                            "logits": layers.mean_abs(logits_BLV)}
    if cache is not None:
      aux["cache"] = {"k": layer_cache["k"], "v": layer_cache["v"], "segment_ids": key_segment_BS}
    return logits_BLV, aux

  def logits(self, x_BLD):
    c = self.config
    return layers.output_logits(x_BLD, self.embed, None if c.logits_via_embedding else self.unembed,
                                parametrization.logits_multiplier(c))

  def init_cache(self, batch: int, max_length: int):
    return layers.kv_cache(self.config, batch, max_length)

  @staticmethod
  def flops_per_token(config) -> float:
    """6 x matmul parameters (no embedding lookup) + causal attention 6*N*L*H*E + unembedding 6*D*V."""
    D, N, F = config.base_emb_dim, config.base_num_decoder_layers, config.base_mlp_dim
    H, K, E = config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
    per_layer = D * H * E * 2 + D * K * E * 2 + D * F * len(config.mlp_activations) + F * D
    attention = 6 * N * config.max_target_length * H * E
    return 6 * N * per_layer + attention + 6 * D * config.vocab_size
