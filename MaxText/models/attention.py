"""Attention: the mask of packed documents, the registered kernels (`attention` key), the decode cache.

A kernel is a function registered in IMPLEMENTATIONS:
    kernel(q_BLHE, k_BSKE, v_BSKE, mask, *, scale, bias_BHLS=None) -> out_BLHE
where `mask` is a `Mask` (segment ids and positions of queries and keys: `mask.dense()` is the [B, L, S]
boolean a plain kernel needs, while fused kernels can read the segment ids themselves). Scores and
softmax are float32; keys and values may have fewer heads (K) than queries (H).

A kernel with requirements declares them with `@requires(check, bias=...)`: `check(config)` raises a
one-line ConfigError when the machine or the config cannot run it (`validation.validate` calls it, so the
run stops before anything is traced), and `bias=False` says it cannot add a score bias (a family that adds
one, e.g. ALiBi, refuses such a kernel in its own `validate`). The fused kernels live in their own modules
(attention_cudnn.py, attention_splash.py), loaded with the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from MaxText.models.layers import einsum_f32, mean_abs
from MaxText.registry import Registry

# Large but finite, so that a fully masked row gives a uniform softmax rather than NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)



def _import_kernels() -> None:
  for name in ("attention_cudnn", "attention_splash"):
    importlib.import_module(f"MaxText.models.{name}")


IMPLEMENTATIONS = Registry("attention", "attention kernel", load=_import_kernels)


def requires(check: Callable | None = None, *, bias: bool = True) -> Callable:
  """Decorator of a kernel: its validation-time `check(config)` and whether it takes `bias_BHLS`."""

  def mark(kernel):
    kernel.check_config, kernel.accepts_bias = check, bias
    return kernel

  return mark


def check_config(config) -> None:
  """The configured kernel's own requirements (machine, dtype, lengths): a one-line ConfigError if unmet."""
  check = getattr(IMPLEMENTATIONS.get(config.attention), "check_config", None)
  if check is not None:
    check(config)


def accepts_bias(name: str) -> bool:
  """Whether kernel `name` can add a score bias (ALiBi)."""
  return getattr(IMPLEMENTATIONS.get(name), "accepts_bias", True)


class Mask(NamedTuple):
  """Who may attend to whom: the same document (segment id, 0 = padding or an empty cache slot) and not
  a later position."""

  q_segment_BL: jax.Array
  q_position_BL: jax.Array
  k_segment_BS: jax.Array
  k_position_BS: jax.Array

  def dense(self) -> jax.Array:
    """[B, L, S] bool."""
    return attention_mask(self.q_segment_BL, self.q_position_BL, self.k_segment_BS, self.k_position_BS)

  @property
  def is_self_attention(self) -> bool:
    """Whether the keys are the queries' own tokens (training, evaluation), not a decode cache's slots.
    `keys_and_mask` builds such a mask from the very same arrays, so the test is by identity, at trace
    time. Then, since positions grow along each packed document, key order and position order agree,
    which lets fused kernels apply causality by index."""
    return self.k_segment_BS is self.q_segment_BL and self.k_position_BS is self.q_position_BL


def attention_mask(q_segment_BL, q_position_BL, k_segment_BS, k_position_BS) -> jax.Array:
  """[B, L, S] bool: same document (segment id) and not in the future (position order)."""
  same_doc = q_segment_BL[:, :, None] == k_segment_BS[:, None, :]
  causal = k_position_BS[:, None, :] <= q_position_BL[:, :, None]
  return same_doc & causal


@IMPLEMENTATIONS.register("autoselected")
def autoselected(q_BLHE, k_BSKE, v_BSKE, mask: Mask, *, scale: float, bias_BHLS=None) -> jax.Array:
  """On a CPU, or with a bias, the plain kernel (dot_product: on a CPU it runs the attention of a small GPT
  in about half the time of jax.nn.dot_product_attention, forward and backward); elsewhere
  jax.nn.dot_product_attention with its default implementation (XLA in this JAX version). In bfloat16 the
  latter's backward pass multiplies float32 score gradients (XLA's choice, not ours); dot_product,
  cudnn_flash and splash keep every attention matmul in bfloat16."""
  if bias_BHLS is not None or jax.default_backend() == "cpu":
    return dot_product(q_BLHE, k_BSKE, v_BSKE, mask, scale=scale, bias_BHLS=bias_BHLS)
  return jax.nn.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, mask=mask.dense()[:, None], scale=scale)


