"""Transformer++ (Llama-style): pre-norm RMSNorm, RoPE, SwiGLU, no biases, MHA or GQA.

As the MUDDFormer code base's Llama2 baseline: init N(0, init_weights_std^2) everywhere, activations in
`dtype`, parameters in `weight_dtype`, logits and softmax in float32. Under `parametrization: mup` the
init is redrawn from the parameters' roles (MaxText/models/parametrization.py); the model itself only asks for
the attention scale and the output multiplier, and tags the query projection.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText.config.keys import Bool, Float, Group, Int, Str, key
from MaxText.errors import ConfigError
from MaxText.models import attention, decoder, hf_llama, layers, parametrization, register
from MaxText.models.layers import BLD, BLHE, BLKE
from MaxText.parallel.sharding import constrain


class Keys(Group):
  """Transformer++ (decoder_block: llama2; MUDD reads them too)"""

  rope_type: Str = key("default", "RoPE frequencies: default base^(-2k/E) | llama3 (Llama 3.1 scaling, the rope_* "
                       "keys below)", registry=True)
  rope_scaling_factor: Float = key(8.0, "llama3: long wavelengths are divided by this", gt=0)
  rope_low_freq_factor: Float = key(1.0, "llama3: wavelengths above rope_original_max_position / this are scaled "
                                    "fully", gt=0)
  rope_high_freq_factor: Float = key(4.0, "llama3: wavelengths below rope_original_max_position / this are kept; "
                                     "between, interpolated", gt=0)
  rope_original_max_position: Int = key(8192, "llama3: the context length the model was first trained at", gt=0)
  rope_table_dtype: Literal["float32", "bfloat16"] = key(
      "float32", "bfloat16 rounds the cos/sin tables to bfloat16 before the float32 rotation (the MUDDFormer "
      "release)")
  qk_rmsnorm: Bool = key(False, "RMSNorm over head_dim, one [head_dim] gain shared by all heads, on queries and keys "
                         "before RoPE")


class Attention(nnx.Module):
  """Multi-head (or grouped-query) attention with RoPE on queries and keys.

  Keys and values come from `x_BLD` too unless `xk_BLD` / `xv_BLD` are given (MUDD's multiway block).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    D, H, K, E = config.base_emb_dim, config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
    self.dtype, weight_dtype = layers.dtypes(config)
    init = layers.normal(config.init_weights_std)
    self.rope_max_timescale = config.rope_max_timescale
    inv_freq = layers.rope_frequencies(config, E)  # None: the default base^(-2k/E)
    self.inv_freq = None if inv_freq is None else tuple(float(f) for f in inv_freq)  # static, not a parameter
    self.rope_table_dtype = None if config.rope_table_dtype == "float32" else jnp.dtype(config.rope_table_dtype)
    self.implementation = config.attention
    self.scale = parametrization.attention_scale(config, E)
    hidden = dict(role="hidden", dtype=weight_dtype)
    self.wq = layers.param(rngs, init, (D, H, E), ("embed", "heads", "head_dim"), fan_in=D, tag="query", **hidden)
    self.wk = layers.param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"), fan_in=D, **hidden)
    self.wv = layers.param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"), fan_in=D, **hidden)
    self.wo = layers.param(rngs, init, (H, E, D), ("heads", "head_dim", "embed"), fan_in=H * E, **hidden)
    # qk_rmsnorm: one [E] gain shared by every head, on queries and on keys, before RoPE (the MUDDFormer release).
    if config.qk_rmsnorm:
      norm = dict(eps=config.normalization_layer_epsilon, dtype=self.dtype, weight_dtype=weight_dtype, rngs=rngs)
      self.q_norm, self.k_norm = layers.RMSNorm(E, **norm), layers.RMSNorm(E, **norm)
    else:
      self.q_norm = self.k_norm = None

  @staticmethod
  def validate(config) -> None:
    """The RoPE keys' values (the families that use this attention call it)."""
    if config.rope_type == "llama3":
      if config.rope_scaling_factor <= 0 or config.rope_original_max_position <= 0:
        raise ConfigError("config keys 'rope_scaling_factor' and 'rope_original_max_position' must be positive "
                          "for rope_type llama3")
      if not 0 < config.rope_low_freq_factor < config.rope_high_freq_factor:
        raise ConfigError(f"config keys 'rope_low_freq_factor'={config.rope_low_freq_factor} and "
                          f"'rope_high_freq_factor'={config.rope_high_freq_factor} must satisfy 0 < low < high")

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache=None, key_segment_BS=None, stats=None,
               xk_BLD=None, xv_BLD=None):
    dt = self.dtype
    xk_BLD = x_BLD if xk_BLD is None else xk_BLD
    xv_BLD = x_BLD if xv_BLD is None else xv_BLD
    q_BLHE = checkpoint_name(jnp.einsum("bld,dhe->blhe", x_BLD, self.wq[...].astype(dt)), "query_proj")
    k_BLKE = checkpoint_name(jnp.einsum("bld,dke->blke", xk_BLD, self.wk[...].astype(dt)), "key_proj")
    v_BLKE = checkpoint_name(jnp.einsum("bld,dke->blke", xv_BLD, self.wv[...].astype(dt)), "value_proj")
    if self.q_norm is not None:
      q_BLHE, k_BLKE = self.q_norm(q_BLHE), self.k_norm(k_BLKE)
    rope = dict(max_timescale=self.rope_max_timescale, inv_freq=self.inv_freq, table_dtype=self.rope_table_dtype)
    q_BLHE = constrain(layers.rope(q_BLHE, positions_BL, **rope), BLHE)
    k_BLKE = constrain(layers.rope(k_BLKE, positions_BL, **rope), BLKE)
    v_BLKE = constrain(v_BLKE, BLKE)
    out_BLD, cache = attention.self_attention(
        q_BLHE, k_BLKE, v_BLKE, positions_BL, segment_ids_BL, cache, key_segment_BS, scale=self.scale,
        implementation=self.implementation, stats=stats,
        output=lambda out_BLHE: jnp.einsum("blhe,hed->bld", out_BLHE.astype(dt), self.wo[...].astype(dt)))
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
class TransformerPP(decoder.Decoder):
  """Embedding -> N pre-norm decoder layers (scanned or unrolled) -> RMSNorm -> vocabulary logits."""

  Block = DecoderLayer
  keys = Keys
  hf = hf_llama  # Hugging Face LlamaForCausalLM checkpoints

  @classmethod
  def validate(cls, config) -> None:
    Attention.validate(config)

  @staticmethod
  def flops_per_token(config) -> float:
    """6 x matmul parameters (no embedding lookup) + causal attention 6*N*L*H*E + unembedding 6*D*V."""
    D, F = config.base_emb_dim, config.base_mlp_dim
    per_layer = (decoder.attention_macs(D, config.base_num_query_heads, config.base_num_kv_heads, config.head_dim)
                 + decoder.mlp_macs(D, F, len(config.mlp_activations)))
    return decoder.training_flops(config, config.base_num_decoder_layers * per_layer)
