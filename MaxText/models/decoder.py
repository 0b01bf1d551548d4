"""The decoder skeleton shared by Transformer++, GPT and MUDD, written once.

    tokens -> embed_tokens -> run_layers -> final norm -> logits (tied or untied) -> head -> logits_BLV

A family subclasses `Decoder` and supplies its layers: a `Block` class (stacked on a leading `layers`
axis, run by `layers.run_stack`, scanned or unrolled), or its own `make_layers` / `run_layers`. The
skeleton owns the embedding, the final norm, the output projection, the decode cache's plumbing
({"layers": the layers' cache, "segment_ids": the slots' segment ids, and the head's entries}) and the
recorded activations (embed, every layer's sites, logits). Optional hooks: `make_inputs` / `embed_tokens`
(e.g. a position table), `make_head` / `head` (e.g. GPT's head-QK logits), `Norm` (LayerNorm),
`init_layer_cache` / `init_head_cache`.

Parameters are created in the order embed, inputs, layers, final norm, unembed, head: the RNG stream of
`init_weights_seed` is drawn in that order, so a family's initial parameters are fixed by it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText.models import ModelFamily, attention, layers, parametrization
from MaxText.models.layers import BLD, BLV
from MaxText.parallel.sharding import constrain


class Decoder(ModelFamily):
  """Embedding -> the family's layers -> final norm -> vocabulary logits (see the module docstring)."""

  Block: type | None = None  # the layer class stacked by the default make_layers / run_layers
  Norm: type = layers.RMSNorm  # the final norm's class (make_norm)

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.config = config
    dtype, weight_dtype = layers.dtypes(config)
    D, V = config.base_emb_dim, config.vocab_size
    init = layers.normal(config.init_weights_std)
    self.embed = layers.Embed(V, D, init=init, dtype=dtype, weight_dtype=weight_dtype, rngs=rngs)
    self.make_inputs(rngs)
    self.make_layers(rngs)
    self.final_norm = self.make_norm(rngs)
    if not config.logits_via_embedding:
      self.unembed = layers.param(rngs, init, (V, D), ("vocab", "embed"), role="readout", dtype=weight_dtype,
                                  fan_in=D)
    self.make_head(rngs)

  # --- Construction hooks ---

  def make_inputs(self, rngs: nnx.Rngs) -> None:
    """Parameters of the input side besides the token embedding (none by default)."""

  def make_layers(self, rngs: nnx.Rngs) -> None:
    self.layers = layers.make_stack(self.config.base_num_decoder_layers,
                                    lambda r: self.Block(self.config, rngs=r), rngs)

  def make_norm(self, rngs: nnx.Rngs, **options) -> nnx.Module:
    """A D-wide norm of the family's `Norm` class, with gains unless use_norm_gains is false; `options` go to
    the class as they are (e.g. GPT's use_bias)."""
    c = self.config
    dtype, weight_dtype = layers.dtypes(c)
    return self.Norm(c.base_emb_dim, eps=c.normalization_layer_epsilon, dtype=dtype, weight_dtype=weight_dtype,
                     rngs=rngs, use_scale=c.use_norm_gains, **options)

  def make_head(self, rngs: nnx.Rngs) -> None:
    """Parameters of the output side besides the unembedding (none by default)."""

  # --- The forward pass ---

  def __call__(self, tokens_BL, positions_BL, segment_ids_BL, cache=None):
    h_BLD, aux, key_segment_BS = self.trunk(tokens_BL, positions_BL, segment_ids_BL, cache)
    logits_BLV = self.logits(h_BLD)
    if self.config.record_activations:
      aux["activations"]["logits"] = layers.mean_abs(logits_BLV)
    logits_BLV, head_cache = self.head(h_BLD, logits_BLV, tokens_BL, positions_BL, segment_ids_BL, cache,
                                       key_segment_BS)
    if cache is not None:
      aux["cache"].update(head_cache)
    return constrain(logits_BLV, BLV), aux

  def hidden(self, tokens_BL, positions_BL, segment_ids_BL):
    """(h_BLD, aux) of a training forward pass: the final hidden states, whose `logits(h_BLD)` are the
    model's logits when the family adds no head (see `cannot_chunk_logits`)."""
    h_BLD, aux, _ = self.trunk(tokens_BL, positions_BL, segment_ids_BL, None)
    return h_BLD, aux

  @classmethod
  def cannot_chunk_logits(cls, config) -> str | None:
    del config
    return None

  def trunk(self, tokens_BL, positions_BL, segment_ids_BL, cache):
    """Embedding, layers, final norm -> (h_BLD, aux, the cache slots' segment ids or None); aux holds the
    layers' new cache and the recorded sites when there are any."""
    record = self.config.record_activations
    x_BLD = constrain(self.embed_tokens(tokens_BL, positions_BL), BLD)
    embed_size = layers.mean_abs(x_BLD) if record else None
    key_segment_BS = layer_cache = None
    if cache is not None:
      key_segment_BS = attention.cache_write(cache["segment_ids"], segment_ids_BL, positions_BL)
      layer_cache = cache["layers"]
    x_BLD, layer_cache, layer_stats, aux = self.run_layers(x_BLD, positions_BL, segment_ids_BL, layer_cache,
                                                           key_segment_BS, record)
    h_BLD = self.final_norm(x_BLD)
    if record:  # per-layer sites are [N] arrays (one entry per layer)
      aux["activations"] = {"embed": embed_size, **layer_stats}
    if cache is not None:
      aux["cache"] = {"layers": layer_cache, "segment_ids": key_segment_BS}
    return h_BLD, aux, key_segment_BS

  def embed_tokens(self, tokens_BL, positions_BL):
    del positions_BL
    return self.embed(tokens_BL)

  def run_layers(self, x_BLD, positions_BL, segment_ids_BL, layer_cache, key_segment_BS, record: bool):
    """-> (x_BLD, the layers' new cache, their recorded sites or None, aux entries). Each Block is called
    as block(x_BLD, positions_BL, segment_ids_BL, its cache, key_segment_BS, stats) -> (x_BLD, its cache)."""
    c = self.config

    def call(layer, x_BLD, layer_cache):
      if not record:
        return layer(x_BLD, positions_BL, segment_ids_BL, layer_cache, key_segment_BS)
      stats = {}
      x_BLD, layer_cache = layer(x_BLD, positions_BL, segment_ids_BL, layer_cache, key_segment_BS, stats)
      return x_BLD, (layer_cache, stats)

    x_BLD, outs = layers.run_stack(self.layers, call, x_BLD, layer_cache, scan=c.scan_layers,
                                   remat_policy=c.remat_policy)
    layer_cache, layer_stats = outs if record else (outs, None)
    return x_BLD, layer_cache, layer_stats, {}

  def logits(self, x_BLD):
    c = self.config
    return layers.output_logits(x_BLD, self.embed, None if c.logits_via_embedding else self.unembed,
                                parametrization.logits_multiplier(c))

  def head(self, h_BLD, logits_BLV, tokens_BL, positions_BL, segment_ids_BL, cache, key_segment_BS):
    """-> (logits_BLV, the head's cache entries): extra output terms, none by default."""
    del h_BLD, tokens_BL, positions_BL, segment_ids_BL, cache, key_segment_BS
    return logits_BLV, {}

  # --- Decoding ---

  def init_cache(self, batch: int, max_length: int) -> dict[str, Any]:
    return {"layers": self.init_layer_cache(batch, max_length),
            "segment_ids": jnp.zeros((batch, max_length), jnp.int32), **self.init_head_cache(batch, max_length)}

  def init_layer_cache(self, batch: int, max_length: int):
    return attention.kv_cache(self.config, batch, max_length)

  def init_head_cache(self, batch: int, max_length: int) -> dict[str, jax.Array]:
    del batch, max_length
    return {}


# --- Training FLOPs per token, the parts every decoder shares ---

def attention_macs(width: int, heads: int, kv_heads: int, head_dim: int) -> int:
  """Multiply-adds per token of the q, k, v and output projections."""
  return width * heads * head_dim * 2 + width * kv_heads * head_dim * 2


def mlp_macs(width: int, hidden: int, gates: int) -> int:
  """Multiply-adds per token of an MLP with `gates` input projections and one output projection."""
  return width * hidden * gates + hidden * width


def training_flops(config, matmul_macs: float, *, heads: int | None = None, head_dim: int | None = None) -> float:
  """6 x the per-token multiply-adds of the matrices (forward and backward) + causal attention over
  max_target_length (6*N*L*H*E: scores and values, half the square) + the unembedding 6*D*V."""
  H = config.base_num_query_heads if heads is None else heads
  E = config.head_dim if head_dim is None else head_dim
  attention_flops = 6 * config.base_num_decoder_layers * config.max_target_length * H * E
  return 6 * matmul_macs + attention_flops + unembed_flops(config)


def unembed_flops(config) -> float:
  return 6 * config.base_emb_dim * config.vocab_size
