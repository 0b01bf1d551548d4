"""Transformer-VQ (Lingle 2023, arXiv:2309.16354), the reference's tensor-parallel branch.

Each of the N layers is two single-head gated attention units and no MLP:
  x~ = rms(x);  q = rms(x~ Wq) d_k^-1/4;  k = rms(x~ Wk) d_k^-1/4;  v = silu(x~ Wv);  g = silu(x~ Wg)
  x += (VQAttention(q, k, v) * g) Wo
with norms without gains, keys quantised by a per-layer EMA k-means codebook (vq_attention.py) and a
Transformer-XL relative-position bias with learned u and v. Init as the reference: matrices N(0, 1/fan_in),
embeddings N(0, 1), u = v = 0, codebook sums N(0, 1/Z) and counts 1 (Z codes).

Training objective (train_step.py): cross-entropy + aux["aux_loss"] (vq_commit_weight x the commitment
losses, summed over units) + aux["codebook_loss"] (the EMA surrogate for the `codebook` parameters,
which optimizers.py updates by SGD with learning rate 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText.config.keys import Bool, Float, Group, Int, key
from MaxText.errors import ConfigError
from MaxText.models import ModelFamily, decoder, layers, parametrization, register
from MaxText.models import vq_attention as vqa
from MaxText.models.layers import BLD, BLV
from MaxText.parallel.sharding import constrain


class Keys(Group):
  """Transformer-VQ (decoder_block: transformer_vq, docs/transformer_vq.md)"""

  vq_num_codes: Int = key(512, "codebook entries per attention unit (each of the 2 x base_num_decoder_layers units "
                          "has its own)", gt=0)
  vq_block_length: Int = key(512, "tokens per attention block: a block sees itself and the blocks covering vq_window "
                             "before it key by key, older keys through the codebook cache", gt=0)
  vq_window: Int = key(0, "relative-position bias reaches this many keys back (the decode cache keeps them "
                       "explicit); 0 = vq_block_length", ge=0)
  vq_value_dim: Int = key(0, "value and gate width d_v (d_k is head_dim); 0 = 2 x base_emb_dim", ge=0)
  vq_commit_weight: Float = key(1.0e-4, "beta: weight of the commitment loss |k - sg(codeword)|^2, summed over the "
                                "units", ge=0)
  vq_ema_decay: Float = key(0.99, "gamma: per optimizer step, codebook = gamma x codebook + (1 - gamma) x the step's "
                            "batch statistics", ge=0, lt=1)
  vq_pe_wavelength: Float = key(100000.0, "longest wavelength of the sinusoids behind the relative-position bias",
                                gt=0)
  vq_final_norm: Bool = key(False, "RMS-normalise (no gain) the last activations before the output projection")
  vq_logits_scale: Float = key(1.0, "multiply the last activations by this before the output projection (PG-19: "
                               "0.005)", gt=0)

def dims(config) -> tuple[int, int, int, int, int]:
  """(D, E = d_k, F = d_v, Z codes, W bias window)."""
  D = config.base_emb_dim
  window = config.vq_window or config.vq_block_length
  return D, config.head_dim, config.vq_value_dim or 2 * D, config.vq_num_codes, window


class GatedAttentionUnit(nnx.Module):
  """One single-head gated attention unit (SHGA) with its own codebook."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    D, E, F, Z, self.window = dims(config)
    self.dtype = jnp.dtype(config.dtype)
    weight_dtype = jnp.dtype(config.weight_dtype)
    # Norms without gains, on the input and on the query and key projections.
    self.rms = layers.RMSNorm(D, eps=config.normalization_layer_epsilon, dtype=self.dtype, weight_dtype=weight_dtype,
                              use_scale=False)
    self.wavelength = config.vq_pe_wavelength
    self.decay = config.vq_ema_decay
    self.accumulation = config.gradient_accumulation_steps

    def matrix(shape, axes, fan_in, tag=None):
      return layers.param(rngs, layers.normal(fan_in**-0.5), shape, axes, role="hidden", dtype=weight_dtype,
                          fan_in=fan_in, tag=tag)

    self.wq = matrix((D, E), ("embed", "head_dim"), D, tag="query")
    self.wk = matrix((D, E), ("embed", "head_dim"), D)
    self.wv = matrix((D, F), ("embed", "mlp"), D)
    self.wg = matrix((D, F), ("embed", "mlp"), D)
    self.wo = matrix((F, D), ("mlp", "embed"), F)
    self.wr = matrix((D, E), ("embed", "head_dim"), D)
    zeros = layers.constant(0.0)
    self.xl_u = layers.param(rngs, zeros, (E,), ("head_dim",), role="bias", dtype=weight_dtype)
    self.xl_v = layers.param(rngs, zeros, (E,), ("head_dim",), role="bias", dtype=weight_dtype)
    # Float32 whatever weight_dtype: the EMA must land exactly on its target.
    self.codebook_sum = layers.param(rngs, layers.normal(Z**-0.5), (Z, E), ("vq_codes", "head_dim"),
                                     role="codebook", dtype=jnp.float32)
    self.codebook_count = layers.param(rngs, layers.constant(1.0), (Z,), ("vq_codes",), role="codebook",
                                       dtype=jnp.float32)

  def __call__(self, x_BTD, segment_ids_BT, *, block_len: int, ring: vqa.Ring | None = None):
    dt = self.dtype
    E = self.wq.shape[-1]
    tau = E**-0.25  # q.k = sqrt(d_k) cos(q, k): the reference's two factors tau^-1/2, tau = sqrt(d_k)
    x_BTD = self.rms(x_BTD)
    q_BTE = self.rms(jnp.einsum("btd,de->bte", x_BTD, self.wq[...].astype(dt))) * tau
    k_BTE = self.rms(jnp.einsum("btd,de->bte", x_BTD, self.wk[...].astype(dt))) * tau
    v_BTF = constrain(jax.nn.silu(jnp.einsum("btd,df->btf", x_BTD, self.wv[...].astype(dt))), layers.axes("BTF"))
    g_BTF = constrain(jax.nn.silu(jnp.einsum("btd,df->btf", x_BTD, self.wg[...].astype(dt))), layers.axes("BTF"))

    codebook_ZE = vqa.codebook(self.codebook_sum[...], self.codebook_count[...])
    z_BT, k_hat_BTE, err_BT = vqa.quantize(k_BTE, codebook_ZE)
    valid_BT = (segment_ids_BT != 0).astype(jnp.float32)
    commit = jnp.sum(err_BT * valid_BT) / jnp.maximum(jnp.sum(valid_BT), 1.0)
    surrogate = vqa.codebook_surrogate(k_BTE, z_BT, valid_BT, self.codebook_sum[...], self.codebook_count[...],
                                       decay=self.decay, accumulation=self.accumulation)

    out_BTF, ring = vqa.attend(
        q_BTE, k_hat_BTE, v_BTF, z_BT, segment_ids_BT, codebook_ZE=codebook_ZE, u_E=self.xl_u[...] * tau,
        vb_E=self.xl_v[...] * tau, rel_DE=self.wr[...] * tau, window=self.window, wavelength=self.wavelength,
        block_len=block_len, ring=ring)
    out_BTD = jnp.einsum("btf,fd->btd", out_BTF * g_BTF, self.wo[...].astype(dt))
    return out_BTD, {"commit": commit, "codebook_loss": surrogate, "ring": ring}


