"""A plain-jnp MUDDFormer written independently of MaxText/models, for comparison on copied weights.

Users should not change this file to make a test pass: it is the reference. It follows the reference JAX
code's order of operations (Caiyun-AI/MUDDFormer, layers/models.py and layers/llama2.py) with its own
attention (tests/reference_llama.py: complex RoPE, causality by index order), stacks the states and mixes
them with one einsum, and writes GELU out as its tanh formula.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tests.reference_llama import rms_norm, rope_complex


def gelu_tanh(x):
  return 0.5 * x * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def norm(x, p, eps):
  """RMSNorm with the gain in `p` (a {'scale': ...} dict), or none when the norm has no gain."""
  return rms_norm(x, p["scale"] if "scale" in p else 1.0, eps)


def attention(lp, xq, xk, xv, positions, mask, config):
  H, K, E = config.base_num_query_heads, config.base_num_kv_heads, config.head_dim
  a = lp["attention"]
  q = rope_complex(jnp.einsum("bld,dhe->blhe", xq, a["wq"]), positions, config.rope_max_timescale)
  k = rope_complex(jnp.einsum("bld,dke->blke", xk, a["wk"]), positions, config.rope_max_timescale)
  v = jnp.einsum("bld,dke->blke", xv, a["wv"])
  k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
  s = jnp.where(mask[:, None], jnp.einsum("blhe,bshe->bhls", q, k) / np.sqrt(E), -jnp.inf)
  return jnp.einsum("bhls,bshe,hed->bld", jax.nn.softmax(s, axis=-1), v, a["wo"])


def logits(params, config, tokens, positions, segment_ids):
  """Logits [B, L, V] and the connection weights of every layer."""
  p, eps, N = params, config.normalization_layer_epsilon, config.base_num_decoder_layers
  groups = [g.strip() for g in config.mudd_streams.split(",")] if config.mudd_streams.strip() else []
  prepost = config.mudd_prepostnorm
  L = tokens.shape[1]
  mask = jnp.tril(jnp.ones((L, L), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  x = p["embed"]["embedding"][tokens]
  states = [norm(x, p["embed_source_norm"], eps) if prepost and groups else x]
  inputs = dict.fromkeys("qkvr", x)
  weights = []
  for i in range(N):
    lp = p[f"layer_{i}"]
    if "pre_attention_norm" in lp:
      xq = xk = xv = norm(inputs["q"], lp["pre_attention_norm"], eps)
    else:
      xq, xk, xv = (norm(inputs[s], lp[f"pre_{name}_norm"], eps) for s, name in zip("qkv", ("query", "key", "value")))
    x = inputs["r"] + attention(lp, xq, xk, xv, positions, mask, config)
    m, h = lp["mlp"], norm(x, lp["pre_mlp_norm"], eps)
    x = x + (jax.nn.silu(h @ m["wi_0"].T) * (h @ m["wi_1"].T)) @ m["wo"].T
    inputs = dict.fromkeys("qkvr", x)
    if "dense" not in lp:
      continue
    d = lp["dense"]
    layer_groups = [g for g in groups if "r" in g] if i == N - 1 else groups
    if "w1" in d:
      hidden = gelu_tanh(norm(x, d.get("generator_norm", {}), eps) @ d["w1"])
      w = jnp.einsum("blm,mcj->blcj", hidden, d["w2"]) + d["bias"]
    else:
      w = jnp.broadcast_to(d["bias"], x.shape[:2] + d["bias"].shape)
    weights.append(w)
    states.append(norm(x, d["source_norm"], eps) if prepost else x)
    stacked = jnp.stack(states)  # [J, B, L, D]
    for c, group in enumerate(layer_groups):
      mixed = jnp.einsum("blj,jbld->bld", w[:, :, c], stacked)
      if prepost:
        mixed = x + (norm(mixed, d["post_norm"], eps) if "r" in group else mixed)
      inputs.update(dict.fromkeys(group, mixed))
  x = norm(inputs["r"], p["final_norm"], eps)
  out = x @ (p["embed"]["embedding"] if config.logits_via_embedding else p["unembed"]).T
  return out, weights
