"""Transformer-VQ maths: vector-quantised keys and block-wise attention in time linear in the length.

Shapes (letters of layers.py): B batch, T tokens of one call, X blocks of L tokens, S keys of a block's
exact window, Z codes, E key width (d_k), F value width (d_v), W bias window (= ring slots).

Every query attends to every earlier key of its document, with the key replaced by its codeword:
  score(i, j) = (q_i + u) . c_{z_j}  +  [0 <= i - j < W] (q_i + v_b) . r_{i-j}
A block's query sees its own block and the P = ceil(W / L) blocks before it key by key (so every
relative-position bias lands on an explicit key); all older keys of the document enter through the
compressed cache: per code s, the count N_s and the mean value of the keys coded s. Since
exp(q.c_s + log N_s) mean_s = sum over those keys of exp(q.c_s) v_j, the result is exactly softmax
attention over the quantised keys, at a cost of O(T (P L + L + Z) (E + F)).

A call may continue a sequence: `ring` holds the W most recent keys (codes, values, segment ids, oldest
first) and the cache statistics of everything older, so decoding costs the same for every new token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from MaxText.models.attention import MASK_VALUE
from MaxText.models.layers import axes
from MaxText.parallel.sharding import constrain

BXLF, BXZF = axes("BXLF"), axes("BXZF")


def sg(x):
  return jax.lax.stop_gradient(x)


def st(x):
  """Zero in the forward pass, identity in the backward pass."""
  return x - sg(x)


def sinusoids(n: int, width: int, wavelength: float) -> jax.Array:
  """[n, width]: [sin, cos] of d / wavelength^(2k / width) for distances d = 0..n-1 (Transformer-XL)."""
  inv_freq = wavelength ** (-jnp.arange(0, width, 2, dtype=jnp.float32) / width)
  angle = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def rel_shift(x_LS: jax.Array) -> jax.Array:
  """[..., L, S] with column s holding distance S-1-s -> column j holding distance i + S - L - j.

  The pad-and-reshape of Transformer-XL; entries with a negative distance are garbage (the caller masks
  them as non-causal).
  """
  *prefix, L, S = x_LS.shape
  x = jnp.pad(x_LS, [(0, 0)] * len(prefix) + [(0, 0), (1, 0)])
  x = x.reshape(*prefix, S + 1, L)[..., 1:, :]
  return x.reshape(*prefix, L, S)


def codebook(c_sum_ZE: jax.Array, c_count_Z: jax.Array) -> jax.Array:
  """The codewords: EMA sums over EMA counts; never differentiated (the EMA, not a gradient, moves them)."""
  return sg(c_sum_ZE.astype(jnp.float32) / jnp.maximum(c_count_Z.astype(jnp.float32), 0.01)[:, None])


def quantize(k_BTE: jax.Array, codebook_ZE: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(codes z, straight-through keys k_hat, squared errors |k - c_z|^2), distances in float32.

  k_hat equals the codeword exactly in the forward pass (k - k is exactly zero) and passes the gradient
  straight through to k; the squared error keeps its gradient towards k (the commitment loss).
  """
  k32 = k_BTE.astype(jnp.float32)
  # |k|^2 is the same for every code, so the nearest code maximises k.c - |c|^2 / 2; no gradient flows here.
  z_BT = jnp.argmax(jnp.einsum("bte,ze->btz", sg(k32), codebook_ZE) - 0.5 * jnp.sum(jnp.square(codebook_ZE), axis=-1),
                    axis=-1).astype(jnp.int32)
  c_BTE = jnp.take(codebook_ZE, z_BT, axis=0)
  err_BT = jnp.sum(jnp.square(k32 - c_BTE), axis=-1)  # its gradient, 2 (k - c_z), costs O(E) per key
  k_hat = sg(c_BTE.astype(k_BTE.dtype)) + st(k_BTE)
  return z_BT, k_hat, err_BT


def per_code_sums(z_BXL, x_BXLF, keep_BXL, codes: int) -> tuple[jax.Array, jax.Array]:
  """(counts [B, X, Z], sums of x [B, X, Z, F]) of the kept entries of each group, by code.

  A scatter-add per row: O(L F) work, where the one-hot matmul of the reference is O(L Z F).
  """
  ids_BXL = jnp.where(keep_BXL, z_BXL, codes)  # id `codes` collects what is not kept, then is dropped

  def sums(ids_L, x_LF):
    return jax.ops.segment_sum(x_LF, ids_L, num_segments=codes + 1)[:codes]

  by_row = jax.vmap(jax.vmap(sums))
  return by_row(ids_BXL, jnp.ones(ids_BXL.shape + (1,), jnp.float32))[..., 0], by_row(ids_BXL, x_BXLF)