@IMPLEMENTATIONS.register("dot_product")
def dot_product(q_BLHE, k_BSKE, v_BSKE, mask: Mask, *, scale: float, bias_BHLS=None) -> jax.Array:
  """The plain reference: float32 scores, masked softmax. Grouped query heads (K < H) take a five-axis
  einsum; with as many key heads as query heads the four-axis one, which XLA runs about twice as fast on
  a CPU."""
  B, L, H, E = q_BLHE.shape
  K = k_BSKE.shape[2]
  if K == H:
    s_BHLS = einsum_f32("blhe,bshe->bhls", q_BLHE, k_BSKE) * scale
    if bias_BHLS is not None:
      s_BHLS = s_BHLS + bias_BHLS.astype(jnp.float32)
    s_BHLS = jnp.where(mask.dense()[:, None], s_BHLS, MASK_VALUE)
    p_BHLS = jax.nn.softmax(s_BHLS, axis=-1).astype(v_BSKE.dtype)
    return jnp.einsum("bhls,bshe->blhe", p_BHLS, v_BSKE)
  q_BLKGE = q_BLHE.reshape(B, L, K, H // K, E)
  s_BKGLS = einsum_f32("blkge,bske->bkgls", q_BLKGE, k_BSKE) * scale
  if bias_BHLS is not None:
    s_BKGLS = s_BKGLS + bias_BHLS.reshape(B, K, H // K, *bias_BHLS.shape[2:]).astype(jnp.float32)
  s_BKGLS = jnp.where(mask.dense()[:, None, None], s_BKGLS, MASK_VALUE)
  p_BKGLS = jax.nn.softmax(s_BKGLS, axis=-1).astype(v_BSKE.dtype)
  out_BLKGE = jnp.einsum("bkgls,bske->blkge", p_BKGLS, v_BSKE)
  return out_BLKGE.reshape(B, L, H, E)


def cache_write(cache_BS: jax.Array, new_BL: jax.Array, positions_BL: jax.Array) -> jax.Array:
  """Write each row's new entries at their positions (a cache slot per position); out of range is dropped."""
  rows_B1 = jnp.arange(cache_BS.shape[0])[:, None]
  return cache_BS.at[rows_B1, positions_BL].set(new_BL.astype(cache_BS.dtype), mode="drop")


def slot_positions(key_segment_BS: jax.Array) -> jax.Array:
  """[B, S] positions of a KV cache's slots: slot s holds position s."""
  return jnp.broadcast_to(jnp.arange(key_segment_BS.shape[1], dtype=jnp.int32), key_segment_BS.shape)


def keys_and_mask(k_BLKE, v_BLKE, positions_BL, segment_ids_BL, cache, key_segment_BS):
  """The keys and values attended to, and the mask: this chunk's own (training, no cache), or the cache's
  slots with this chunk written in at its positions. Returns (k_BSKE, v_BSKE, mask, new cache or None)."""
  if cache is None:
    mask = Mask(segment_ids_BL, positions_BL, segment_ids_BL, positions_BL)
    return k_BLKE, v_BLKE, mask, None
  cache = {**cache, "k": cache_write(cache["k"], k_BLKE, positions_BL),
           "v": cache_write(cache["v"], v_BLKE, positions_BL)}
  mask = Mask(segment_ids_BL, positions_BL, key_segment_BS, slot_positions(key_segment_BS))
  return cache["k"], cache["v"], mask, cache


def attend(q_BLHE, k_BSKE, v_BSKE, mask: Mask, *, scale: float, implementation: str, bias_BHLS=None):
  return IMPLEMENTATIONS.get(implementation)(q_BLHE, k_BSKE, v_BSKE, mask, scale=scale, bias_BHLS=bias_BHLS)


def self_attention(q_BLHE, k_BLKE, v_BLKE, positions_BL, segment_ids_BL, cache, key_segment_BS, *, scale: float,
                   implementation: str, output: Callable[[jax.Array], jax.Array], stats: dict | None = None,
                   bias: Callable[[Mask], jax.Array] | None = None):
  """The part of a decoder layer's attention after its projections: keys from this chunk or the cache,
  the kernel, the output projection `output(out_BLHE) -> out_BLD`, the recorded sites. `bias(mask)` gives
  an additive [B, H, L, S] score bias (e.g. ALiBi). Returns (out_BLD, the new cache or None)."""
  k_BSKE, v_BSKE, mask, cache = keys_and_mask(k_BLKE, v_BLKE, positions_BL, segment_ids_BL, cache, key_segment_BS)
  out_BLHE = attend(q_BLHE, k_BSKE, v_BSKE, mask, scale=scale, implementation=implementation,
                    bias_BHLS=None if bias is None else bias(mask))
  out_BLD = output(out_BLHE)
  record_stats(stats, q_BLHE, k_BLKE, k_BSKE, out_BLD, mask, scale)
  return out_BLD, cache


def record_stats(stats: dict | None, q_BLHE, k_BLKE, k_BSKE, out_BLD, mask: Mask, scale: float) -> None:
  """The coordinate-check sites of an attention layer, when a `stats` dict is being recorded."""
  if stats is not None:
    stats.update(q=mean_abs(q_BLHE), k=mean_abs(k_BLKE), attn_out=mean_abs(out_BLD),
                 attn_logits=logits_mean_abs(q_BLHE, k_BSKE, mask.dense(), scale))


def logits_mean_abs(q_BLHE, k_BSKE, mask_BLS, scale: float) -> jax.Array:
  """mean |scale * q.k| over the unmasked pairs; recomputed apart from the attention kernel, which hides them."""
  B, L, H, E = q_BLHE.shape
  K = k_BSKE.shape[2]
  q_BLKGE = q_BLHE.reshape(B, L, K, H // K, E)
  s_BKGLS = jnp.einsum("blkge,bske->bkgls", q_BLKGE, k_BSKE, preferred_element_type=jnp.float32) * scale
  return mean_abs(s_BKGLS, mask_BLS[:, None, None])


def kv_cache(config, batch: int, max_length: int, *, head_dim: int | None = None) -> dict[str, jax.Array]:
  """Empty keys and values of every layer, [layers, batch, max_length, kv_heads, head_dim]."""
  shape = (config.base_num_decoder_layers, batch, max_length, config.base_num_kv_heads, head_dim or config.head_dim)
  return {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}
