"""A plain-jnp GPT written independently of MaxText/models, for comparison on copied weights.

Users should not change this file to make a test pass: it is the reference. It takes one document per row
(positions 0..L-1) and follows the fattorib/transformer formulations rather than the model's: ALiBi as one
bias row -m_h (L - 1 - j) shared by every query (equal to -m_h (i - j) up to a per-row constant), the SGU
kernel as a cumulative-sum-normalised band of ones, head-QK as a product with one-hot tokens, and GELU
written out as its tanh formula.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  y = (x - mean) / jnp.sqrt(var + eps)
  return y * p["scale"] + p["bias"] if p else y


def gelu_tanh(x):
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def slopes(num_heads):
  """Press et al.'s recursive construction."""
  def power_of_two(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(closest) + slopes(2 * closest)[0::2][: num_heads - closest]


def sgu_kernel(length, width):
  """Band of ones (0 <= i - j <= width), divided by its column cumulative sum + 1: 1/(i - j + 2); rows then
  normalised to sum to 1 (the model's documented choice)."""
  ones = np.tril(np.ones((length, length))) * np.triu(np.ones((length, length)), -width)
  k = ones / (np.cumsum(ones, axis=0) + 1.0) * ones
  return k / k.sum(-1, keepdims=True)


def attention(p, x, config, width_heads):
  H, K = config.base_num_query_heads, config.base_num_kv_heads
  E = width_heads
  L = x.shape[1]
  q = jnp.einsum("bld,dhe->blhe", x, p["wq"]) + p["bq"]
  k = jnp.einsum("bld,dke->blke", x, p["wk"]) + p["bk"]
  v = jnp.einsum("bld,dke->blke", x, p["wv"]) + p["bv"]
  if config.qk_norm:
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True) * p["qk_scale"][:, None]
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    scale = 1.0
  else:
    scale = 1.0 / math.sqrt(E)
  k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
  s = jnp.einsum("blhe,bshe->bhls", q, k) * scale
  if config.alibi:
    row = -np.asarray(slopes(H))[:, None] * (L - 1 - np.arange(L))[None, :]  # [H, S]
    s = s + row[None, :, None, :]
  s = jnp.where(np.tril(np.ones((L, L), bool)), s, -jnp.inf)
  o = jnp.einsum("bhls,bshe->blhe", jax.nn.softmax(s, -1), v)
  return jnp.einsum("blhe,hed->bld", o, p["wo"]) + p["bo"]


def mlp(p, x):
  return gelu_tanh(x @ p["wi_0"].T + p["bi_0"]) @ p["wo"].T + p["bo"]


def logits(params, config, tokens):
  p = params
  eps = config.normalization_layer_epsilon
  L = tokens.shape[1]
  x = p["embed"]["embedding"][tokens]
  if not config.alibi:
    x = x + p["position_embedding"][:L]
  for i in range(config.base_num_decoder_layers):
    lp = jax.tree.map(lambda a: a[i], p["layers"])
    h = layer_norm(x, lp.get("norm") or lp.get("pre_attention_norm"), eps)
    if config.static_sgu:
      half = h.shape[-1] // 2
      mixed = jnp.concatenate([
          jnp.einsum("ls,bsd->bld", sgu_kernel(L, config.sgu_band_width), h[..., :half]),
          attention(lp["attention"], h[..., half:], config, config.head_dim // 2)], axis=-1)
    else:
      mixed = attention(lp["attention"], h, config, config.head_dim)
    if config.parallel_residual:
      x = x + mixed + mlp(lp["mlp"], h)
    else:
      x = x + mixed
      x = x + mlp(lp["mlp"], layer_norm(x, lp.get("pre_mlp_norm"), eps))
  h = layer_norm(x, p.get("final_norm"), eps)
  out = h @ (p["embed"]["embedding"] if config.logits_via_embedding else p["unembed"]).T
  if config.head_qk:
    c = (h @ p["head_q"]) @ (h @ p["head_k"]).transpose(0, 2, 1) / config.head_qk_dim
    c = c * np.tril(np.ones((L, L)))
    out = out + c @ jax.nn.one_hot(tokens, config.vocab_size)
  return out