def codebook_surrogate(k_BTE, z_BT, valid_BT, c_sum_ZE, c_count_Z, *, decay: float, accumulation: int):
  """A zero-valued loss whose gradient w.r.t. the EMA sums and counts is this micro-batch's share of
  (parameter - EMA target), the target being decay * parameter + (1 - decay) * (statistics of the batch).

  The batch statistics are sums over every real token of the micro-batch (all data shards: a global sum
  under jit, never rescaled by the device count), and the parameter term is split evenly over the
  `accumulation` micro-batches, so the gradients summed over one optimizer step are exactly
  (parameter - target) and SGD with learning rate 1 lands on the target.
  """
  counts_B1Z, sums_B1ZE = per_code_sums(z_BT[:, None], sg(k_BTE.astype(jnp.float32))[:, None], valid_BT[:, None] > 0,
                                        c_sum_ZE.shape[0])
  counts_Z, sums_ZE = jnp.sum(counts_B1Z, axis=(0, 1)), jnp.sum(sums_B1ZE, axis=(0, 1))
  c_sum, c_count = c_sum_ZE.astype(jnp.float32), c_count_Z.astype(jnp.float32)
  grad_sum = (1.0 - decay) * (c_sum / accumulation - sums_ZE)
  grad_count = (1.0 - decay) * (c_count / accumulation - counts_Z)
  return jnp.sum(sg(grad_sum) * st(c_sum)) + jnp.sum(sg(grad_count) * st(c_count))


class Stats(NamedTuple):
  """Compressed cache of one document's keys: per code, how many keys and their mean value."""
  counts: jax.Array  # [..., Z] float32
  means: jax.Array  # [..., Z, F] float32
  segment: jax.Array  # [...] int32: the document these keys belong to (0: none yet)


def empty_stats(batch: int, codes: int, width: int) -> Stats:
  return Stats(jnp.zeros((batch, codes), jnp.float32), jnp.zeros((batch, codes, width), jnp.float32),
               jnp.zeros((batch,), jnp.int32))


def group_stats(z_BXL, v_BXLF, seg_BXL, codes: int) -> tuple[Stats, jax.Array]:
  """Statistics of each group of keys, counting only the document of the group's last real key.

  Documents are contiguous runs of one segment id, so that document's earlier keys can only lie in this
  group or in the groups before it; returns (stats, whether the group has a real key).
  """
  valid = seg_BXL != 0
  index = jnp.arange(seg_BXL.shape[-1])
  last_BX = jnp.max(jnp.where(valid, index, -1), axis=-1)
  tail_BX = jnp.take_along_axis(seg_BXL, jnp.maximum(last_BX, 0)[..., None], axis=-1)[..., 0]
  keep = valid & (seg_BXL == tail_BX[..., None])
  counts_BXZ, sums_BXZF = per_code_sums(z_BXL, v_BXLF.astype(jnp.float32), keep, codes)
  means_BXZF = constrain(sums_BXZF / jnp.maximum(counts_BXZ, 1.0)[..., None], BXZF)
  return Stats(counts_BXZ, means_BXZF, tail_BX), last_BX >= 0


def merge(state: Stats, group: Stats, has_keys: jax.Array) -> Stats:
  """Fold a group's statistics into the running ones: counts add, means combine by their weights.

  Running means rather than running sums keep every number the size of one value (the stable serial
  reduction of the reference); a group from a new document restarts the statistics.
  """
  restart = has_keys & (group.segment != state.segment)
  counts0 = jnp.where(restart[..., None], 0.0, state.counts)
  means0 = jnp.where(restart[..., None, None], 0.0, state.means)
  counts = counts0 + group.counts
  denominator = jnp.maximum(counts, 1.0)
  means = (counts0 / denominator)[..., None] * means0 + (group.counts / denominator)[..., None] * group.means
  return Stats(counts, means, jnp.where(has_keys, group.segment, state.segment))


def cumulative_stats(initial: Stats, z_BXL, v_BXLF, seg_BXL, codes: int) -> tuple[Stats, Stats]:
  """(statistics after each group [B, X, ...], after the last) by a serial scan over the X groups."""
  groups, has_keys = group_stats(z_BXL, v_BXLF, seg_BXL, codes)

  def body(state, xs):
    new = merge(state, *xs)
    return new, new

  time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (groups, has_keys))
  final, history = jax.lax.scan(body, initial, time_major)
  return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), history), final