@register("transformer_vq")
class TransformerVQ(ModelFamily):
  """Embedding -> 2N gated attention units (scanned or unrolled) -> [rms] -> x scale -> vocabulary logits."""

  keys = Keys

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    dtype, weight_dtype = jnp.dtype(config.dtype), jnp.dtype(config.weight_dtype)
    D, V = config.base_emb_dim, config.vocab_size
    self.embed = layers.Embed(V, D, init=layers.normal(1.0), dtype=dtype, weight_dtype=weight_dtype, rngs=rngs)
    self.layers = layers.make_stack(2 * config.base_num_decoder_layers,
                                    lambda r: GatedAttentionUnit(config, rngs=r), rngs)
    if not config.logits_via_embedding:
      self.unembed = layers.param(rngs, layers.normal(D**-0.5), (V, D), ("vocab", "embed"), role="readout",
                                  dtype=weight_dtype, fan_in=D)
    self.final_norm = None
    if config.vq_final_norm:  # no gain, as the reference
      self.final_norm = nnx.data(layers.RMSNorm(D, eps=config.normalization_layer_epsilon, dtype=dtype,
                                                weight_dtype=weight_dtype, use_scale=False))

  def __call__(self, tokens_BL, positions_BL, segment_ids_BL, cache=None):
    c = self.config
    if cache is None:
      return self._forward(tokens_BL, segment_ids_BL)
    # A chunk longer than a block that is not a whole number of blocks: blocks first, then the rest.
    L, block = tokens_BL.shape[1], c.vq_block_length
    cut = L - L % block if L > block else L
    logits, aux = self._continue(tokens_BL[:, :cut], positions_BL[:, :cut], segment_ids_BL[:, :cut], cache)
    if cut == L:
      return logits, aux
    tail, aux = self._continue(tokens_BL[:, cut:], positions_BL[:, cut:], segment_ids_BL[:, cut:], aux["cache"])
    return jnp.concatenate([logits, tail], axis=1), aux

  def hidden(self, tokens_BL, positions_BL, segment_ids_BL):
    """(the last activations, aux) of the training forward pass: `logits` of them are its logits."""
    del positions_BL
    return self._forward(tokens_BL, segment_ids_BL, project=False)

  @classmethod
  def cannot_chunk_logits(cls, config) -> str | None:
    del config
    return None

  def _forward(self, tokens_BL, segment_ids_BL, project: bool = True):
    """The whole sequence at once; padded at its end to whole blocks (later tokens cannot change it).
    Returns (logits, aux), or with project=False the activations before the output projection."""
    c = self.config
    L = tokens_BL.shape[1]
    block = min(c.vq_block_length, L)
    pad = -L % block
    tokens_BT = jnp.pad(tokens_BL, ((0, 0), (0, pad)))
    segment_ids_BT = jnp.pad(segment_ids_BL, ((0, 0), (0, pad)))
    x_BTD = constrain(self.embed(tokens_BT), BLD)

    def call(unit, x_BTD, _):
      h_BTD, out = unit(x_BTD, segment_ids_BT, block_len=block)
      return constrain(x_BTD + h_BTD, BLD), (out["commit"], out["codebook_loss"])

    x_BTD, (commit_N, surrogate_N) = layers.run_stack(self.layers, call, x_BTD, None, scan=c.scan_layers,
                                                      remat_policy=c.remat_policy)
    aux = {"aux_loss": c.vq_commit_weight * jnp.sum(commit_N), "codebook_loss": jnp.sum(surrogate_N)}
    return (self.logits(x_BTD[:, :L]) if project else x_BTD[:, :L]), aux

  def _continue(self, tokens_BL, positions_BL, segment_ids_BL, cache):
    """Continue the sequences of `cache` by L tokens at consecutive positions from where each row stopped;
    a row's real tokens (segment id != 0) come first, padding after them is not added to the cache."""
    c = self.config
    L = tokens_BL.shape[1]
    W = cache["segment_ids"].shape[1]
    block = min(c.vq_block_length, L)
    # The ring slot of position p is p mod W. Listed oldest first, the slots before the chunk start at
    # its first position's; afterwards the newest is the row's last real token (padding follows it).
    start_B = positions_BL[:, 0]
    real_B = jnp.sum(segment_ids_BL != 0, axis=1)
    order_BW = (start_B[:, None] + jnp.arange(W)) % W
    unorder_BW = (jnp.arange(W) - (start_B + real_B)[:, None]) % W
    ring_seg_BW = jnp.take_along_axis(cache["segment_ids"], order_BW, axis=1)
    per_layer = {k: cache[k] for k in ("codes", "values", "counts", "means", "cache_segment")}
    x_BLD = constrain(self.embed(tokens_BL), BLD)

    def call(unit, x_BLD, state):
      ring = vqa.Ring(jnp.take_along_axis(state["codes"], order_BW, axis=1),
                      jnp.take_along_axis(state["values"], order_BW[..., None], axis=1), ring_seg_BW,
                      vqa.Stats(state["counts"], state["means"], state["cache_segment"]))
      h_BLD, out = unit(x_BLD, segment_ids_BL, block_len=block, ring=ring)
      ring = out["ring"]
      new = {"codes": jnp.take_along_axis(ring.codes, unorder_BW, axis=1),
             "values": jnp.take_along_axis(ring.values, unorder_BW[..., None], axis=1).astype(state["values"].dtype),
             "counts": ring.stats.counts, "means": ring.stats.means, "cache_segment": ring.stats.segment}
      return constrain(x_BLD + h_BLD, BLD), new

    x_BLD, new = layers.run_stack(self.layers, call, x_BLD, per_layer, scan=c.scan_layers,
                                  remat_policy=c.remat_policy)
    recent_BT = jnp.concatenate([ring_seg_BW, segment_ids_BL], axis=1)
    recent_seg_BW = jnp.take_along_axis(recent_BT, real_B[:, None] + jnp.arange(W), axis=1)
    new["segment_ids"] = jnp.take_along_axis(recent_seg_BW, unorder_BW, axis=1)
    return self.logits(x_BLD), {"cache": new}

  def logits(self, x_BLD):
    c = self.config
    if self.final_norm is not None:
      x_BLD = self.final_norm(x_BLD)
    if c.vq_logits_scale != 1.0:
      x_BLD = x_BLD * jnp.asarray(c.vq_logits_scale, x_BLD.dtype)
    logits_BLV = layers.output_logits(x_BLD, self.embed, None if c.logits_via_embedding else self.unembed,
                                      parametrization.logits_multiplier(c))
    return constrain(logits_BLV, BLV)

  def init_cache(self, batch: int, max_length: int):
    """The same size for any length: W recent keys and Z code statistics per unit (max_length is unused)."""
    del max_length
    c = self.config
    _, _, F, Z, W = dims(c)
    n = 2 * c.base_num_decoder_layers
    return {"codes": jnp.zeros((n, batch, W), jnp.int32), "values": jnp.zeros((n, batch, W, F), c.dtype),
            "segment_ids": jnp.zeros((batch, W), jnp.int32), "counts": jnp.zeros((n, batch, Z), jnp.float32),
            "means": jnp.zeros((n, batch, Z, F), jnp.float32), "cache_segment": jnp.zeros((n, batch), jnp.int32)}

  @classmethod
  def validate(cls, config) -> None:
    D, E, F, Z, W = dims(config)
    if config.base_num_query_heads != 1 or config.base_num_kv_heads != 1:
      raise ConfigError("decoder_block=transformer_vq has single-head attention units: set base_num_query_heads=1 "
                        "and base_num_kv_heads=1 (head_dim is d_k)")
    if D % 2:
      raise ConfigError(f"base_emb_dim={D} must be even for the sinusoidal relative positions of transformer_vq")

  @staticmethod
  def flops_per_token(config) -> float:
    """6 x matmul parameters + per unit 6 x [(P L + L/2) (2 d_k + d_v) + Z (3 d_k + 2 d_v)] + unembedding.

    Per token and unit: the exact window (on average P L + L/2 visible keys, each a content score, a
    position score and a value), the codes (a score, a value mean, a distance, an EMA sum, a block
    statistic); the per-call relative-position table is left out.
    """
    D, E, F, Z, W = dims(config)
    n = 2 * config.base_num_decoder_layers
    L = min(config.vq_block_length, config.max_target_length)
    R = -(-config.max_target_length // L)
    P = min(-(-W // L), R - 1)
    per_unit = 2 * D * E + 2 * D * F + F * D
    attention = (P * L + L / 2) * (2 * E + F) + Z * (3 * E + 2 * F)
    return 6 * n * (per_unit + attention) + decoder.unembed_flops(config)
