"""GPT (GPT-2 style), with the extras of fattorib/transformer as config flags.

Pre-norm LayerNorm with bias, biases on every projection, a GELU MLP, tied embeddings (the presets),
learned absolute positions unless `alibi`, init N(0, init_weights_std^2) with the two residual output
projections of each layer at init_weights_std / sqrt(2N). The flags (base_v2.yml, section GPT):
  alibi              logits of head h get -m_h (i - j); no position table, so any length evaluates
  parallel_residual  x + mix(ln x) + mlp(ln x) with one shared LayerNorm
  static_sgu         mix = concat(band kernel over the first D/2 channels, attention over the other D/2)
  head_qk            output logits_i[v] += sum over earlier j with x_j = v of q_i.k_j / R
  qk_norm            unit queries and keys per head, times a learned per-head scale
  use_bias           false drops every bias (projections and LayerNorms; nanoGPT's bias=False)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText.config.keys import Bool, Group, Int, key
from MaxText.errors import ConfigError
from MaxText.models import attention, decoder, layers, parametrization, register
from MaxText.models.layers import BLD, BLHE, BLKE
from MaxText.parallel.sharding import constrain


class Keys(Group):
  """GPT (decoder_block: gpt)"""

  alibi: Bool = key(False, "ALiBi: attention logits get -m_h (i - j) per head instead of a learned position table")
  parallel_residual: Bool = key(False, "x + attn(ln x) + mlp(ln x) with one shared LayerNorm (GPT-J style)")
  static_sgu: Bool = key(False, "half the channels mixed over time by a fixed causal band kernel, half through "
                         "attention")
  sgu_band_width: Int = key(128, "static_sgu: the kernel weighs distances 0 <= i - j <= this by 1/(i - j + 2)", ge=0)
  head_qk: Bool = key(False, "head-QK: logits_i[v] += q_i.k_j / head_qk_dim for every earlier token x_j = v")
  head_qk_dim: Int = key(256, "head_qk: width of its query and key projections of the final hidden state", gt=0)
  qk_norm: Bool = key(False, "unit-norm queries and keys per head with a learned per-head logit scale (init 1)")
  use_bias: Bool = key(True, "biases in the q/k/v/out and MLP projections and the LayerNorms (GPT-2); false = "
                       "nanoGPT's bias=False")


def alibi_slopes(num_heads: int) -> np.ndarray:
  """m_h of ALiBi for any head count.

  For n = 2^floor(log2 H) the slopes are 2^(-8h/n), h = 1..n; the remaining H - n heads take every other
  slope of the 2n-head sequence (its odd h), which interleaves them between the first ones.
  """
  n = 2 ** math.floor(math.log2(num_heads))
  slopes = [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
  slopes += [2.0 ** (-4.0 * h / n) for h in range(1, 2 * n, 2)][: num_heads - n]
  return np.asarray(slopes, np.float32)


def alibi_bias(q_position_BL, k_position_BS, num_heads: int) -> jax.Array:
  """[B, H, L, S] float32: -m_h (i - j) from positions, so packed documents and cache slots need no offset."""
  distance_BLS = (q_position_BL[:, :, None] - k_position_BS[:, None, :]).astype(jnp.float32)
  slopes_H = jnp.asarray(alibi_slopes(num_heads))
  return -slopes_H[None, :, None, None] * distance_BLS[:, None]


def sgu_kernel(q_position_BL, q_segment_BL, k_position_BS, k_segment_BS, width: int) -> jax.Array:
  """[B, L, S] float32 static SGU kernel: weight 1/(d + 2) for distance 0 <= d = i - j <= width in the same
  document, each row normalised to sum to 1.

  The weights are the reference's intended band (its cumulative-sum normalisation of a band of ones gives
  exactly 1/(d + 2)). Normalising rows makes the output a decaying average of the last width + 1 tokens,
  so its scale does not grow from the first position (weight sum 1/2) to later ones (about 4.4 at width
  128), and a document starting mid-row is treated as if it started the row.
  """
  distance_BLS = q_position_BL[:, :, None] - k_position_BS[:, None, :]
  inside = (distance_BLS >= 0) & (distance_BLS <= width) & (q_segment_BL[:, :, None] == k_segment_BS[:, None, :])
  weights_BLS = jnp.where(inside, 1.0 / (distance_BLS.astype(jnp.float32) + 2.0), 0.0)
  return weights_BLS / jnp.maximum(jnp.sum(weights_BLS, axis=-1, keepdims=True), 1e-30)


def unit(x: jax.Array, eps: float) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class Attention(nnx.Module):
  """Causal self-attention with biases over `width` input channels, H heads of `head_dim`."""

  def __init__(self, config, width: int, head_dim: int, *, rngs: nnx.Rngs):
    D, H, K, E = width, config.base_num_query_heads, config.base_num_kv_heads, head_dim
    self.dtype, weight_dtype = layers.dtypes(config)
    self.num_heads, self.alibi, self.qk_norm = H, config.alibi, config.qk_norm
    self.eps = config.normalization_layer_epsilon
    self.implementation = config.attention
    # qk_norm fixes |q.k| <= 1, so the learned per-head scale replaces the parametrization's 1/sqrt(E).
    self.scale = 1.0 if config.qk_norm else parametrization.attention_scale(config, E)
    init = layers.normal(config.init_weights_std)
    residual_init = layers.normal(config.init_weights_std / math.sqrt(2 * config.base_num_decoder_layers))
    zeros = layers.constant(0.0)
    hidden = dict(role="hidden", dtype=weight_dtype)
    bias = dict(role="bias", dtype=weight_dtype)
    on = config.use_bias  # each param draws a key: this order keeps the weights' draws of earlier releases
    self.wq = layers.param(rngs, init, (D, H, E), ("embed", "heads", "head_dim"), fan_in=D, tag="query", **hidden)
    self.bq = layers.param(rngs, zeros, (H, E), ("heads", "head_dim"), **bias) if on else None
    self.wk = layers.param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"), fan_in=D, **hidden)
    self.bk = layers.param(rngs, zeros, (K, E), ("kv_heads", "head_dim"), **bias) if on else None
    self.wv = layers.param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"), fan_in=D, **hidden)
    self.bv = layers.param(rngs, zeros, (K, E), ("kv_heads", "head_dim"), **bias) if on else None
    self.wo = layers.param(rngs, residual_init, (H, E, D), ("heads", "head_dim", "embed"), fan_in=H * E, **hidden)
    self.bo = layers.param(rngs, zeros, (D,), ("embed",), **bias) if on else None
    if config.qk_norm:
      self.qk_scale = layers.param(rngs, layers.constant(1.0), (H,), ("heads",), role="gain", dtype=weight_dtype)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache=None, key_segment_BS=None, stats=None):
    dt = self.dtype
    q_BLHE = self.add_bias(jnp.einsum("bld,dhe->blhe", x_BLD, self.wq[...].astype(dt)), self.bq)
    k_BLKE = self.add_bias(jnp.einsum("bld,dke->blke", x_BLD, self.wk[...].astype(dt)), self.bk)
    v_BLKE = self.add_bias(jnp.einsum("bld,dke->blke", x_BLD, self.wv[...].astype(dt)), self.bv)
    q_BLHE, k_BLKE = checkpoint_name(q_BLHE, "query_proj"), checkpoint_name(k_BLKE, "key_proj")
    v_BLKE = checkpoint_name(v_BLKE, "value_proj")
    if self.qk_norm:
      q_BLHE = (unit(q_BLHE, self.eps) * self.qk_scale[...].astype(jnp.float32)[:, None]).astype(dt)
      k_BLKE = unit(k_BLKE, self.eps).astype(dt)
    q_BLHE, k_BLKE, v_BLKE = constrain(q_BLHE, BLHE), constrain(k_BLKE, BLKE), constrain(v_BLKE, BLKE)

    def output(out_BLHE):
      return self.add_bias(jnp.einsum("blhe,hed->bld", out_BLHE.astype(dt), self.wo[...].astype(dt)), self.bo)

    def bias(mask):
      return alibi_bias(mask.q_position_BL, mask.k_position_BS, self.num_heads)

    out_BLD, cache = attention.self_attention(
        q_BLHE, k_BLKE, v_BLKE, positions_BL, segment_ids_BL, cache, key_segment_BS, scale=self.scale,
        implementation=self.implementation, stats=stats, output=output, bias=bias if self.alibi else None)
    return checkpoint_name(out_BLD, "out_proj"), cache

  def add_bias(self, y, b):
    return y if b is None else y + b[...].astype(self.dtype)


class Block(nnx.Module):
  """One GPT layer: sequential (two LayerNorms) or parallel (one shared LayerNorm) residual branches."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype, weight_dtype = layers.dtypes(config)
    D = config.base_emb_dim
    self.parallel = config.parallel_residual
    self.sgu_width = config.sgu_band_width if config.static_sgu else None
    norm = dict(eps=config.normalization_layer_epsilon, dtype=dtype, weight_dtype=weight_dtype, rngs=rngs,
                use_scale=config.use_norm_gains, use_bias=config.use_bias)
    if self.parallel:
      self.norm = layers.LayerNorm(D, **norm)
    else:
      self.pre_attention_norm = layers.LayerNorm(D, **norm)
      self.pre_mlp_norm = layers.LayerNorm(D, **norm)
    if config.static_sgu:  # the same head count on half the channels
      self.attention = Attention(config, D // 2, config.head_dim // 2, rngs=rngs)
    else:
      self.attention = Attention(config, D, config.head_dim, rngs=rngs)
    residual_init = layers.normal(config.init_weights_std / math.sqrt(2 * config.base_num_decoder_layers))
    self.mlp = layers.MLP(D, config.base_mlp_dim, config.mlp_activations, init=layers.normal(config.init_weights_std),
                          out_init=residual_init, dtype=dtype, weight_dtype=weight_dtype, rngs=rngs,
                          use_bias=config.use_bias)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache=None, key_segment_BS=None, stats=None):
    h_BLD = self.norm(x_BLD) if self.parallel else self.pre_attention_norm(x_BLD)
    mixed_BLD, cache = self.mix(h_BLD, positions_BL, segment_ids_BL, cache, key_segment_BS, stats)
    if self.parallel:
      x_BLD = constrain(x_BLD + mixed_BLD + self.mlp(h_BLD, stats), BLD)
    else:
      x_BLD = constrain(x_BLD + mixed_BLD, BLD)
      x_BLD = constrain(x_BLD + self.mlp(self.pre_mlp_norm(x_BLD), stats), BLD)
    if stats is not None:
      stats["residual"] = layers.mean_abs(x_BLD)
    return x_BLD, cache

  def mix(self, h_BLD, positions_BL, segment_ids_BL, cache, key_segment_BS, stats=None):
    """Mixing over time: attention on every channel, or the static SGU on the first half and attention on
    the second. The SGU's input is not stop-gradiented: its kernel is fixed, but the layers below still
    learn what to feed it (the reference's stop_gradient only mattered for its all-zero kernel)."""
    if self.sgu_width is None:
      return self.attention(h_BLD, positions_BL, segment_ids_BL, cache, key_segment_BS, stats)
    h_BLU, a_BLU = jnp.split(h_BLD, 2, axis=-1)
    attention_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    a_BLU, attention_cache = self.attention(a_BLU, positions_BL, segment_ids_BL, attention_cache, key_segment_BS,
                                            stats)
    if cache is None:
      source_BSU, key_positions_BS, key_segment_BS = h_BLU, positions_BL, segment_ids_BL
    else:
      source_BSU = attention.cache_write(cache["sgu"], h_BLU, positions_BL)
      key_positions_BS = attention.slot_positions(key_segment_BS)
      cache = {**attention_cache, "sgu": source_BSU}
    kernel_BLS = sgu_kernel(positions_BL, segment_ids_BL, key_positions_BS, key_segment_BS, self.sgu_width)
    s_BLU = jnp.einsum("bls,bsu->blu", kernel_BLS, source_BSU.astype(jnp.float32)).astype(h_BLD.dtype)
    return jnp.concatenate([s_BLU, a_BLU], axis=-1), cache


