"""Plain-jnp Transformer-VQ: quadratic softmax attention over the quantised keys, one unit after another.

An independent code path for the tests: no blocks, no compressed cache, no scan. Users shouldn't change
it to make a test pass; it is what the linear-time model must equal.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rms(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def relative_table(w_DE, window, wavelength):
  """r_d = [sin, cos](d / wavelength^(2k/D)) @ w for d < window: [window, E]."""
  D = w_DE.shape[0]
  d = np.arange(window)[:, None]
  angle = d / wavelength ** (np.arange(0, D, 2)[None] / D)
  return jnp.asarray(np.concatenate([np.sin(angle), np.cos(angle)], axis=1), jnp.float32) @ w_DE


def attention(q_BTE, k_hat_BTE, v_BTF, seg_BT, u_E, vb_E, rel_WE):
  """softmax_j[(q_i + u).k_j + [0 <= i-j < W] (q_i + v_b).r_{i-j}] over j <= i of the same document."""
  T, W = q_BTE.shape[1], rel_WE.shape[0]
  dist = np.arange(T)[:, None] - np.arange(T)[None]
  rel_TTE = jnp.where((dist >= 0)[..., None] & (dist < W)[..., None], rel_WE[np.clip(dist, 0, W - 1)], 0.0)
  scores = jnp.einsum("bie,bje->bij", q_BTE + u_E, k_hat_BTE)
  scores = scores + jnp.einsum("bie,ije->bij", q_BTE + vb_E, rel_TTE)
  visible = (dist >= 0)[None] & (seg_BT[:, :, None] == seg_BT[:, None, :])
  scores = jnp.where(visible, scores, -1e30)
  return jnp.einsum("bij,bjf->bif", jax.nn.softmax(scores, axis=-1), v_BTF)


def quantize(k_BTE, c_sum, c_count):
  codebook = c_sum / jnp.maximum(c_count, 0.01)[:, None]
  z = jnp.argmin(jnp.sum((k_BTE[:, :, None, :] - codebook) ** 2, axis=-1), axis=-1)
  return z, codebook[z]


def forward(params, config, tokens, segment_ids):
  """(logits, [(keys, codes) of every unit]) of the model config describes, from its parameter dict."""
  E = config.head_dim
  window = config.vq_window or config.vq_block_length
  x = params["embed"]["embedding"][tokens]
  units = params["layers"]
  keys_and_codes = []
  for n in range(units["wq"].shape[0]):
    p = {name: value[n] for name, value in units.items()}
    h = rms(x)
    q = rms(h @ p["wq"]) * E**-0.25
    k = rms(h @ p["wk"]) * E**-0.25
    v, g = jax.nn.silu(h @ p["wv"]), jax.nn.silu(h @ p["wg"])
    z, k_hat = quantize(k, p["codebook_sum"], p["codebook_count"])
    keys_and_codes.append((k, z))
    rel = relative_table(p["wr"] * E**-0.25, window, config.vq_pe_wavelength)
    o = attention(q, k_hat, v, segment_ids, p["xl_u"] * E**-0.25, p["xl_v"] * E**-0.25, rel)
    x = x + (o * g) @ p["wo"]
  if config.vq_final_norm:
    x = rms(x)
  x = x * config.vq_logits_scale
  readout = params["embed"]["embedding"] if config.logits_via_embedding else params["unembed"]
  return x @ readout.T, keys_and_codes