class Ring(NamedTuple):
  """What a call leaves to the next: the W most recent keys, oldest first, and the statistics of the rest."""
  codes: jax.Array  # [B, W] int32
  values: jax.Array  # [B, W, F]
  segment: jax.Array  # [B, W] int32 (0: empty slot or padding)
  stats: Stats  # [B, Z], [B, Z, F], [B]


def attend(q_BTE, k_hat_BTE, v_BTF, z_BT, seg_BT, *, codebook_ZE, u_E, vb_E, rel_DE, window: int,
           wavelength: float, block_len: int, ring: Ring | None = None) -> tuple[jax.Array, Ring | None]:
  """Causal attention of T queries over the quantised keys before them (see the module docstring).

  Keys of other documents (segment ids) are invisible; T must be a multiple of `block_len`. With `ring`,
  the call continues the sequence it describes and returns the ring after these T tokens.
  """
  B, T, E = q_BTE.shape
  F, Z, W, L = v_BTF.shape[-1], codebook_ZE.shape[0], window, block_len
  if T % L:
    raise ValueError(f"{T} tokens are not a whole number of blocks of {L}")
  X = T // L
  P = -(-W // L)
  if ring is None:
    P = min(P, X - 1)  # nothing precedes the first block, so it needs no earlier blocks
    front_k = jnp.zeros((B, P * L, E), k_hat_BTE.dtype)
    front_v = jnp.zeros((B, P * L, F), v_BTF.dtype)
    front_z = front_seg = jnp.zeros((B, P * L), jnp.int32)
    initial = empty_stats(B, Z, F)
  else:
    pad = P * L - W
    front_k = jnp.pad(jnp.take(codebook_ZE, ring.codes, axis=0).astype(k_hat_BTE.dtype), ((0, 0), (pad, 0), (0, 0)))
    front_v = jnp.pad(ring.values.astype(v_BTF.dtype), ((0, 0), (pad, 0), (0, 0)))
    front_z, front_seg = (jnp.pad(a, ((0, 0), (pad, 0))) for a in (ring.codes, ring.segment))
    initial = ring.stats
  # The sequence extended by what precedes it, in blocks: block P + r is query block r.
  ext_k = jnp.concatenate([front_k, k_hat_BTE], axis=1).reshape(B, P + X, L, E)
  ext_v = constrain(jnp.concatenate([front_v, v_BTF], axis=1).reshape(B, P + X, L, F), BXLF)
  ext_z = jnp.concatenate([front_z, z_BT], axis=1).reshape(B, P + X, L)
  ext_seg = jnp.concatenate([front_seg, seg_BT], axis=1).reshape(B, P + X, L)

  q_BXLE = q_BTE.reshape(B, X, L, E)
  seg_BXL = seg_BT.reshape(B, X, L)
  qu_BXLE, qv_BXLE = q_BXLE + u_E.astype(q_BTE.dtype), q_BXLE + vb_E.astype(q_BTE.dtype)

  # Exact window of block r: blocks r..r+P of the extended sequence, S = (P+1) L keys. Matmuls run in the
  # activation dtype (XLA:CPU has no bf16 x bf16 -> f32 batched dot); masks and softmax in float32.
  if X == 1:
    windows = [(ext_k.reshape(B, 1, -1, E), ext_v.reshape(B, 1, -1, F), ext_seg.reshape(B, 1, -1))]
  else:
    windows = [(ext_k[:, p:p + X], ext_v[:, p:p + X], ext_seg[:, p:p + X]) for p in range(P + 1)]
  S = (P + 1) * L
  s_BXLS = jnp.concatenate([jnp.einsum("bxle,bxse->bxls", qu_BXLE, k).astype(jnp.float32)
                            for k, _, _ in windows], axis=-1)
  # Relative-position scores, computed for the distances 0..W-1 only (the bias is zero from W on) and laid
  # out as rel_shift expects: window column s at distance S-1-s from the last query. Negative distances
  # are masked below.
  near = min(W, S)
  sin_ND = sinusoids(near, rel_DE.shape[0], wavelength)[::-1].astype(q_BTE.dtype)
  bias_BXLN = jnp.einsum("bxle,de,nd->bxln", qv_BXLE, rel_DE.astype(q_BTE.dtype), sin_ND).astype(jnp.float32)
  s_BXLS = s_BXLS + rel_shift(jnp.pad(bias_BXLN, ((0, 0), (0, 0), (0, 0), (S - near, 0))))
  key_seg_BXS = jnp.concatenate([seg for _, _, seg in windows], axis=-1)
  causal_LS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None] + P * L
  visible = causal_LS & (seg_BXL[..., None] == key_seg_BXS[:, :, None, :])
  s_BXLS = jnp.where(visible, s_BXLS, MASK_VALUE)

  # Compressed cache of block r: everything before its window, i.e. extended blocks 0..r-1. A call that
  # continues a sequence also needs the statistics after its last block (see below).
  groups = X if ring is not None else X - 1
  if groups:
    history, _ = cumulative_stats(initial, ext_z[:, :groups], ext_v[:, :groups], ext_seg[:, :groups], Z)
    states = jax.tree.map(lambda a, h: jnp.concatenate([a[:, None], h], axis=1), initial, history)
  else:
    states = jax.tree.map(lambda a: a[:, None], initial)
  cache = jax.tree.map(lambda a: a[:, :X], states)
  count_bias_BXZ = jnp.where(cache.counts > 0, jnp.log(jnp.maximum(cache.counts, 1.0)), MASK_VALUE)
  s_BXLZ = jnp.einsum("bxle,ze->bxlz", qu_BXLE, codebook_ZE.astype(q_BTE.dtype)).astype(jnp.float32)
  s_BXLZ = s_BXLZ + count_bias_BXZ[:, :, None, :]
  same_doc_BXL = cache.segment[:, :, None] == seg_BXL
  s_BXLZ = jnp.where(same_doc_BXL[..., None], s_BXLZ, MASK_VALUE)

  # One softmax over the window keys and the codes; the max is a constant for the gradient.
  top_BXL = sg(jnp.maximum(jnp.max(s_BXLS, axis=-1), jnp.max(s_BXLZ, axis=-1)))
  a_BXLS = jnp.exp(s_BXLS - top_BXL[..., None])
  a_BXLZ = jnp.exp(s_BXLZ - top_BXL[..., None])
  denominator = jnp.sum(a_BXLS, axis=-1) + jnp.sum(a_BXLZ, axis=-1)
  w_BXLS = (a_BXLS / denominator[..., None]).astype(v_BTF.dtype)
  w_BXLZ = a_BXLZ / denominator[..., None]
  out_BXLF = jnp.einsum("bxlz,bxzf->bxlf", w_BXLZ, cache.means)
  for p, (_, v, _) in enumerate(windows):
    w = w_BXLS if len(windows) == 1 else w_BXLS[..., p * L:(p + 1) * L]
    out_BXLF = out_BXLF + jnp.einsum("bxls,bxsf->bxlf", w, v).astype(jnp.float32)
  out_BTF = constrain(out_BXLF, BXLF).reshape(B, T, F).astype(v_BTF.dtype)
  if ring is None:
    return out_BTF, None

  # The next call's ring. The real tokens of a row are a prefix of its chunk (padding after them is not part
  # of the sequence), so per row the last W real keys stay explicit and the G keys before them are folded
  # into the statistics: whole blocks from the scan, then the part of the next block.
  G_B = P * L - W + jnp.sum(seg_BT != 0, axis=1)
  flat_z, flat_v, flat_seg = ext_z.reshape(B, -1), ext_v.reshape(B, -1, F), ext_seg.reshape(B, -1)
  keep_BW = G_B[:, None] + jnp.arange(W)
  block_B = G_B // L
  base = jax.tree.map(lambda a: jnp.take_along_axis(a, block_B.reshape((B,) + (1,) * (a.ndim - 1)), axis=1)[:, 0],
                      states)
  rows_B1 = jnp.arange(B)[:, None]
  part_seg_BL = jnp.where(jnp.arange(L) < (G_B - block_B * L)[:, None], ext_seg[rows_B1, block_B[:, None]][:, 0], 0)
  group, has_keys = group_stats(ext_z[rows_B1, block_B[:, None]], ext_v[rows_B1, block_B[:, None]],
                                part_seg_BL[:, None], Z)
  stats = merge(base, jax.tree.map(lambda a: a[:, 0], group), has_keys[:, 0])
  return out_BTF, Ring(jnp.take_along_axis(flat_z, keep_BW, axis=1),
                       jnp.take_along_axis(flat_v, keep_BW[..., None], axis=1),
                       jnp.take_along_axis(flat_seg, keep_BW, axis=1), stats)