@register("gpt")
class GPT(decoder.Decoder):
  """Embedding (+ positions) -> N GPT blocks (scanned or unrolled) -> LayerNorm -> logits (+ head-QK)."""

  keys = Keys
  Block = Block
  Norm = layers.LayerNorm

  def make_inputs(self, rngs: nnx.Rngs) -> None:
    c = self.config
    if not c.alibi:
      self.position_embedding = layers.param(rngs, layers.normal(c.init_weights_std), (c.max_target_length,
                                             c.base_emb_dim), (None, "embed"), role="embedding",
                                             dtype=layers.dtypes(c)[1])

  def make_norm(self, rngs: nnx.Rngs, **options) -> nnx.Module:
    return super().make_norm(rngs, use_bias=self.config.use_bias, **options)

  def make_head(self, rngs: nnx.Rngs) -> None:
    c = self.config
    if c.head_qk:
      # Both inits are part of the trick (a zero query makes it start switched off), so no
      # parametrization redraws them.
      D, R = c.base_emb_dim, c.head_qk_dim
      head = dict(role="hidden", dtype=layers.dtypes(c)[1], fan_in=D, tag="keep_init")
      self.head_q = layers.param(rngs, layers.constant(0.0), (D, R), ("embed", None), **head)
      self.head_k = layers.param(rngs, jax.nn.initializers.orthogonal(scale=0.1), (D, R), ("embed", None), **head)

  def embed_tokens(self, tokens_BL, positions_BL):
    x_BLD = self.embed(tokens_BL)
    if not self.config.alibi:
      x_BLD = x_BLD + jnp.take(self.position_embedding[...], positions_BL, axis=0).astype(x_BLD.dtype)
    return x_BLD

  def head(self, h_BLD, logits_BLV, tokens_BL, positions_BL, segment_ids_BL, cache, key_segment_BS):
    if not self.config.head_qk:
      return logits_BLV, {}
    copy_BLV, head_cache = self.head_qk_logits(h_BLD, tokens_BL, positions_BL, segment_ids_BL, cache, key_segment_BS)
    return logits_BLV + copy_BLV, head_cache

  @classmethod
  def cannot_chunk_logits(cls, config) -> str | None:
    if config.head_qk:
      return "head_qk adds logits that depend on the earlier tokens of the whole sequence"
    return None

  def head_qk_logits(self, h_BLD, tokens_BL, positions_BL, segment_ids_BL, cache, key_segment_BS):
    """logits_i[v] += sum over visible j (causal, diagonal included, same document) with x_j = v of
    q_i.k_j / R: no softmax, so it can raise or lower a token seen earlier in proportion to the match."""
    dt = h_BLD.dtype
    R, V = self.config.head_qk_dim, self.config.vocab_size
    q_BLR = jnp.einsum("bld,dr->blr", h_BLD, self.head_q[...].astype(dt))
    k_BLR = jnp.einsum("bld,dr->blr", h_BLD, self.head_k[...].astype(dt))
    if cache is None:
      k_BSR, tokens_BS, key_positions_BS, key_segment_BS = k_BLR, tokens_BL, positions_BL, segment_ids_BL
      head_cache = {}
    else:
      k_BSR = attention.cache_write(cache["head_k"], k_BLR, positions_BL)
      tokens_BS = attention.cache_write(cache["tokens"], tokens_BL, positions_BL)
      key_positions_BS = attention.slot_positions(key_segment_BS)
      head_cache = {"head_k": k_BSR, "tokens": tokens_BS}
    mask_BLS = attention.attention_mask(segment_ids_BL, positions_BL, key_segment_BS, key_positions_BS)
    c_BLS = layers.einsum_f32("blr,bsr->bls", q_BLR, k_BSR) / R
    c_BLS = jnp.where(mask_BLS, c_BLS, 0.0)
    # A scatter-add into the vocabulary instead of c @ one_hot(x): the one-hot would be as large as the logits.
    L = c_BLS.shape[1]
    copy_BLV = jax.vmap(lambda c_LS, t_S: jnp.zeros((L, V), jnp.float32).at[:, t_S].add(c_LS))(c_BLS, tokens_BS)
    return copy_BLV, head_cache

  def init_layer_cache(self, batch: int, max_length: int):
    c = self.config
    if not c.alibi and max_length > c.max_target_length:
      raise ConfigError(
          f"a decode cache of {max_length} positions exceeds max_target_length={c.max_target_length}, the size of "
          f"GPT's learned position table; shorten max_prefill_predict_length + max_decode_length or use alibi=true")
    layer_cache = attention.kv_cache(c, batch, max_length, head_dim=c.head_dim // 2 if c.static_sgu else c.head_dim)
    if c.static_sgu:
      layer_cache["sgu"] = jnp.zeros((c.base_num_decoder_layers, batch, max_length, c.base_emb_dim // 2), c.dtype)
    return layer_cache

  def init_head_cache(self, batch: int, max_length: int):
    c = self.config
    if not c.head_qk:
      return {}
    return {"head_k": jnp.zeros((batch, max_length, c.head_qk_dim), c.dtype),
            "tokens": jnp.zeros((batch, max_length), jnp.int32)}

  @classmethod
  def validate(cls, config) -> None:
    if config.static_sgu:
      if config.base_emb_dim % 2:
        raise ConfigError(f"config key 'static_sgu' splits the channels in half: base_emb_dim={config.base_emb_dim} "
                          f"must be even")
      if config.head_dim % 2:
        raise ConfigError(f"config key 'static_sgu' halves each attention head: head_dim={config.head_dim} "
                          f"must be even")
    if config.alibi and not attention.accepts_bias(config.attention):
      raise ConfigError(f"alibi adds a bias to the attention scores, which attention={config.attention!r} cannot "
                        f"take; use attention=dot_product, autoselected or cudnn_flash")

  @staticmethod
  def flops_per_token(config) -> float:
    """6 x matmul parameters (no embedding or position lookup) + causal attention 6*N*L*H*E + the SGU's
    fixed band (forward and input gradient, 2*min(w+1, L)*D per layer) + head-QK scores 3*L*R + 6*D*V."""
    D, N, F, L = config.base_emb_dim, config.base_num_decoder_layers, config.base_mlp_dim, config.max_target_length
    H, K, E = config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
    A = D
    if config.static_sgu:
      A, E = D // 2, E // 2
    per_layer = decoder.attention_macs(A, H, K, E) + decoder.mlp_macs(D, F, len(config.mlp_activations))
    flops = decoder.training_flops(config, N * per_layer, head_dim=E)
    if config.static_sgu:
      flops += N * 2 * min(config.sgu_band_width + 1, L) * D
    if config.head_qk:
      flops += 6 * 2 * D * config.head_qk_dim + 3 * L * config.head_qk_dim
    return flops
