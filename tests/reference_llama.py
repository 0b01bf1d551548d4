"""A plain-jnp Transformer++ written independently of MaxText/models, for comparison on copied weights.

Users should not change this file to make a test pass: it is the reference. RoPE is written with complex
numbers and causality with index order (not positions), so it shares no code path with the model.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x, scale, eps):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_complex(x, positions, base):
  """Rotate (x[:E/2], x[E/2:]) as the complex number a + ib by angle pos / base^(2k/E)."""
  E = x.shape[-1]
  inv_freq = 1.0 / (base ** (np.arange(0, E, 2, dtype=np.float64) / E))
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, L, E/2]
  z = (x[..., : E // 2] + 1j * x[..., E // 2:]) * jnp.exp(1j * angles)[:, :, None, :]
  return jnp.concatenate([z.real, z.imag], axis=-1).astype(jnp.float32)


def logits(params, config, tokens, positions, segment_ids):
  p = params
  H, K, E = config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
  eps = config.normalization_layer_epsilon
  x = p["embed"]["embedding"][tokens]
  L = tokens.shape[1]
  causal = jnp.tril(jnp.ones((L, L), bool))
  mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, L, L]
  for i in range(config.base_num_decoder_layers):
    lp = jax.tree.map(lambda a: a[i], p["layers"])
    h = rms_norm(x, lp["pre_attention_norm"]["scale"], eps)
    q = jnp.einsum("bld,dhe->blhe", h, lp["attention"]["wq"])
    k = jnp.einsum("bld,dke->blke", h, lp["attention"]["wk"])
    v = jnp.einsum("bld,dke->blke", h, lp["attention"]["wv"])
    q = rope_complex(q, positions, config.rope_max_timescale)
    k = rope_complex(k, positions, config.rope_max_timescale)
    k = jnp.repeat(k, H // K, axis=2)
    v = jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("blhe,bshe->bhls", q, k) / np.sqrt(E)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    o = jnp.einsum("bhls,bshe->blhe", jax.nn.softmax(s, axis=-1), v)
    x = x + jnp.einsum("blhe,hed->bld", o, lp["attention"]["wo"])
    h = rms_norm(x, lp["pre_mlp_norm"]["scale"], eps)
    m = lp["mlp"]
    x = x + (jax.nn.silu(h @ m["wi_0"].T) * (h @ m["wi_1"].T)) @ m["wo"].T  # weights are [out, in]
  x = rms_norm(x, p["final_norm"]["scale"], eps)
  out = x @ (p["embed"]["embedding"] if config.logits_via_embedding else p["unembed"]).T
  return out
