"""The released PyTorch MUDDFormer's forward pass (Caiyun-AI/MUDDFormer, `modeling_muddformer.py`), re-implemented
in plain PyTorch from a written description of it (docs/checkpoints.md, "The MUDDFormer release"), not from its code, over a
flat {release name: tensor} state dict and its config.json. Also makes random checkpoints in its format.

Users should not change this file to make a test pass: it is the reference. It keeps the release's own forms
where ours differ: RoPE rotates the half-split pairs and writes them interleaved, from a cos/sin table rounded to
bfloat16; each RMSNorm casts the normalised value back to the input dtype before the gain; the weighted sums
are Python sums over the states; the weight generator's GELU is the erf form; the causal mask uses float32's min.
"""

from __future__ import annotations

import math

import torch


def _find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - n % k


def sizes(cfg: dict) -> dict:
  """D, H, K, E, L, F_i, M_i, C_i of a release config (class defaults where a key is absent)."""
  D, H, L = cfg.get("dim", 2560), cfg.get("n_head", 32), cfg.get("n_layer", 32)
  K = cfg.get("n_local_heads", -1)
  K = H if K == -1 else K
  F = cfg.get("intermediate_size") or _find_multiple(int(2 * (4 * D) / 3), 256)
  ffn = [round(F * (i / (L - 1) + 0.5) / 128) * 128 for i in range(L)]
  dense = cfg.get("dense", True) and cfg.get("dense_type", "qkvr") != "l"
  C = [(4 if i < L - 1 else 1) for i in range(L)]
  hidden = []
  for i in range(L):
    n = (i + 2) * C[i]
    if i == L - 1 and cfg.get("expand_last", False):
      n *= 4
    hidden.append((n // 64 + 1) * 64 if cfg.get("round64", False) else n)
  return dict(D=D, H=H, K=K, E=D // H, L=L, F=ffn, M=hidden, C=C, dense=dense, V=cfg.get("vocab_size", 50432))


def random_state(cfg: dict, seed: int = 0, scale: float = 0.05, near_identity: bool = False) -> dict:
  """A random state dict with the release's names and shapes. `near_identity`: dense weights close to passing
  each layer's output on (static one-hot on the newest state, tiny dynamic part)."""
  s = sizes(cfg)
  g = torch.Generator().manual_seed(seed)
  D, H, K, E, L, V = s["D"], s["H"], s["K"], s["E"], s["L"], s["V"]

  def rnd(*shape, std=scale):
    return torch.randn(*shape, generator=g) * std

  def gain(n):
    return 1.0 + rnd(n, std=0.1)

  t = {"tok_embeddings.weight": rnd(V, D, std=1.0)}
  for i in range(L):
    p = f"layers.{i}."
    if s["dense"]:
      t[p + "attention.wq.weight"] = rnd(H * E, D)
      t[p + "attention.wk.weight"] = rnd(K * E, D)
      t[p + "attention.wv.weight"] = rnd(K * E, D)
    else:
      t[p + "attention.wqkv.weight"] = rnd((H + 2 * K) * E, D)
    t[p + "attention.wo.weight"] = rnd(D, H * E)
    if cfg.get("use_qk_norm", False):
      t[p + "attention.q_norm.weight"] = gain(E)
      t[p + "attention.k_norm.weight"] = gain(E)
    F = s["F"][i]
    t[p + "feed_forward.w1.weight"] = rnd(F, D)
    t[p + "feed_forward.w3.weight"] = rnd(F, D)
    t[p + "feed_forward.w2.weight"] = rnd(D, F)
    t[p + "ffn_norm.weight"] = gain(D)
    if i == 0 or not s["dense"]:
      t[p + "attention_norm.weight"] = gain(D)
    else:
      for j in range(3):
        t[p + f"attention_norms.{j}.weight"] = gain(D)
  t["norm.weight"] = gain(D)
  t["output.weight"] = rnd(V, D)
  if s["dense"]:
    for i in range(L):
      C, J, M = s["C"][i], i + 2, s["M"][i]
      if near_identity:
        bias = torch.zeros(C, J)
        bias[:, -1] = 1.0
        t[f"dense_bs.{i}"] = bias + rnd(C, J, std=0.01)
        t[f"dynamic_dense.{i}.w2.weight"] = rnd(C * J, M, std=0.001)
      else:
        t[f"dense_bs.{i}"] = rnd(C, J, std=0.5)
        t[f"dynamic_dense.{i}.w2.weight"] = rnd(C * J, M, std=0.1)
      t[f"dynamic_dense.{i}.w1.weight"] = rnd(M, D, std=D ** -0.5)
  return t


def _rms(x, w, eps):
  y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
  return y.to(x.dtype) * w


def _rms_noscale(x, eps):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope_table(T: int, E: int, base: float):
  inv = 1.0 / (base ** (torch.arange(0, E, 2).float() / E))
  angle = torch.outer(torch.arange(T).float(), inv)
  return torch.cos(angle).to(torch.bfloat16).float(), torch.sin(angle).to(torch.bfloat16).float()


def _rope(x, cos, sin):
  """x [B, T, heads, E]: half-split pairs rotated, written interleaved (out[2k], out[2k+1])."""
  E = x.shape[-1]
  a, b = x.float()[..., : E // 2], x.float()[..., E // 2:]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = torch.stack([a * c - b * s, b * c + a * s], dim=-1)
  return out.reshape(x.shape).to(x.dtype)


@torch.no_grad()
def logits(t: dict, cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
  """[B, T, V] float32 logits of the release's forward pass over `tokens` [B, T] (positions 0..T-1)."""
  s = sizes(cfg)
  D, H, K, E, L = s["D"], s["H"], s["K"], s["E"], s["L"]
  eps = cfg.get("norm_eps", 1e-6)
  B, T = tokens.shape
  w = {k: v.float() for k, v in t.items()}
  cos, sin = _rope_table(T, E, cfg.get("rope_base", 10000))
  mask = torch.ones(T, T, dtype=torch.bool).tril()
  x0 = w["tok_embeddings.weight"][tokens]
  hids = [x0]
  streams = None
  for i in range(L):
    p = f"layers.{i}."
    if i == 0 or not s["dense"]:
      x_in = x0 if i == 0 else hids[-1]
      n = _rms(x_in, w[p + "attention_norm.weight"], eps)
      q_in = k_in = v_in = n
      r = x_in
    else:
      Q, Kx, Vx, R = streams
      q_in = _rms(Q, w[p + "attention_norms.0.weight"], eps)
      k_in = _rms(Kx, w[p + "attention_norms.1.weight"], eps)
      v_in = _rms(Vx, w[p + "attention_norms.2.weight"], eps)
      r = R
    if s["dense"]:
      wq, wk, wv = w[p + "attention.wq.weight"], w[p + "attention.wk.weight"], w[p + "attention.wv.weight"]
    else:
      wq, wk, wv = w[p + "attention.wqkv.weight"].split([H * E, K * E, K * E], dim=0)
    q = (q_in @ wq.T).view(B, T, H, E)
    k = (k_in @ wk.T).view(B, T, K, E)
    v = (v_in @ wv.T).view(B, T, K, E)
    if cfg.get("use_qk_norm", False):
      q = _rms(q, w[p + "attention.q_norm.weight"], eps)
      k = _rms(k, w[p + "attention.k_norm.weight"], eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    scores = torch.einsum("bthe,bshe->bhts", q, k) * (1.0 / math.sqrt(E))
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    y = torch.einsum("bhts,bshe->bthe", probs, v).reshape(B, T, H * E)
    h = r + y @ w[p + "attention.wo.weight"].T
    n = _rms(h, w[p + "ffn_norm.weight"], eps)
    gate, up = n @ w[p + "feed_forward.w1.weight"].T, n @ w[p + "feed_forward.w3.weight"].T
    x = h + (torch.nn.functional.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    hids.append(x)
    if not s["dense"]:
      continue
    C, J = s["C"][i], i + 2
    u = _rms_noscale(x, eps)
    hidden = torch.nn.functional.gelu(u @ w[f"dynamic_dense.{i}.w1.weight"].T, approximate="none")
    a = (hidden @ w[f"dynamic_dense.{i}.w2.weight"].T).view(B, T, C, J) + w[f"dense_bs.{i}"]
    streams = []
    for c in range(C):
      acc = 0
      for j in range(J):
        acc = acc + a[:, :, c, j, None] * hids[j]
      streams.append(acc)
  out = streams[0] if s["dense"] else hids[-1]
  return _rms(out, w["norm.weight"], eps) @ w["output.weight"].T
